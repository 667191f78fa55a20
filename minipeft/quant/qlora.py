r"""QLoRA: LoRA on a 4-bit NF4 base (Dettmers et al., 2023, arXiv:2305.14314).

The base model is frozen and stored in 4-bit NormalFloat (NF4) with double quantization; LoRA adapters on
every linear layer are the only trainable weights:

    Y = X · dequant(dequant(c1, c2), W_NF4)ᵀ + s · X Aᵀ Bᵀ,        s = α / r

Code names: W_NF4, c2, c1 = the buffers of `base_layer` (a `Linear4bit`: weight_packed, weight_absmax,
weight_absmax_scale); A, B, s = `lora_A[name].weight`, `lora_B[name].weight`, `scaling[name]` as in LoRA.

    model = mp.wrap(base, mp.QLoRAConfig(r=8))   # quantizes every linear layer but the head, adds LoRA

What `prepare_model` does: every nn.Linear (and GPT-2 Conv1D) of the base becomes a `Linear4bit`
(NF4, blocks of 64, double quantization: ≈ 4.127 bits ≈ 0.516 bytes per weight). Embeddings, norms and the
output head (lm_head, or a classifier head) keep their precision, as in bitsandbytes/peft. Calling it on an
already quantized base changes nothing (only the compute dtype is set).

Defaults (paper → here): target all linear layers (paper: "LoRA on all linear layers is needed to match
16-bit"), α = 16 and dropout 0.1 (paper's values for models up to 13B), r = 8 (paper: 64, for 7B–65B models
whose width is 4096+; our tiny models are 128 wide). compute_dtype "float32" (bitsandbytes' default; the
paper uses "bfloat16" — set it on a GPU). The LoRA weights themselves stay fp32 ("master weights", as peft's
prepare_model_for_kbit_training does); they are r·(d_in + d_out) numbers per layer, so this costs little.

Memory in training: the dequantized weight of a layer is needed in the forward pass and again in the
backward pass (for the input gradient). Keeping it between the two would hold a full-precision copy of every
layer until backward — the memory QLoRA is meant to save. `Linear4bit.forward` dequantizes twice instead (as
bitsandbytes' MatMul4Bit does): a little more compute, only one layer's dequantized weight alive at a time.

There is no QLoRA layer class: the adapter is the ordinary `LoRALinear`, which calls its base layer's own
forward, so every LoRA variant (DoRA, ...) runs on a 4-bit base as it is.

MERGING IS LOSSY. `model.merge()` computes W0' = Q(dequant(W0) + sBA): the sum is re-quantized to NF4, so
every weight is rounded a second time (up to half a code gap times the block's absmax, ≈ 14% of it): the
merged model carries a second quantization error about as large as the first, which can be a sizeable
fraction of the LoRA update itself (tiny-llama, 150 steps: ≈ 0.2×). `merge_error` measures it. What users usually want is the plain-precision merge:
`dequantize_and_merge(model, torch.bfloat16)` returns an unquantized model with W = dequant(W0) + sBA exactly.
`unmerge()` restores the original 4-bit weights bit for bit (the spine keeps every merged layer's state).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import targeting
from ..config import check_choice, check_positive_int, register
from ..layer import AdapterLayer
from ..reparam.lora import LoRAConfig, LoRALinear
from .linear4bit import Conv1D, Linear4bit
from .nf4 import CODES, dequantize_4bit

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register
@dataclass
class QLoRAConfig(LoRAConfig):
    target: str | list[str] | None = "all-linear"  # the paper: LoRA on every linear layer
    alpha: float = 16  # the paper's α (with r = 64 there; s = α/r)
    dropout: float = 0.1  # the paper's value for models up to 13B
    compute_dtype: str = "float32"  # dtype of the dequantized weight and matmul; "bfloat16" on a GPU
    double_quant: bool = True  # quantize the block scales too: 4.5 → ≈ 4.127 bits per weight
    quant_type: str = "nf4"  # 4-bit code book: "nf4" (paper), "fp4", "fp4_bnb", "int4" for comparisons
    blocksize: int = 64  # weights per absmax block (paper: 64)

    method = "qlora"

    def validate(self):
        super().validate()
        check_choice("compute_dtype", self.compute_dtype, set(DTYPES))
        check_choice("quant_type", self.quant_type, set(CODES))
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"double_quant must be True or False, got {self.double_quant!r}")
        check_positive_int("blocksize", self.blocksize)
        if self.blocksize % 2:
            raise ValueError(f"blocksize must be even (two 4-bit codes per byte), got {self.blocksize}")

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        return DTYPES[self.compute_dtype]

    def prepare_model(self, model: nn.Module) -> None:
        skip = targeting.output_head_names(model) | set(self.modules_to_save or [])
        quantize_base(model, self.torch_compute_dtype, self.double_quant, self.quant_type, self.blocksize, skip)



@torch.no_grad()
def quantize_base(model: nn.Module, compute_dtype: torch.dtype = torch.float32, double_quant: bool = True,
                  quant_type: str = "nf4", blocksize: int = 64, skip=()) -> int:
    """Replace every nn.Linear / Conv1D of `model` (names in `skip` and their children excepted) by a frozen
    Linear4bit, in place; return how many were replaced. Existing Linear4bit layers keep their codes and get
    `compute_dtype`. A linear layer already wrapped by another adapter is an error (quantize first)."""
    kinds = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())
    skipped = lambda n: any(n == s or n.endswith("." + s) or n.startswith(s + ".") for s in skip)  # noqa: E731
    todo = []
    for name, module in targeting.named_base_modules(model):
        base = targeting.unwrap(module)
        if isinstance(base, Linear4bit):
            base.compute_dtype = compute_dtype
        elif isinstance(module, AdapterLayer) and isinstance(base, kinds) \
                and not skipped(name):
            raise ValueError(f"{name} already carries a {type(module).__name__} on an unquantized layer; "
                             f"add the QLoRA adapter first (it quantizes the base), or use a fresh base model")
        elif isinstance(module, kinds) and not skipped(name):
            todo.append(name)
    for name in todo:
        parent, _, child = name.rpartition(".")
        layer = Linear4bit.from_linear(model.get_submodule(name), compute_dtype, double_quant, quant_type, blocksize)
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    return len(todo)


def _logits(model, inputs):
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return (out.logits if hasattr(out, "logits") else out).float()


@torch.no_grad()
def merge_error(model, inputs, adapter_name: str | None = None) -> dict:
    """What `model.merge()` loses on a 4-bit base. Merges, measures, then unmerges (exactly).

    inputs: a tensor of input ids or a dict of model inputs. Returns
      logit_max_abs, logit_mean_abs: |logits(merged) − logits(unmerged)|;
      weight_rel_error: ‖Q(W) − W‖_F / ‖W‖_F over all merged layers, W = dequant(W0) + sBA (the intended weight;
        a LoRA variant's own merged weight, e.g. DoRA's);
      update_rel_error: the same error relative to ‖W − dequant(W0)‖_F (‖sBA‖_F for LoRA) — above 1, the merge
        loses more than the update adds.
    """
    name = adapter_name or model.active_adapter
    layers = [lay for _, lay in model.adapter_layers()
              if isinstance(lay, LoRALinear) and isinstance(lay.base_layer, Linear4bit) and name in lay.adapter_names()]
    if not layers:
        raise ValueError("merge_error needs a model with QLoRA layers on a 4-bit base (mp.QLoRAConfig)")
    model.set_adapter(name)
    before = _logits(model, inputs)
    W0 = [dequantize_4bit(lay.base_layer.quant_state, torch.float32) for lay in layers]
    intended = [lay.merged_weight(name, w) for lay, w in zip(layers, W0)]  # W0 + sBA; a variant's own (DoRA)
    model.merge(name)
    try:
        after = _logits(model, inputs)
        merged = [dequantize_4bit(lay.base_layer.quant_state, torch.float32) for lay in layers]
    finally:
        model.unmerge()
    err2 = sum((m - w).pow(2).sum() for m, w in zip(merged, intended))
    w2 = sum(w.pow(2).sum() for w in intended)
    d2 = sum((w - w0).pow(2).sum() for w, w0 in zip(intended, W0))  # the update the merge should add
    diff = (after - before).abs()
    return {"logit_max_abs": diff.max().item(), "logit_mean_abs": diff.mean().item(),
            "weight_rel_error": (err2 / w2).sqrt().item(),
            "update_rel_error": (err2 / d2).sqrt().item() if d2 > 0 else float("inf")}


@torch.no_grad()
def dequantize_and_merge(model, dtype: torch.dtype | str = torch.bfloat16, adapter_name: str | None = None) -> nn.Module:
    """The plain-precision merge: return the base model with every 4-bit layer replaced by an nn.Linear in
    `dtype` holding W = dequant(W0) + s·BA (computed in fp32, then cast) and no adapter layers left.

    Modifies the model in place (like merge_and_unload); the PeftModel is spent afterwards. Layers that
    were GPT-2 Conv1D come back as nn.Linear (same function, weight stored transposed)."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype}")
    name = adapter_name or model.active_adapter
    model.check_adapter_name(name)
    if any(lay.merged_adapters for _, lay in model.adapter_layers()):
        raise ValueError("an adapter is merged into the 4-bit weights (lossy); call model.unmerge() first")
    for path, lay in model.adapter_layers():
        if isinstance(lay, LoRALinear):
            W = _dense_weight(lay.base_layer)
            if name in lay.adapter_names():
                W = lay.merged_weight(name, W)  # W0 + sBA for LoRA; a variant's own merge (DoRA)
            model.replace_module(path, _linear_like(lay.base_layer, W, dtype))
        else:  # e.g. a trained classifier head (modules_to_save)
            lay.merge(name)
            model.replace_module(path, lay.base_layer)
    for path, module in list(model.base_model.named_modules()):
        if isinstance(module, Linear4bit):  # quantized layers that carried no adapter
            model.replace_module(path, _linear_like(module, _dense_weight(module), dtype))
    return model.base_model


def _dense_weight(layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, Linear4bit):
        return dequantize_4bit(layer.quant_state, torch.float32)  # fp32, whatever the compute dtype
    return (layer.weight.T if Conv1D is not None and isinstance(layer, Conv1D) else layer.weight).float()


def _linear_like(layer: nn.Module, W: torch.Tensor, dtype: torch.dtype) -> nn.Linear:
    bias = getattr(layer, "bias", None)
    out = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None, device=W.device, dtype=dtype)
    out.weight.copy_(W.to(dtype))
    if bias is not None:
        out.bias.copy_(bias.to(dtype))
    return out.requires_grad_(False)


__all__ = ["QLoRAConfig", "quantize_base", "merge_error", "dequantize_and_merge"]
