r"""Prefix tuning (Li & Liang, 2021, arXiv:2101.00190).

Every attention layer l gets L_p trainable key and value vectors, the prefix P_k^l, P_v^l ∈ R^{L_p×d}, that the
input's queries attend to before the input's own keys and values:

    head = softmax(q [P_k; K]^T / sqrt(d_h)) [P_v; V]          (per head; queries get no prefix)

The prefix positions are never masked (not by padding, not by the causal mask): every query sees all of P.
Written as He et al. (2022, arXiv:2110.04366, eq. 7), with λ(x) the attention mass that x's query puts on P,

    head = (1 − λ(x)) Attn(x W_q, C W_k, C W_v) + λ(x) Attn(x W_q, P_k, P_v).

Symbols → code: L_p = `num_virtual_tokens`; the stored P (L_p, 2·n_layers·d) = `prefix` (peft's
`prompt_encoder.embedding.weight`), one row per virtual token laid out as [K_0, V_0, K_1, V_1, ...] (layer 0's
key, its value, layer 1's key, ...), each of width d = num_kv_heads·head_dim (for GQA models the key/value
width, as peft does; d = hidden size otherwise). Trainable / stored parameters: 2·n_layers·d·L_p.

Reparameterisation (`prefix_projection=True`, the paper's §4.3): while training, P = MLP(P′) with
P′ ∈ R^{L_p×d} = `embedding` and MLP = Linear(d, h) → Tanh → Linear(h, 2·n_layers·d),
h = `encoder_hidden_size` (None: d, as peft). Trainable while training:
L_p·d + (d·h + h) + (h·2·n_layers·d + 2·n_layers·d). Only the resulting P is kept: `adapter_state()` saves
{"prefix": MLP(P′)}, and `to_dict()` writes the saved form,
prefix_projection=False with projection_folded=True ("P was computed from an MLP at save time"), so loading
builds a module that holds P directly (as peft, whose saved adapter is P and whose inference-mode prefix encoder
is a plain embedding). A loaded adapter trained further (is_trainable=True) trains P without the MLP.

Init: P (or P′) ~ N(0, 1) and nn.Linear's default init for the MLP, as peft (nn.Embedding's init).

How it is injected: one mechanism on every supported model. For each forward, the prefix becomes a transformers
`DynamicCache` prefilled with (P_k^l, P_v^l) for every layer l, passed as `cache` (transformers 5's name for
past_key_values), and the attention mask gets L_p ones in front. The model then attends to [P_k; K], [P_v; V]
itself, with the prefix never masked; the input's positions start at L_p (the cache's length), as in peft. Labels
are unchanged (the prefix is not in the sequence). BERT in transformers 5 takes a cache too (its embeddings then
start positions at L_p as well), where peft refuses BERT. `generate` prefills the same cache, gives HF's generate
L_p placeholder ids in front of input_ids (they are the cache's positions, never embedded) and removes them from the
output.

Differences from the paper: the MLP's width defaults to d (peft's default; the paper's setting is wider, METHODS.md
gives 512–800 — pass encoder_hidden_size), the init is peft's, and there is no dropout on the prefix.
Positions starting at L_p is peft's (and HF's cache) convention (position_ids passed to forward are offset by L_p,
as peft does); with left padding, generate counts positions over the real tokens (HF's position_ids from the
mask), so a padded row generates what it generates alone.

peft 0.21.2's own generate() ignores the prefix with transformers 5.24 (its first generated logits equal the bare
model's), so tests/test_prefix_tuning.py checks generate against greedy decoding over peft's forward instead.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from ..config import PeftConfig, check_positive_int, register


def prefix_geometry(model) -> tuple[int, int, int]:
    """(n_layers, num_kv_heads, head_dim) of a transformers decoder or encoder; ValueError if unsupported."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "is_encoder_decoder", False):
        raise ValueError("prefix tuning supports transformers decoder-only models (Llama, GPT-2, ...) and encoders "
                         f"(BERT); got {type(model).__name__}")
    n_layers = getattr(cfg, "num_hidden_layers", None)
    n_heads = getattr(cfg, "num_attention_heads", None)
    hidden = getattr(cfg, "hidden_size", None)
    if not (n_layers and n_heads and hidden):
        raise ValueError(f"prefix tuning: {type(model).__name__}'s config has no num_hidden_layers / "
                         f"num_attention_heads / hidden_size")
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // n_heads
    return int(n_layers), int(n_kv), int(head_dim)


@register
@dataclass
class PrefixTuningConfig(PeftConfig):
    num_virtual_tokens: int = 10  # L_p; the paper's table-to-text setting is 10
    prefix_projection: bool = False  # train P through the MLP reparameterisation (only P is saved)
    encoder_hidden_size: int | None = None  # h, the MLP's width; None: d (as peft)
    projection_folded: bool = False  # set in saved configs: P was computed from the MLP when it was saved

    method = "prefix_tuning"
    kind = "input"

    def validate(self):
        check_positive_int("num_virtual_tokens", self.num_virtual_tokens)
        for name in ("prefix_projection", "projection_folded"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.encoder_hidden_size is not None:
            check_positive_int("encoder_hidden_size", self.encoder_hidden_size)
        if self.prefix_projection and self.projection_folded:
            raise ValueError("projection_folded=True marks a saved prefix (P already computed); it cannot be "
                             "combined with prefix_projection=True")
        if self.target is not None:
            raise ValueError("prefix tuning acts on every attention layer through the KV cache and wraps no "
                             "modules; leave target=None")

    def to_dict(self):
        d = super().to_dict()
        if self.prefix_projection:  # the saved form: P itself (adapter_state), no MLP
            d.update(prefix_projection=False, projection_folded=True)
        return d

    def make_input_adapter(self, model):
        return Prefix(model, self)


class Prefix(nn.Module):
    """The prefix (P, or P′ and its MLP) and the two entry points the spine calls: forward_model and generate."""

    def __init__(self, model: nn.Module, config: PrefixTuningConfig):
        super().__init__()
        self.n_layers, self.n_kv, self.head_dim = prefix_geometry(model)
        self.num_virtual_tokens = L = config.num_virtual_tokens
        d = self.n_kv * self.head_dim
        out = 2 * self.n_layers * d
        device = model.get_input_embeddings().weight.device
        self.prefix_projection = config.prefix_projection
        if config.prefix_projection:  # P = MLP(P′)
            h = config.encoder_hidden_size or d
            self.embedding = nn.Parameter(torch.randn(L, d, device=device))  # P′
            self.mlp = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, out)).to(device)
        else:
            self.prefix = nn.Parameter(torch.randn(L, out, device=device))  # P
        backbone = getattr(model, "base_model", model)  # HF: the backbone (LlamaModel, BertModel)
        if "cache" not in inspect.signature(backbone.forward).parameters:
            raise ValueError(f"prefix tuning needs a model whose forward takes a KV cache (`cache`); "
                             f"{type(backbone).__name__} does not")
        self.can_generate = bool(getattr(model, "can_generate", lambda: False)())

    def prefix_matrix(self) -> torch.Tensor:
        """P (L_p, 2·n_layers·d): the stored prefix, or MLP(P′) while training with the reparameterisation."""
        return self.mlp(self.embedding) if self.prefix_projection else self.prefix

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """What is saved: P only (with the reparameterisation, the MLP's output; see to_dict)."""
        return {"prefix": self.prefix_matrix()}

    def key_values(self, batch: int, dtype=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (P_k, P_v), each (B, num_kv_heads, L_p, head_dim)."""
        P = self.prefix_matrix()
        if dtype is not None:
            P = P.to(dtype)
        x = P.view(self.num_virtual_tokens, self.n_layers, 2, self.n_kv, self.head_dim).permute(1, 2, 3, 0, 4)
        return [(x[i, 0].unsqueeze(0).expand(batch, -1, -1, -1), x[i, 1].unsqueeze(0).expand(batch, -1, -1, -1))
                for i in range(self.n_layers)]

    def make_cache(self, base_model, batch: int):
        from transformers import DynamicCache
        dtype = base_model.get_input_embeddings().weight.dtype
        cache = DynamicCache(config=base_model.config)
        for layer, (k, v) in enumerate(self.key_values(batch, dtype)):
            cache.update(k, v, layer)
        return cache

    def _extend_mask(self, attention_mask, batch):
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2:
            raise ValueError("prefix tuning needs a 2-D attention_mask (batch, tokens)")
        return torch.cat([attention_mask.new_ones(batch, self.num_virtual_tokens), attention_mask], dim=1)

    def forward_model(self, base_model, input_ids=None, attention_mask=None, inputs_embeds=None, **kw):
        if kw.get("past_key_values") is not None or kw.get("cache") is not None:
            raise ValueError("prefix tuning owns the KV cache; pass no past_key_values (use model.generate())")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        B = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        kw["cache"] = self.make_cache(base_model, B)
        if kw.get("position_ids") is not None:  # positions count from the prefix's end, as peft offsets them
            kw["position_ids"] = kw["position_ids"] + self.num_virtual_tokens
        return base_model(input_ids=input_ids, inputs_embeds=inputs_embeds,
                          attention_mask=self._extend_mask(attention_mask, B), **kw)

    @torch.no_grad()
    def generate(self, base_model, input_ids=None, attention_mask=None, **kw):
        """Decoder-only generation; returns input_ids followed by the new tokens, like base_model.generate.

        Pass attention_mask for padded batches (left padding); max_length counts the real tokens only.
        """
        if not self.can_generate:
            raise ValueError("prefix tuning generate() supports decoder-only models")
        if input_ids is None or any(k in kw for k in ("inputs_embeds", "past_key_values", "cache")):
            raise ValueError("prefix tuning generate() needs input_ids (and no inputs_embeds or cache)")
        B, L = input_ids.shape[0], self.num_virtual_tokens
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if "max_length" in kw and "max_new_tokens" not in kw:
            kw["max_new_tokens"] = kw.pop("max_length") - input_ids.shape[1]
        # L_p placeholder ids stand for the cache's positions: HF's generate feeds only the ids after the cache
        placeholder = input_ids.new_zeros(B, L)
        out = base_model.generate(input_ids=torch.cat([placeholder, input_ids], dim=1),
                                  attention_mask=self._extend_mask(attention_mask, B),
                                  cache=self.make_cache(base_model, B), **kw)
        if isinstance(out, torch.Tensor):
            return out[:, L:]
        out.sequences = out.sequences[:, L:]  # return_dict_in_generate
        return out


@torch.no_grad()
def prefix_attention_mass(model, input_ids, attention_mask=None, adapter_name: str | None = None) -> torch.Tensor:
    """λ per layer: the attention mass the input's queries put on the prefix, averaged over heads and (real)
    query positions; a tensor (n_layers,). Runs the model once with eager attention weights."""
    name = adapter_name or model.active_adapter
    if name not in model.input_adapters or not isinstance(model.input_adapters[name], Prefix):
        raise ValueError(f"adapter {name!r} is not a prefix-tuning adapter")
    L = model.input_adapters[name].num_virtual_tokens
    cfg = model.base_model.config
    impl = cfg._attn_implementation
    cfg._attn_implementation = "eager"  # attention weights are returned by the eager implementation only
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True)
    finally:
        cfg._attn_implementation = impl
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    w = mask.float()[:, None, :]  # (B, 1, T): average over real query positions
    lam = [((a[..., :L].sum(-1).float() * w).sum((0, 2)) / w.sum((0, 2))).mean() for a in out.attentions]
    return torch.stack(lam)


__all__ = ["PrefixTuningConfig", "Prefix", "prefix_attention_mass", "prefix_geometry"]
