r"""LoRA-FA: LoRA with a Frozen-A (Zhang et al., 2023, arXiv:2308.03303 v1, "Memory-efficient Low-rank
Adaptation for Large Language Models Fine-tuning").

LoRA's update with the down-projection A drawn at random and never trained; only B trains:

    y = W0 x + s · B A x,      A ∈ R^{r×d_in} frozen,  B ∈ R^{d_out×r} trainable (init 0),  s = α / r

Code names as in LoRA (peft's names, so a LoRA-FA adapter file reads like a LoRA one): A = `lora_A[name].weight`
(here a buffer: frozen tensors are buffers), B = `lora_B[name].weight`, s = `scaling[name]`.

Why it saves memory. B's gradient is g_B = s · g_y (A x)ᵀ: it needs the r-dim vector A x, not the d_in-dim
input x. LoRA also trains A, whose gradient g_A = s · Bᵀ g_y xᵀ needs x, so autograd keeps x of every adapted
layer until the backward pass. With A frozen nothing needs x: autograd saves only A x (r numbers per token),
plus A itself (a weight, already in memory). Plain PyTorch already does this — a linear op saves its input
only when its weight requires grad (checked with `saved_activation_bytes` below and in tests/test_lora_fa.py)
— so the layer is LoRA's code with A turned into a buffer; no custom autograd function is needed.

Init: A kaiming-uniform (as LoRA; `init="gaussian"` as in LoRA), B = 0: the model starts at the base.
Merge: W = W0 + s·BA, as LoRA. Trainable parameters per layer: r·d_out.

What we measure: `saved_activation_bytes` counts what autograd keeps (here in fp32); the paper's claim
(abstract of v1: up to 1.4× less overall memory than LoRA) is about GPU memory with its own precision and
models. Differences from peft: peft ships "LoRA-FA" as an optimizer (`peft.optimizers.create_lorafa_optimizer`)
implementing the paper's later version (v2, 2025), which also corrects B's gradient with (A Aᵀ)⁻¹; this file
is v1's method: A frozen, B trained by any optimizer. Only linear layers (nn.Linear, GPT-2 Conv1D, 4-bit).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import targeting
from ..config import register
from .lora import LoRAConfig, LoRALinear


@register
@dataclass
class LoRAFAConfig(LoRAConfig):
    """LoRA's fields (r, alpha, dropout, init, rslora, rank/alpha patterns); A is frozen after its init."""

    method = "lora_fa"

    @property
    def base_types(self):
        return targeting.LINEAR_TYPES  # the paper adapts linear layers; an embedding has no input x to save

    @property
    def layer_class(self):
        return LoRAFALinear


class FrozenProjection(nn.Module):
    """A bias-free linear map whose weight is a buffer: x → x Aᵀ. Same state-dict key ("weight") as nn.Linear."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)  # (r, d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)  # (..., r)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, frozen"


class LoRAFALinear(LoRALinear):
    """LoRA's layer with A frozen: `init_adapter` swaps the freshly initialised A for a buffer."""

    @torch.no_grad()
    def init_adapter(self, name: str, config: LoRAFAConfig) -> None:
        self.lora_A[name] = FrozenProjection(self.lora_A[name].weight.detach().clone())


def saved_activation_bytes(model: nn.Module, *args, **kwargs) -> int:
    """Bytes autograd keeps for the backward pass after one forward `model(*args, **kwargs)`.

    Every tensor the forward saves for backward passes through `torch.autograd.graph.saved_tensors_hooks`;
    we count each underlying storage once (a view and its base, or q/k/v's shared input, are one block of
    memory) and leave out the model's own parameters and buffers (in memory whether or not we train). What is
    left is the activation memory of training: it grows with batch × sequence length, the weights do not."""
    own = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*args, **kwargs)  # kept alive until counted: its graph holds the saved tensors
    total = sum(kept.values())
    del out
    return total


__all__ = ["LoRAFAConfig", "LoRAFALinear", "FrozenProjection", "saved_activation_bytes"]
