r"""MoSLoRA: Mixture-of-Subspaces in Low-Rank Adaptation (Wu, Wang, Zhao, Wong, 2024, arXiv:2406.11909).

LoRA's update is a sum of r rank-one pieces, one per "subspace": s·BA = s·Σ_i b_i a_iᵀ (b_i the columns
of B, a_iᵀ the rows of A). MoSLoRA puts a trainable r×r mixer M between the two factors,

    y = W0 x + s · B M A dropout(x),      A ∈ R^{r×d_in},  M ∈ R^{r×r},  B ∈ R^{d_out×r},  s = α / r

so ΔW = s·BMA = s·Σ_ij M_ij b_i a_jᵀ: every output direction b_i may pair with every input direction
a_j. M = I gives LoRA back exactly; the paper's two-subspace "mixing" is a fixed M, MoSLoRA learns it.
The rank of ΔW is still at most r: the mixer changes which rank-r matrices are easy to reach, not how many.

Code names: A = `lora_A[name].weight` (r, d_in), B = `lora_B[name].weight` (d_out, r) and s =
`scaling[name]` as in LoRA (peft's names); M = `lora_AB[name].weight` (r, r), the official code's name
(wutaiqiang/MoSLoRA, a `lora_use_mixer` switch in its copy of peft's LoRA layer; peft has no MoSLoRA).

Init (as the official code): A and M kaiming-uniform (a=√5, so M ~ U(±1/√r)), B = 0; the model starts
exactly at the base. `init="gaussian"` changes A only (N(0, 1/r²)), as in LoRA.
Merge: W = W0 + s·BMA (exact; the spine keeps W0 for unmerge).
Trainable parameters per layer: r·(d_in + d_out) + r².
Differences from the official code: none in the function; the mixer lives beside A and B rather than
folded into a `get_weight_A` helper, and there is no embedding version.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import targeting
from ..config import register
from .lora import LoRAConfig, LoRALinear


@register
@dataclass
class MoSLoRAConfig(LoRAConfig):
    method = "moslora"

    @property
    def base_types(self):
        return targeting.LINEAR_TYPES  # linear layers only, as the official code

    @property
    def layer_class(self):
        return MoSLoRALinear


class MoSLoRALinear(LoRALinear):
    adapter_dicts = LoRALinear.adapter_dicts + ("lora_AB",)

    def __init__(self, base_layer: nn.Module, path: str = ""):
        super().__init__(base_layer, path)
        self.lora_AB = nn.ModuleDict()  # the mixer M, one (r, r) nn.Linear per adapter

    @torch.no_grad()
    def init_adapter(self, name: str, config: MoSLoRAConfig) -> None:
        device, dtype = self.base_device_dtype()
        r = self.lora_A[name].weight.shape[0]
        self.lora_AB[name] = nn.Linear(r, r, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_AB[name].weight, a=math.sqrt(5))  # U(±1/√r), as the official code

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = s · B M A, shape (d_out, d_in)."""
        A, M, B = self.lora_A[name].weight, self.lora_AB[name].weight, self.lora_B[name].weight
        return self.scaling[name] * B @ (M @ A)

    def lora_branch(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """s · B M A dropout(x): (..., d_in) → (..., r) → (..., r) → (..., d_out)."""
        A, M, B = self.lora_A[name], self.lora_AB[name], self.lora_B[name]
        return B(M(A(self.lora_dropout[name](x.to(A.weight.dtype))))) * self.scaling[name]


__all__ = ["MoSLoRAConfig", "MoSLoRALinear"]
