r"""LoRA: Low-Rank Adaptation (Hu et al., 2021, arXiv:2106.09685).

A frozen linear layer $W_0 \in \mathbb{R}^{d_{out} \times d_{in}}$ gets a trainable low-rank update:

    y = W0 x + s · B A dropout(x),      A ∈ R^{r×d_in},  B ∈ R^{d_out×r},   s = α / r   (rsLoRA: α / √r)

Code names: W0 = `base_layer.weight`, A = `lora_A[name].weight` (r, d_in), B = `lora_B[name].weight`
(d_out, r), s = `scaling[name]` — peft's names and shapes, so a reader can map one onto the other.

Init: B = 0, so BA = 0 and the wrapped model starts exactly at the base model; A is kaiming-uniform
(a=√5, as loralib and peft) or Gaussian N(0, 1/r²).
Merge: W = W0 + s·BA — after merging, inference costs nothing extra.
Trainable parameters per layer: r·(d_in + d_out).
Gradients (seed 004): with g_ΔW = g_y xᵀ,  g_B = s·g_ΔW Aᵀ  and  g_A = s·Bᵀ g_ΔW.

GPT-2's Conv1D stores its weight transposed, (d_in, d_out); merging transposes ΔW to match.
A 4-bit base (minipeft.quant.Linear4bit) is wrapped the same way; merging into it re-quantizes (lossy).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import targeting
from ..config import PeftConfig, check_choice, check_positive, check_positive_int, check_probability, register
from ..layer import AdapterLayer


@register
@dataclass
class LoRAConfig(PeftConfig):
    r: int = 8  # rank of the update; the paper finds r = 1..8 enough on W_q, W_v
    alpha: float = 8  # scale numerator: s = alpha / r (peft's default alpha = 8)
    dropout: float = 0.0  # dropout on the LoRA branch's input only
    init: str = "kaiming"  # A's init: "kaiming" (uniform, a=√5) or "gaussian" (N(0, 1/r²)); B is always 0
    rslora: bool = False  # rank-stabilised scaling s = alpha / √r (Kalajdzievski 2023)

    method = "lora"

    def validate(self):
        check_positive_int("r", self.r)
        check_positive("alpha", self.alpha)
        check_probability("dropout", self.dropout)
        check_choice("init", self.init, {"kaiming", "gaussian"})

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    @property
    def allowed_types(self):
        return targeting.LINEAR_TYPES

    def default_target(self, model):
        return targeting.default_target(model, "attention_qv", self.method)

    def make_layer(self, module):
        return LoRALinear(module)

    def layer_type(self):
        return LoRALinear


def linear_dims(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of nn.Linear, GPT-2 Conv1D or a linear-like layer with in/out_features."""
    if isinstance(layer, targeting.Conv1D):
        d_in, d_out = layer.weight.shape
        return d_in, d_out
    return layer.in_features, layer.out_features


def get_base_weight(layer: nn.Module) -> torch.Tensor:
    """The base weight in PyTorch layout (d_out, d_in)."""
    if hasattr(layer, "dequantize"):
        return layer.dequantize()
    return layer.weight.T if isinstance(layer, targeting.Conv1D) else layer.weight


@torch.no_grad()
def add_to_base_weight(layer: nn.Module, delta: torch.Tensor) -> None:
    """W0 += delta, with delta in (d_out, d_in) layout; lossy for a quantized base."""
    if hasattr(layer, "set_weight"):
        layer.set_weight(layer.dequantize().float() + delta.float())
    elif isinstance(layer, targeting.Conv1D):
        layer.weight += delta.T.to(layer.weight.dtype)
    else:
        layer.weight += delta.to(layer.weight.dtype)


class LoRALinear(AdapterLayer):
    adapter_dicts = ("lora_A", "lora_B", "lora_dropout")
    adapter_values = ("scaling",)
    can_merge = True

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.in_features, self.out_features = linear_dims(base_layer)
        self.lora_A, self.lora_B, self.lora_dropout = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.scaling: dict[str, float] = {}

    def add_adapter(self, name: str, config: LoRAConfig) -> None:
        device, dtype = self.base_device_dtype()
        self.lora_A[name] = nn.Linear(self.in_features, config.r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(config.r, self.out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling[name] = config.scaling
        self.reset_adapter(name, config.init)

    @torch.no_grad()
    def reset_adapter(self, name: str, init: str = "kaiming") -> None:
        A = self.lora_A[name].weight
        if init == "gaussian":
            nn.init.normal_(A, std=1.0 / A.shape[0])
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)  # B = 0: the update BA starts at zero

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = s · B A, shape (d_out, d_in)."""
        return self.scaling[name] * self.lora_B[name].weight @ self.lora_A[name].weight

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        name = self.active
        if name is None:
            return y
        A, B = self.lora_A[name], self.lora_B[name]
        h = A(self.lora_dropout[name](x.to(A.weight.dtype)))  # (..., r)
        return y + (B(h) * self.scaling[name]).to(y.dtype)  # (..., d_out)

    def merge(self, name: str) -> None:
        add_to_base_weight(self.base_layer, self.delta_weight(name))
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            add_to_base_weight(self.base_layer, -self.delta_weight(self.merged_adapters.pop()))


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0):
    """LoRA+ (Hayou et al., 2024): the B matrices learn `ratio` (λ) times faster than the A matrices.

    Returns optimizer parameter groups: A (lr), B and any other 1-D trainable tensor (lr·λ, as peft does),
    and everything else trainable (lr). Use: torch.optim.AdamW(loraplus_param_groups(model, 2e-4)).
    """
    check_positive("lr", lr)
    check_positive("ratio", ratio)
    groups = {"A": [], "B": [], "other": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".lora_B." in name or p.ndim == 1:
            groups["B"].append(p)
        elif ".lora_A." in name:
            groups["A"].append(p)
        else:
            groups["other"].append(p)
    if not groups["A"] and not groups["B"]:
        raise ValueError("no trainable LoRA parameters found: wrap the model with mp.LoRAConfig first")
    lrs = {"A": lr, "B": lr * ratio, "other": lr}
    return [{"params": ps, "lr": lrs[k], "weight_decay": weight_decay, "name": k}
            for k, ps in groups.items() if ps]
