"""Training memory of a model, estimated from its shapes: weights, gradients, optimizer state, activations.

``estimate(model, batch_size, seq_len, ...)`` returns a :class:`MemoryEstimate` (bytes, per rank). The model
may live on the ``meta`` device (a 7B Llama built from its config costs nothing); what is trainable is read from
``requires_grad``, so a plain model is full fine-tuning and a ``mp.wrap``-ped one is PEFT.

The terms (bytes; N = trainable parameters, P = frozen ones, e = bytes of an element)
- frozen weights   Σ numel·e over frozen tensors (the base; a 4-bit base counts its packed bytes)
- trainable weights Σ numel·e over trainable tensors (the adapter; all of the model in full FT)
- gradients        one per trainable tensor, in its dtype: N·e (the frozen base gets none)
- optimizer state  AdamW: two moments (exp_avg, exp_avg_sq) per trainable element, ``zeros_like`` the
                   parameter: 2·N·e, i.e. 8 bytes per trainable parameter for fp32 weights; SGD (no momentum): 0
- activations      the tensors autograd saves in the forward pass for the backward pass (below)
- peak             W + O + max(A + T_loss + G_head, G + T_opt), W all weights: the backward pass starts with
                   every activation held, the loss's gradients (T_loss) and the head's weight gradient (G_head)
                   on top; the optimizer step holds all gradients (G) and its temporaries (T_opt, taken as one
                   more copy of the gradients: torch's foreach AdamW works on whole lists of tensors).
                   Activations and gradients are never both complete (backward frees a layer's activations as it
                   makes that layer's gradients), so in full fine-tuning the peak is below ``total``, the plain
                   sum of the five terms; with a tiny adapter the transients can put it a little above.

Activations. The accounting is Korthikanti et al. (2022), "Reducing Activation Recomputation in Large
Transformer Models", §4.1: list every tensor a layer keeps for its backward pass, as a multiple of s·b·h
(sequence × batch × hidden). For their GPT layer (16-bit activations, 1-byte dropout masks, a GeLU MLP of
width 4h, attention scores materialised) they find s·b·h·(34 + 5·a·s/h) bytes per layer: attention
11·sbh + 5·a·s²·b, MLP 19·sbh, layer norms 4·sbh; with full recomputation only the layer's input, 2·sbh.
We do the same count for transformers' Llama and BERT layers as implemented (the numbers differ from 34:
SwiGLU, RMSNorm, no dropout in Llama, and a frozen weight needs no saved input). Per token (× b·s), with
h hidden, d head size, a heads, k key/value heads, I intermediate width, V vocabulary, r LoRA rank:

  Llama layer   norms: 2·h (their inputs, in fp32) [+ 2·h normalised copies if the norm weights train]
                attention, fused (sdpa / flash): q a·d, k and v k·d each, output a·d, log-sum-exp a (fp32)
                attention, eager: q, k and v (repeated to a heads) 3·a·d, probabilities a·s
                MLP: gate, SiLU(gate), up: 3·I
  BERT layer    LayerNorm inputs 2·h; GELU input I; attention as above; dropout (train mode, p > 0): one
                1-byte mask per dropout (2·h, and a·s on the probabilities with their dropped copy a·s)
  linear layers the input of a linear layer is kept only if something in it trains (its weight in full FT, a
                LoRA A in PEFT): q/k/v share one input (h), o_proj a·d, gate/up share one (h), down_proj I;
                BERT query/key/value h, attention.output.dense h, intermediate.dense h, output.dense I
  LoRA          each adapted layer also keeps A's output, r (B's input); with LoRA dropout a dropped copy of
                its input (h) and the mask (h bytes)
  head          causal / masked LM: the final norm's input h, lm_head's input h if it trains, and the
                log-softmax of the cross-entropy over the vocabulary, V in fp32; T_loss = 2·V·4 (its
                gradient and the logits' gradient exist together at the start of backward)
  checkpointing (transformers' ``activation_checkpointing_enable``, formerly ``gradient_checkpointing_enable``:
                each layer recomputed in backward) only the layers' inputs stay (L·h), plus one layer's
                activations while it is recomputed (and under autocast one layer's bf16 weight copies)

Element sizes: fp32 weights, no autocast: 4 everywhere. ``bf16=True`` (autocast, fp32 master weights, as
the Trainer's bf16): the residual stream and RMSNorm stay fp32 (4), matmul inputs and outputs are bf16 (2),
log-softmax fp32; autocast casts per call, so each linear layer keeps its own bf16 copy of an fp32 input and
of its weight (2 bytes per linear weight: the whole base, frozen or not). A bf16 model (weights in bf16): 2,
except RMSNorm's fp32 input and the log-softmax; its fp32 LoRA adapters (as peft) convert their input first,
a copy per adapted layer. Dropout masks: 1 byte from CUDA's fused kernel; on the CPU dropout multiplies by a
mask of the input's dtype.

What is left out: CUDA/cuDNN workspaces and the allocator's fragmentation (on a GPU add a few hundred MB),
buffers (RoPE tables), terms of size b·h without s (pooler, classifier), the gradients in flight inside the
layer being back-propagated (a few times b·s·I; why LoRA's measured peak is 5-8% above the estimate), and
the first layers of a PEFT model before the first adapter, where nothing needs a gradient yet (a small
overestimate). The tests (tests/test_memory.py) check the activation count against the bytes autograd
actually saves, and the peak against a measured training step.

Data parallel, per rank (``batch_size`` is the per-rank micro-batch)
- ``ddp``  every rank holds everything; DDP's reducer keeps a second copy of the trainable gradients in
           its communication buckets (unless gradient_as_bucket_view=True)
- ``fsdp`` as minipeft's Trainer does it (minipeft.distributed): the frozen weights are sharded, / world_size;
           the trainable tensors (the adapter), their gradients and AdamW state stay whole on every rank (ZeRO-3
           would shard them too; for an adapter that saves almost nothing). While a layer runs its full weights
           are gathered (one layer's weights unsharded on top); activations are per rank as in DDP
(``batch_size`` here is per rank; the Trainer's ``batch_size`` is the global micro-batch, split over the ranks.)
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

OPTIMIZERS = {"adamw": 2, "sgd": 0}  # optimizer state tensors per trainable tensor
STRATEGIES = ("none", "ddp", "fsdp")
FUSED_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")

# The linear layers of a block that read the same input ("sites"): (module suffixes, width of the input).
SITES = {
    "llama": {"attn_in": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "h"),
              "attn_out": (("self_attn.o_proj",), "ad"),
              "mlp_in": (("mlp.gate_proj", "mlp.up_proj"), "h"),
              "mlp_out": (("mlp.down_proj",), "I")},
    "bert": {"attn_in": (("attention.self.query", "attention.self.key", "attention.self.value"), "h"),
             "attn_out": (("attention.output.dense",), "h"),
             "mlp_in": (("intermediate.dense",), "h"),
             "mlp_out": (("output.dense",), "I")},
}
FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "bert": "bert", "roberta": "bert"}


@dataclasses.dataclass
class MemoryEstimate:
    """Bytes per rank. ``total`` is the plain sum; ``peak`` the largest moment of a training step (see module)."""
    frozen_weights: int
    trainable_weights: int
    gradients: int
    optimizer_state: int
    activations: int
    peak: int
    strategy: str = "none"
    world_size: int = 1
    details: dict = dataclasses.field(default_factory=dict)  # activation parts, transients, the shapes used

    @property
    def total(self) -> int:
        return (self.frozen_weights + self.trainable_weights + self.gradients + self.optimizer_state
                + self.activations)

    def rows(self) -> list[tuple[str, int]]:
        return [("base weights (frozen)", self.frozen_weights),
                ("trainable weights", self.trainable_weights),
                ("gradients", self.gradients),
                ("optimizer state", self.optimizer_state),
                ("activations", self.activations),
                ("sum", self.total),
                ("peak of a step", self.peak)]

    def table(self) -> str:
        return compare({f"{self.strategy} x{self.world_size}": self})

    def __repr__(self) -> str:
        return self.table()


def compare(estimates: dict[str, MemoryEstimate]) -> str:
    """A text table, one column per estimate (e.g. {"DDP": ..., "FSDP": ...}), in GiB per rank."""
    names = list(estimates)
    width = max(12, *(len(n) + 2 for n in names))
    lines = ["per rank, GiB".ljust(24) + "".join(n.rjust(width) for n in names)]
    for i, (label, _) in enumerate(next(iter(estimates.values())).rows()):
        cells = "".join(f"{e.rows()[i][1] / 2**30:{width}.2f}" for e in estimates.values())
        lines.append(label.ljust(24) + cells)
    return "\n".join(lines)


# ---- the pieces ---------------------------------------------------------------------------------------
def base_of(model: nn.Module) -> nn.Module:
    """The transformers model under a minipeft PeftModel (or the model itself)."""
    return getattr(model, "base_model", model) if hasattr(model, "peft_config") else model


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def dims(config) -> dict:
    """The shapes the activation formula needs, read from a transformers config."""
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None:
        raise ValueError(f"estimate knows the layers of model types {sorted(FAMILIES)}, "
                         f"not {getattr(config, 'model_type', None)!r}")
    h, a = config.hidden_size, config.num_attention_heads
    d = getattr(config, "head_dim", None) or h // a
    return dict(family=family, h=h, a=a, d=d, ad=a * d, k=getattr(config, "num_key_value_heads", None) or a,
                I=config.intermediate_size, L=config.num_hidden_layers, V=config.vocab_size,
                attention=getattr(config, "_attn_implementation", None) or "eager",
                hidden_dropout=getattr(config, "hidden_dropout_prob", 0.0) or 0.0,
                attention_dropout=(getattr(config, "attention_probs_dropout_prob", None)
                                   or getattr(config, "attention_dropout", 0.0) or 0.0))


def trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def active_lora(module: nn.Module):
    """(A, dropout) of a LoRA layer's active adapter, or None."""
    from .reparam.lora import LoRALinear

    if not isinstance(module, LoRALinear) or module.active is None:
        return None
    return module.lora_A[module.active], module.lora_dropout[module.active]


def site_bytes(modules: list[nn.Module], width: int, x_elem: int, e: dict, x_kept: bool = False) -> int:
    """Bytes per token the linear layers reading one input x (q/k/v, gate/up, ...) keep for backward.

    x is kept if a layer's own weight trains (x is dW's factor) or a LoRA A trains (x is dA's factor): once
    when the layers keep x itself (nothing more if x is kept already: ``x_kept``), but each layer keeps its
    own copy when it converts x first: autocast's bf16 cast of an fp32 x (made per call), or LoRA's
    ``x.to(A.dtype)`` for fp32 adapters on a bf16 base. LoRA also keeps A's output (r), and with dropout a
    dropped copy of x and the mask instead of x."""
    shared, own = False, 0
    cast = e["autocast"] and x_elem != 2
    for m in modules:
        lora = active_lora(m)
        base = m if lora is None else m.base_layer
        if trains(base):
            if cast:
                own += width * 2
            else:
                shared = True
        if lora is None or not trains(lora[0]):
            continue
        A, dropout = lora
        a_elem = 2 if e["autocast"] else A.weight.element_size()
        own += A.weight.shape[0] * a_elem  # A's output, B's input
        if isinstance(dropout, nn.Dropout):
            own += width * (a_elem + e["mask"])  # the dropped copy and its mask
        elif a_elem == x_elem and not cast:
            shared = True
        else:
            own += width * a_elem
    return (width * x_elem if shared and not x_kept else 0) + own


def layer_bytes_per_token(layer: nn.Module, D: dict, seq_len: int, e: dict, training: bool) -> int:
    """Bytes one block saves for backward, per token (see the module docstring for each term)."""
    h, ad, kd, I, a = D["h"], D["ad"], D["k"] * D["d"], D["I"], D["a"]
    fused = D["attention"] in FUSED_ATTENTION
    total = 0
    if D["family"] == "llama":
        total += 2 * h * 4 + 2 * 4  # the two RMSNorms' inputs, taken to fp32, and their 1/rms
        norms = [m for n, m in layer.named_children() if n.endswith("layernorm")]
        total += sum(h * e["stream"] for m in norms if trains(m))  # x̂ kept for the norm weight's gradient
        total += 3 * I * e["compute"]  # gate, SiLU(gate), up
        p_drop = D["attention_dropout"] if training else 0.0
    else:
        total += 2 * (h * e["stream"] + 2 * 4)  # LayerNorm inputs + mean, rstd
        total += I * e["compute"]  # GELU's input
        if training and D["hidden_dropout"] > 0:
            total += 2 * h * e["mask"]  # the two dropout masks
        p_drop = D["attention_dropout"] if training else 0.0
    # fused kernels on CPU fall back to the explicit softmax when they have to drop out probabilities
    fused = fused and (p_drop == 0 or not e["cpu"])
    if fused:
        total += (2 * ad + 2 * kd) * e["compute"] + a * 4  # q, k, v, output, log-sum-exp
    else:
        total += 3 * ad * e["compute"] + a * seq_len * e["compute"]  # q, k, v (a heads), probabilities
        if e["compute"] == 2 and D["family"] == "llama":
            total += a * seq_len * 4  # eager softmax in fp32, then a bf16 copy for the matmul
        if p_drop > 0:
            total += a * seq_len * (e["mask"] + e["compute"])  # dropout mask + dropped probabilities
    for site, (mods, width_key) in SITES[D["family"]].items():
        found = [layer.get_submodule(m) for m in mods if has_submodule(layer, m)]
        # the norms' outputs feed attn_in and mlp_in; the other sites read matmul outputs
        x_elem = e["stream"] if site in ("attn_in", "mlp_in") else e["compute"]
        # a fused kernel's output, seen as (b, s, a·d), is o_proj's input: kept above already
        total += site_bytes(found, D[width_key], x_elem, e, x_kept=fused and site == "attn_out")
    return total


def has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def blocks_of(base: nn.Module, family: str) -> list[nn.Module]:
    inner = base.model if family == "llama" else getattr(base, "bert", None) or getattr(base, "roberta", None)
    return list(inner.layers if family == "llama" else inner.encoder.layer)


def head_bytes_per_token(base: nn.Module, D: dict, e: dict) -> tuple[int, int, int]:
    """(saved bytes per token, loss transient per token, head weight-gradient bytes) of the output head."""
    h, V = D["h"], D["V"]
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None or not isinstance(head, nn.Module):  # sequence classification: terms of size b·h only
        return 0, 0, 0
    # the final norm's input and statistics (RMSNorm works in fp32; BERT: the MLM transform's LayerNorm)
    saved = h * (4 if D["family"] == "llama" else e["stream"]) + 4
    if D["family"] == "llama" and trains(base.model.norm):
        saved += h * e["stream"]  # x̂ for the final norm weight's gradient
    if D["family"] == "bert":
        saved += h * e["compute"]  # the MLM transform's dense output (GELU's input)
    if trains(head):
        saved += h * e["compute"]  # lm_head's input
    saved += V * 4  # log-softmax over the vocabulary, fp32
    head_grad = sum(nbytes(p) for p in head.parameters() if p.requires_grad)
    return saved, 2 * V * 4, head_grad


def activation_parts(model: nn.Module, batch_size: int, seq_len: int, e: dict,
                     gradient_checkpointing: bool) -> dict:
    base = base_of(model)
    D = dims(base.config)
    tokens = batch_size * seq_len
    training = model.training
    layers = [layer_bytes_per_token(b, D, seq_len, e, training) * tokens for b in blocks_of(base, D["family"])]
    head, transient, head_grad = head_bytes_per_token(base, D, e)
    embed = base.get_input_embeddings()
    parts = {"head": head * tokens, "loss_transient": transient * tokens, "head_gradient": head_grad,
             "embedding": (8 * tokens if trains(embed) else 0)}  # token ids kept for the embedding's gradient
    if D["family"] == "bert":
        parts["embedding"] += tokens * (D["h"] * e["stream"] + 8
                                        + (D["h"] * e["mask"] if training and D["hidden_dropout"] else 0))
    if e["autocast"]:  # the bf16 copy of each linear weight is kept for backward (of one layer at a time
        # when the layers are recomputed)
        copies = [sum(m.weight.numel() * 2 for m in b.modules() if isinstance(m, nn.Linear))
                  for b in blocks_of(base, D["family"])]
        head_module = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        head_copy = head_module.weight.numel() * 2 if isinstance(head_module, nn.Linear) else 0
        parts["autocast_weight_copies"] = (max(copies) if gradient_checkpointing else sum(copies)) + head_copy
    if gradient_checkpointing:
        parts["layer_inputs"] = len(layers) * D["h"] * e["stream"] * tokens
        parts["one_layer_recomputed"] = max(layers)
    else:
        parts["layers"] = sum(layers)
    parts["per_layer"] = max(layers)
    return parts


def elements(model: nn.Module, bf16: bool, device: str | None) -> dict:
    """Element sizes of the activations: the residual stream, the matmuls' inputs and outputs, dropout masks.

    A dropout mask is 1 byte (bool) from CUDA's fused kernel, but on the CPU dropout multiplies by a mask of
    the input's dtype. A model on the meta device is taken to be planned for a GPU."""
    first = next(iter(model.parameters()))
    device = device or ("cuda" if first.device.type == "meta" else first.device.type)
    weight = first.element_size()
    compute = 2 if bf16 else weight
    cpu = device == "cpu"
    return {"stream": weight, "compute": compute, "mask": compute if cpu else 1, "cpu": cpu,
            "autocast": bf16 and weight != 2}


# ---- the estimate ---------------------------------------------------------------------------------------
def estimate(model: nn.Module, batch_size: int, seq_len: int, *, optimizer: str = "adamw", bf16: bool = False,
             gradient_checkpointing: bool = False, world_size: int = 1, strategy: str = "none",
             device: str | None = None) -> MemoryEstimate:
    """Bytes per rank to train `model` on (batch_size × seq_len) token batches (see the module docstring).

    bf16: autocast to bfloat16 with fp32 weights (the Trainer's ``bf16=True``). A model loaded in bf16 is
    read from its weights. strategy: "none" (one process), "ddp" or "fsdp" over `world_size` ranks;
    batch_size is per rank. The model's train/eval mode decides whether dropout counts. device: "cpu" or
    "cuda" (default: where the model is; the meta device counts as "cuda")."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose from {sorted(OPTIMIZERS)}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {list(STRATEGIES)}")
    for field, value in (("batch_size", batch_size), ("seq_len", seq_len), ("world_size", world_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{field} must be a positive integer, got {value!r}")
    if strategy == "none" and world_size != 1:
        raise ValueError(f"world_size={world_size} needs strategy 'ddp' or 'fsdp' (strategy='none' is one process)")
    params = list(model.parameters())
    if not any(p.requires_grad for p in params):
        raise ValueError("the model has no parameter with requires_grad=True: nothing to train")
    frozen = sum(nbytes(p) for p in params if not p.requires_grad)
    trainable = sum(nbytes(p) for p in params if p.requires_grad)
    grads, state = trainable, OPTIMIZERS[optimizer] * trainable
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or None, got {device!r}")
    parts = activation_parts(model, batch_size, seq_len, elements(model, bf16, device), gradient_checkpointing)
    acts = sum(v for k, v in parts.items() if k not in ("loss_transient", "head_gradient", "per_layer"))
    extra = 0
    if strategy == "ddp":
        extra = grads  # the reducer's bucket copy of the gradients
    elif strategy == "fsdp":
        layer_weights = max(sum(nbytes(p) for p in b.parameters())
                            for b in blocks_of(base_of(model), dims(base_of(model).config)["family"]))
        # as minipeft's Trainer shards (minipeft.distributed): the frozen base in world_size shards; the trainable
        # tensors stay whole on every rank (an adapter is tiny), so their gradients and AdamW state do too
        frozen = -(-frozen // world_size)
        extra = layer_weights  # one layer's weights gathered while it runs
    parts["strategy_extra"] = extra
    backward = acts + parts["loss_transient"] + parts["head_gradient"]
    step = 2 * grads  # all gradients + the optimizer's temporaries (one more copy)
    peak = frozen + trainable + state + extra + max(backward, step)
    return MemoryEstimate(frozen, trainable, grads + (extra if strategy == "ddp" else 0), state, acts, peak,
                          strategy, world_size, parts)


__all__ = ["MemoryEstimate", "estimate", "compare", "OPTIMIZERS", "STRATEGIES"]
