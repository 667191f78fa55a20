r"""Prompt tuning (Lester et al., 2021, arXiv:2104.08691).

The frozen model reads a trainable soft prompt before the embedded input:

    X' = [P; E(x)],     P ∈ R^{L_p×d}

E = the model's input embedding (`get_input_embeddings()`), P = `prompt` (L_p, d), L_p =
`num_virtual_tokens`. The attention mask gets L_p ones in front, causal-LM labels get L_p entries of -100
(no loss on virtual tokens), BERT's token_type_ids get L_p zeros. Positions are counted over [P; x], as in
peft (so P also receives position embeddings). Trainable parameters: L_p·d.

Init ("init"): "random" — uniform[-0.5, 0.5] (the paper's random init); "vocab" — embeddings of token ids
drawn uniformly from the vocabulary (Lester samples from the 5,000 most frequent tokens; we have no
frequencies, peft also draws from the whole vocabulary); "text" — embeddings of `init_token_ids`, repeated
or cut to L_p (`PromptTuningConfig.from_text(tokenizer, "Classify the sentiment:")`).

Interpretation: `nearest_tokens` lists, per virtual token, the vocabulary tokens whose input embeddings
have the highest cosine similarity (the paper's §7).

With a BERT classifier the pooler reads position 0, which is now the first virtual token (as in peft).

`PrependedPrompt` holds what every prompt at the input shares (placing the virtual tokens, the mask,
labels and token types, generate); P-tuning (`p_tuning.py`) subclasses it with an encoder that produces P.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import PeftConfig, check_choice, check_positive, check_positive_int, register


@register
@dataclass
class PromptTuningConfig(PeftConfig):
    num_virtual_tokens: int = 20  # L_p; the paper uses 1..150, 20 at the larger sizes
    init: str = "random"  # "random" (uniform ±init_range), "vocab" (sampled token embeddings), "text"
    init_token_ids: list[int] | None = None  # for init="text": token ids, repeated or cut to L_p
    init_range: float = 0.5  # random init: uniform[-init_range, init_range], the paper's 0.5

    method = "prompt_tuning"
    kind = "input"

    def validate(self):
        check_positive_int("num_virtual_tokens", self.num_virtual_tokens)
        check_choice("init", self.init, {"random", "vocab", "text"})
        check_positive("init_range", self.init_range)
        if self.target is not None:
            raise ValueError("prompt tuning acts on the input embeddings and wraps no modules; leave target=None")
        if self.init == "text":
            ids = self.init_token_ids
            if not isinstance(ids, (list, tuple)) or not ids or \
                    not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ValueError(f"init='text' needs init_token_ids, a non-empty list of token ids, got {ids!r}; "
                                 f"use PromptTuningConfig.from_text(tokenizer, text)")
            self.init_token_ids = list(ids)
        elif self.init_token_ids is not None:
            raise ValueError(f"init_token_ids is only used with init='text' (init={self.init!r})")

    @classmethod
    def from_text(cls, tokenizer, text: str, num_virtual_tokens: int = 20, **kwargs) -> "PromptTuningConfig":
        """Text init: the prompt starts as the embeddings of `text`'s tokens (no special tokens)."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"from_text needs a non-empty string, got {text!r}")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return cls(num_virtual_tokens=num_virtual_tokens, init="text", init_token_ids=[int(i) for i in ids],
                   **kwargs)

    def make_input_adapter(self, model):
        return SoftPrompt(model, self)


class PrependedPrompt(nn.Module):
    """Virtual tokens placed in front of the embedded input: the entry points the spine calls (forward_model,
    generate), shared by every method whose adapter is a prompt at the input (prompt tuning, P-tuning).

    A subclass holds its tensors and defines `virtual_tokens()`, the (L_p, d) prompt for this forward pass.
    """

    num_virtual_tokens: int
    method_name = "prompt tuning"  # for error messages

    def virtual_tokens(self) -> torch.Tensor:
        raise NotImplementedError

    def _prepend(self, base_model, input_ids, attention_mask, inputs_embeds):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = base_model.get_input_embeddings()(input_ids)  # (B, T, d)
        B, L = inputs_embeds.shape[0], self.num_virtual_tokens
        P = self.virtual_tokens().to(inputs_embeds.dtype).unsqueeze(0).expand(B, -1, -1)  # (B, L_p, d)
        inputs_embeds = torch.cat([P, inputs_embeds], dim=1)  # (B, L_p + T, d)
        if attention_mask is not None:
            ones = attention_mask.new_ones(B, L)
            attention_mask = torch.cat([ones, attention_mask], dim=1)  # (B, L_p + T)
        return inputs_embeds, attention_mask

    def forward_model(self, base_model, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, **kw):
        if kw.get("position_ids") is not None:
            raise ValueError(f"{self.method_name} counts positions over [prompt; input]; do not pass position_ids")
        if kw.get("past_key_values") is not None:
            raise ValueError(f"{self.method_name} with past_key_values is not supported here; use model.generate()")
        T = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        inputs_embeds, attention_mask = self._prepend(base_model, input_ids, attention_mask, inputs_embeds)
        B, L = inputs_embeds.shape[0], self.num_virtual_tokens
        # token-level labels (B, T) get -100 for the virtual tokens; class labels (B,) pass unchanged
        if labels is not None and labels.dim() == 2 and labels.shape[1] == T and not labels.is_floating_point():
            labels = torch.cat([labels.new_full((B, L), -100), labels], dim=1)
        if kw.get("token_type_ids") is not None:
            tt = kw["token_type_ids"]
            kw["token_type_ids"] = torch.cat([tt.new_zeros(B, L), tt], dim=1)
        if labels is not None:
            kw["labels"] = labels
        return base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kw)

    @torch.no_grad()
    def generate(self, base_model, input_ids=None, attention_mask=None, **kw):
        """Decoder-only generation; returns input_ids followed by the new tokens, like base_model.generate.

        Pass attention_mask for padded batches (left padding); max_length counts the real tokens only.
        """
        if getattr(base_model.config, "is_encoder_decoder", False):
            raise ValueError(f"{self.method_name} generate() supports decoder-only models")
        if input_ids is None or "inputs_embeds" in kw:
            raise ValueError(f"{self.method_name} generate() needs input_ids (and no inputs_embeds)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if "max_length" in kw and "max_new_tokens" not in kw:  # HF counts inputs_embeds in max_length
            kw["max_new_tokens"] = kw.pop("max_length") - input_ids.shape[1]
        embeds, mask = self._prepend(base_model, input_ids, attention_mask, None)
        out = base_model.generate(inputs_embeds=embeds, attention_mask=mask, **kw)  # new tokens only (B, T_new)
        if isinstance(out, torch.Tensor):
            return torch.cat([input_ids, out.to(input_ids.device)], dim=1)
        out.sequences = torch.cat([input_ids, out.sequences.to(input_ids.device)], dim=1)  # return_dict_in_generate
        return out


class SoftPrompt(PrependedPrompt):
    """The soft prompt P of prompt tuning: the virtual tokens are P itself."""

    def __init__(self, model: nn.Module, config: PromptTuningConfig):
        super().__init__()
        emb = model.get_input_embeddings().weight  # (V, d)
        V, d = emb.shape
        L = config.num_virtual_tokens
        self.num_virtual_tokens = L
        # P in float32 (cast to the model's dtype in forward), as peft keeps it
        self.prompt = nn.Parameter(torch.empty(L, d, device=emb.device, dtype=torch.float32))
        with torch.no_grad():
            if config.init == "random":
                self.prompt.uniform_(-config.init_range, config.init_range)
            else:
                if config.init == "vocab":
                    ids = torch.randint(0, V, (L,))
                else:
                    ids = torch.tensor(config.init_token_ids, dtype=torch.long)
                    if int(ids.max()) >= V:
                        raise ValueError(f"init_token_ids has id {int(ids.max())} but the vocabulary has {V} tokens")
                    ids = ids.repeat((L + len(ids) - 1) // len(ids))[:L]  # repeat, then cut to L_p
                self.prompt.copy_(emb[ids.to(emb.device)].float())

    def virtual_tokens(self) -> torch.Tensor:
        return self.prompt


@torch.no_grad()
def nearest_tokens(model, k: int = 5, tokenizer=None, adapter_name: str | None = None):
    """Per virtual token, the k vocabulary tokens with the highest cosine similarity of input embeddings.

    Works for prompt tuning (P) and P-tuning (the encoder's output f(Z)).
    Returns (ids (L_p, k), similarities (L_p, k)), plus a list of lists of token strings if a tokenizer is given.
    """
    check_positive_int("k", k)
    name = adapter_name or model.active_adapter
    if name not in model.input_adapters or not isinstance(model.input_adapters[name], PrependedPrompt):
        raise ValueError(f"adapter {name!r} is not a prompt-tuning or P-tuning adapter")
    P = model.input_adapters[name].virtual_tokens().float()  # (L_p, d): P, or P-tuning's f(Z)
    E = model.get_input_embeddings().weight.float()  # (V, d)
    sims = nn.functional.normalize(P, dim=-1) @ nn.functional.normalize(E, dim=-1).T  # (L_p, V)
    values, ids = sims.topk(min(k, E.shape[0]), dim=-1)
    if tokenizer is None:
        return ids, values
    return ids, values, [tokenizer.convert_ids_to_tokens(row.tolist()) for row in ids]


__all__ = ["PromptTuningConfig", "PrependedPrompt", "SoftPrompt", "nearest_tokens"]
