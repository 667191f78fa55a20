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

LoRA variants (DoRA, AdaLoRA, ...) subclass `LoRALinear` and override one small piece:
  `init_adapter(name, config)`  extra tensors beside A and B (DoRA's magnitude m),
  `delta_weight(name)`          ΔW, when the update is not s·BA (AdaLoRA's s·P diag(λ) Q),
  `adapted(name, x, y)`         the output given the base output y = W0 x (DoRA's rescaling),
  `merged_weight(name, W0)`     W after merging, when it is not W0 + ΔW (DoRA).
The base call is the base layer's own forward, so any base composes with any variant: GPT-2's Conv1D
(read through `minipeft.weights`), the 4-bit `Linear4bit` (QLoRA), an `nn.Embedding` (`LoRAEmbedding`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import targeting
from ..config import PeftConfig, check_choice, check_positive, check_positive_int, check_probability, register
from ..layer import AdapterLayer, gather_rows, pick_rows
from ..weights import base_weight, linear_dims, set_base_weight


@register
@dataclass
class LoRAConfig(PeftConfig):
    r: int = 8  # rank of the update; the paper finds r = 1..8 enough on W_q, W_v
    alpha: float = 8  # scale numerator: s = alpha / r (peft's default alpha = 8)
    dropout: float = 0.0  # dropout on the LoRA branch's input only
    init: str = "kaiming"  # A's init: "kaiming" (uniform, a=√5) or "gaussian" (N(0, 1/r²)); B is always 0
    rslora: bool = False  # rank-stabilised scaling s = alpha / √r (Kalajdzievski 2023)
    rank_pattern: dict | None = None  # per-module r: {"down_proj": 16, r"layers\.0\..*": 4} (peft's keys)
    alpha_pattern: dict | None = None  # per-module alpha, same keys

    method = "lora"

    def validate(self):
        check_positive_int("r", self.r)
        check_positive("alpha", self.alpha)
        check_probability("dropout", self.dropout)
        check_choice("init", self.init, {"kaiming", "gaussian"})
        for field, check in (("rank_pattern", check_positive_int), ("alpha_pattern", check_positive)):
            pattern = getattr(self, field)
            if pattern is None:
                continue
            if not isinstance(pattern, dict):
                raise ValueError(f"{field} must be a dict {{module name or regex: value}}, got {pattern!r}")
            for key, value in pattern.items():
                check(f"{field}[{key!r}]", value)

    @staticmethod
    def _lookup(pattern: dict | None, path: str, default):
        """peft's rule: the first key that matches the end of the module path (as a regex) wins."""
        for key, value in (pattern or {}).items():
            if re.match(rf"(.*\.)?({key})$", path):
                return value
        return default

    def r_for(self, path: str) -> int:
        return self._lookup(self.rank_pattern, path, self.r)

    def scaling_for(self, path: str) -> float:
        r, alpha = self.r_for(path), self._lookup(self.alpha_pattern, path, self.alpha)
        return alpha / (math.sqrt(r) if self.rslora else r)

    @property
    def scaling(self) -> float:
        return self.scaling_for("")

    @property
    def base_types(self):
        return targeting.LINEAR_TYPES + (nn.Embedding,)

    def default_target(self, model):
        return targeting.default_target(model, "attention_qv", self.method)

    def layer_class_for(self, module):
        return LoRAEmbedding if isinstance(module, nn.Embedding) else self.layer_class

    @property
    def layer_class(self):
        return LoRALinear


class LoRALinear(AdapterLayer):
    adapter_dicts = ("lora_A", "lora_B", "lora_dropout")
    adapter_values = ("scaling",)
    can_merge = True

    def __init__(self, base_layer: nn.Module, path: str = ""):
        super().__init__(base_layer, path)
        self.in_features, self.out_features = linear_dims(base_layer)
        self.lora_A, self.lora_B, self.lora_dropout = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.scaling: dict[str, float] = {}

    def add_adapter(self, name: str, config: LoRAConfig) -> None:
        device, dtype = self.base_device_dtype()
        r = config.r_for(self.path)
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling[name] = config.scaling_for(self.path)
        self.reset_adapter(name, config.init)
        self.init_adapter(name, config)

    @torch.no_grad()
    def reset_adapter(self, name: str, init: str = "kaiming") -> None:
        A = self.lora_A[name].weight
        if init == "gaussian":
            nn.init.normal_(A, std=1.0 / A.shape[0])
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)  # B = 0: the update BA starts at zero

    # ---- the pieces a variant overrides --------------------------------------------------------
    def init_adapter(self, name: str, config) -> None:
        """Variant tensors beside A and B (none for plain LoRA)."""

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = s · B A, shape (d_out, d_in)."""
        return self.scaling[name] * self.lora_B[name].weight @ self.lora_A[name].weight

    def lora_branch(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """s · B A dropout(x), in the adapter's dtype: (..., d_in) → (..., d_out)."""
        A, B = self.lora_A[name], self.lora_B[name]
        return B(A(self.lora_dropout[name](x.to(A.weight.dtype)))) * self.scaling[name]

    def adapted(self, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The layer's output with the adapter, given the base output y = W0 x."""
        return y + self.lora_branch(name, x).to(y.dtype)

    def merged_weight(self, name: str, W0: torch.Tensor) -> torch.Tensor:
        """W after merging: W0 + ΔW."""
        return W0 + self.delta_weight(name).to(W0.dtype)

    # ---- shared by every variant ----------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        name = self.active
        return y if name is None else self.adapted(name, x, y)

    def mixed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """A mixed-adapter batch (row i with adapter adapter_names[i]): one base call for all rows, then each group's
        rows get their adapter's change, `adapted(name, x[rows], y[rows])` (as peft's _mixed_batch_forward;
        the shared AdapterLayer path would call the base once per group)."""
        y = self.base_layer(x, *args, **kwargs)  # W0 x (+ b) for every row
        groups = self.row_groups(x.shape[0])
        if len(groups) == 1:  # every row with one adapter (or none)
            name = groups[0][0]
            return y if name is None else self.adapted(name, x, y)
        parts = [pick_rows(y, rows) if name is None else self.adapted(name, pick_rows(x, rows), pick_rows(y, rows))
                 for name, rows in groups]
        return gather_rows(parts, groups)

    def merge_weights(self, name: str) -> None:
        W0 = base_weight(self.base_layer).float()
        set_base_weight(self.base_layer, self.merged_weight(name, W0))


class LoRAEmbedding(LoRALinear):
    """LoRA on an nn.Embedding (weight W0: (V, d)): ΔW = s·(B A)ᵀ with A (r, V), B (d, r), as peft.

    A row lookup replaces the matmul with A, so the branch is s · B A[:, ids]: (..., d). No dropout (ids are
    not features). Init as LoRALinear (A random, B = 0); peft does the opposite for embeddings (A = 0, B
    Gaussian). Either way the update starts at zero; the checks against peft copy both tensors."""

    def lora_branch(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        A, B = self.lora_A[name].weight, self.lora_B[name].weight  # (r, V), (d, r)
        e = self.base_layer
        h = F.embedding(ids, A.T, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)
        return (h @ B.T) * self.scaling[name]  # (..., d)

    def delta_weight(self, name: str) -> torch.Tensor:
        return super().delta_weight(name).T  # (V, d), the embedding's layout


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
