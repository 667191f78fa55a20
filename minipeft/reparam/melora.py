r"""MELoRA: Mini-Ensemble Low-Rank Adapters (Ren et al., 2024, arXiv:2402.17263).

LoRA's update s·BA has rank at most r. MELoRA splits the input x ∈ R^{d_in} into n equal slices
x_1, …, x_n (d_in/n each) and gives each slice its own mini-LoRA of rank r that writes only the matching
slice of the output (d_out/n each); the n outputs are concatenated:

    y = W0 x + s · [B_1 A_1 x_1 ; … ; B_n A_n x_n],      A_i ∈ R^{r×d_in/n},  B_i ∈ R^{d_out/n×r},  s = α / r

so the update is block-diagonal:  ΔW = s · blockdiag(B_1 A_1, …, B_n A_n)  (d_out × d_in).
Each block has rank ≤ r, so rank ΔW ≤ n·r, while the minis hold n · r(d_in/n + d_out/n) = r(d_in + d_out)
numbers: the parameters of one LoRA of rank r, the rank of a LoRA of rank n·r.

Code names: the n minis are stacked in two tensors, A = `lora_A[name]` (n, r, d_in/n) and
B = `lora_B[name]` (n, d_out/n, r), and applied with two einsums (no Python loop over minis);
s = `scaling[name]`, n = `n_minis[name]`. peft has no MELoRA; `lora_A`/`lora_B` follow its LoRA names.

Init (as the official code, ChasonShi/MELoRA, which builds each mini as an nn.Linear pair): every A_i is
kaiming-uniform (a=√5) with its own fan-in d_in/n, i.e. U(−1/√(d_in/n), 1/√(d_in/n)); every B_i = 0, so
the model starts exactly at the base. `init="gaussian"` draws A_i ~ N(0, 1/r²) as LoRA's option does.
Scaling: α/r with r the rank of one mini, the same for every mini (the official code allows one α and one
r per mini; here all minis share them, as the official training scripts set them).
Merge: W = W0 + ΔW with the block-diagonal ΔW above (exact; the spine keeps W0 for unmerge).
Trainable parameters per layer: r·(d_in + d_out). Requires n to divide d_in and d_out (checked when the layer
is built, naming the module).
Differences from the official code: the minis are two batched tensors instead of 2n nn.Linear modules
(same function); dropout is one mask on the whole input rather than one module per mini (same distribution);
inputs of any number of leading dimensions are accepted (the official forward slices x[:, :, …]).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import targeting
from ..config import check_positive_int, register
from .lora import LoRAConfig, LoRALinear


@register
@dataclass
class MELoRAConfig(LoRAConfig):
    n: int = 4  # number of mini-LoRAs; each has rank r, so ΔW has rank up to n·r for r(d_in + d_out) parameters

    method = "melora"

    def validate(self):
        super().validate()
        check_positive_int("n", self.n)

    @property
    def base_types(self):
        return targeting.LINEAR_TYPES  # no embeddings: a table's rows are not slices of one input vector

    @property
    def layer_class(self):
        return MELoRALinear


class MELoRALinear(LoRALinear):
    adapter_values = LoRALinear.adapter_values + ("n_minis",)

    def __init__(self, base_layer: nn.Module, path: str = ""):
        super().__init__(base_layer, path)
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()  # stacked minis, not nn.Linear
        self.n_minis: dict[str, int] = {}

    def add_adapter(self, name: str, config: MELoRAConfig) -> None:
        n, r = config.n, config.r_for(self.path)
        for field, d in (("in_features", self.in_features), ("out_features", self.out_features)):
            if d % n:
                raise ValueError(f"n={n} must divide the layer's {field} ({d}) of module {self.path!r}: "
                                 f"MELoRA splits them into n equal slices")
        device, dtype = self.base_device_dtype()
        k, o = self.in_features // n, self.out_features // n
        self.lora_A[name] = nn.Parameter(torch.empty(n, r, k, device=device, dtype=dtype))  # (n, r, d_in/n)
        self.lora_B[name] = nn.Parameter(torch.zeros(n, o, r, device=device, dtype=dtype))  # (n, d_out/n, r)
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling[name] = config.scaling_for(self.path)
        self.n_minis[name] = n
        self.reset_adapter(name, config.init)
        self.init_adapter(name, config)

    @torch.no_grad()
    def reset_adapter(self, name: str, init: str = "kaiming") -> None:
        A = self.lora_A[name]  # (n, r, d_in/n)
        if init == "gaussian":
            nn.init.normal_(A, std=1.0 / A.shape[1])
        else:  # kaiming-uniform (a=√5) of each mini, fan-in d_in/n: U(±1/√(d_in/n))
            bound = 1.0 / math.sqrt(A.shape[2])
            nn.init.uniform_(A, -bound, bound)
        nn.init.zeros_(self.lora_B[name])  # B_i = 0: every mini starts at zero

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = s · blockdiag(B_1 A_1, …, B_n A_n), shape (d_out, d_in)."""
        A, B, n = self.lora_A[name], self.lora_B[name], self.n_minis[name]
        blocks = B @ A  # (n, d_out/n, d_in/n): B_i A_i
        eye = torch.eye(n, device=A.device, dtype=A.dtype)
        dense = torch.einsum("iok,ij->iojk", blocks, eye)  # block (i, j) is δ_ij B_i A_i: (n, d_out/n, n, d_in/n)
        return self.scaling[name] * dense.reshape(self.out_features, self.in_features)

    def lora_branch(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """s · [B_1 A_1 x_1; …; B_n A_n x_n]: (..., d_in) → (..., d_out)."""
        A, B, n = self.lora_A[name], self.lora_B[name], self.n_minis[name]
        x = self.lora_dropout[name](x.to(A.dtype))
        xs = x.reshape(*x.shape[:-1], n, -1)  # (..., n, d_in/n): slice i feeds mini i
        h = torch.einsum("...nk,nrk->...nr", xs, A)  # (..., n, r)
        y = torch.einsum("...nr,nor->...no", h, B)  # (..., n, d_out/n)
        return y.reshape(*x.shape[:-1], self.out_features) * self.scaling[name]


__all__ = ["MELoRAConfig", "MELoRALinear"]
