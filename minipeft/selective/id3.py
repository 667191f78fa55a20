r"""ID3: choose the trained entries step by step while training (Agarwal, Ramesh, Sengupta & Chakraborty,
"Step-by-Step Unmasking for Parameter-Efficient Fine-tuning of Large Language Models", TACL 2025,
arXiv:2408.14470; official code: Aradhye2002/selective-peft-toolkit).

Static methods (FISH, PaFi) fix the mask before training. ID3 starts from an empty mask and unmasks a few
entries at every step, scoring the entries not yet chosen with the current gradient g and weight θ:

    D3(θ_j) = |g_j| / (|θ_j| + ε)^exp                       (the official code's form)
    step t: add the top ⌊B/T⌋ unchosen entries by D3 (the first B mod T steps one more), globally;
            zero the gradient outside the mask; optimizer step.

After T steps exactly B entries are chosen, and a chosen entry stays chosen. exp = 0 ranks by |g| alone
(the toolkit README's example); exp = 1 (our default) divides by the magnitude, favouring small weights with
large gradients. The seed notes write |g|² instead of |g|: the ranking is the same with exp/2.

How it is built. While the mask grows, every eligible parameter θ0_p gets a dense delta δ_p (a Parameter
of θ0_p's shape, init 0) and a boolean mask m_p (a buffer). The forward pass uses

    θ_p = θ0_p + where(m_p, δ_p, δ_p − δ_p.detach())

whose value is θ0_p + δ_p ⊙ m_p (unchosen entries add exactly 0) and whose gradient reaches all of δ_p, so
δ_p.grad is the full g that D3 needs. The growth callback (`ID3Grower`, returned by the config's
`training_callbacks`, so a plain `Trainer` run needs no wiring) runs before each optimizer step: it grows the
masks, then zeroes δ.grad outside them. With AdamW and weight decay 0 (required), a zero gradient with zero
optimizer state gives an update of exactly 0, so unchosen entries never move. As in the official code, the
Trainer clips the gradient norm before the callback sees it (a global rescale does not change the ranking).

Saving writes only the chosen entries, in the sparse-delta format (`sparse_index`, `sparse_values`, see
`sparse.py`), and adapter_config.json the count per parameter; loading gives a fixed sparse adapter (a
`SparseDeltaLayer`). Merging adds δ ⊙ m into θ0. Trainable parameters while growing: the whole δ (its
gradient is the score), of which B entries are ever updated: `id3_budget_used(model)` counts them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from ..config import check_positive, check_positive_int, register
from ..layer import AdapterLayer
from .masks import ScoredSelectionConfig, budget_for, eligible_parameters
from .sparse import KEY_SEP, SparseDeltaLayer


@register
@dataclass
class ID3Config(ScoredSelectionConfig):
    """Unmask `budget` entries (or `density` of the eligible ones) over `total_steps` optimizer steps
    (None: the Trainer's max_steps), scored by |g| / (|θ| + eps)^exp. Train with weight_decay=0."""

    exp: float = 1.0
    eps: float = 1e-3
    total_steps: int | None = None

    method = "id3"
    saved_fields = ("density", "budget", "exp", "eps", "total_steps")

    def validate(self):
        super().validate()
        if isinstance(self.exp, bool) or not isinstance(self.exp, (int, float)) or not 0 <= self.exp < float("inf"):
            raise ValueError(f"exp must be a number >= 0, got {self.exp!r}")
        check_positive("eps", self.eps)
        if self.total_steps is not None:
            check_positive_int("total_steps", self.total_steps)

    def select(self, model):
        if self.selection is not None:  # a saved ID3 adapter: its chosen entries, fixed
            return super().select(model)
        self.chosen_counts = {}
        params = eligible_parameters(model, self.modules_to_save)
        budget_for(self.density, self.budget, sum(p.numel() for p in params.values()))  # checks the budget
        return {name: torch.arange(p.numel()) for name, p in params.items()}  # every entry is a candidate

    @property
    def layer_class(self):
        return SparseDeltaLayer if self.selection is not None else ID3Layer

    def training_callbacks(self, model, adapter_name):
        return [] if self.selection is not None else [ID3Grower(model, adapter_name, self)]


class ID3Layer(AdapterLayer):
    """Dense deltas δ_p and masks m_p for each parameter of the wrapped module; forward θ0 + δ ⊙ m."""

    adapter_dicts = ("id3_delta", "id3_mask")
    can_merge = True

    def __init__(self, base_layer: nn.Module, path: str = ""):
        super().__init__(base_layer, path)
        self.id3_delta, self.id3_mask = nn.ModuleDict(), nn.ModuleDict()

    def theta0(self, key: str) -> torch.Tensor:
        return self.base_layer.get_parameter(key.replace(KEY_SEP, "."))

    def add_adapter(self, name: str, config: ID3Config) -> None:
        delta, mask = nn.ParameterDict(), nn.Module()
        for key in config.indices_for(self.base_layer):
            p = self.theta0(key)
            delta[key] = nn.Parameter(torch.zeros_like(p))                     # δ_p, θ0_p's shape
            mask.register_buffer(key, torch.zeros(p.shape, dtype=torch.bool, device=p.device))  # m_p
        self.id3_delta[name], self.id3_mask[name] = delta, mask

    def masks(self, name: str) -> dict[str, torch.Tensor]:
        return dict(self.id3_mask[name].named_buffers())

    def forward(self, *args, **kwargs):
        name = self.active
        if name is None:
            return self.base_layer(*args, **kwargs)
        params = {}
        for key, d in self.id3_delta[name].items():
            # value θ0 + δ⊙m; gradient to all of δ (the unchosen part adds d - d.detach() = 0)
            params[key.replace(KEY_SEP, ".")] = self.theta0(key) + torch.where(self.masks(name)[key], d, d - d.detach())
        return functional_call(self.base_layer, params, args, kwargs)

    def merge_weights(self, name: str) -> None:
        for key, d in self.id3_delta[name].items():
            theta0 = self.theta0(key)
            theta0 += torch.where(self.masks(name)[key], d.detach(), torch.zeros_like(d)).to(theta0.dtype)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """Only the chosen entries, as a SparseDeltaLayer saves them (flat indices and their deltas)."""
        out = {}
        for key, d in self.id3_delta[name].items():
            idx = self.masks(name)[key].flatten().nonzero().flatten()
            if idx.numel():
                out[f"sparse_index.{key}"] = idx
                out[f"sparse_values.{key}"] = d.detach().flatten()[idx]
        return out


def id3_layers(model, name: str):
    return [(path, layer) for path, layer in model.adapter_layers()
            if isinstance(layer, ID3Layer) and name in layer.adapter_names()]


def id3_budget_used(model, adapter_name: str | None = None) -> int:
    """How many entries the masks hold now."""
    name = adapter_name or model.active_adapter
    return sum(int(m.sum()) for _, layer in id3_layers(model, name) for m in layer.masks(name).values())


def picks_per_step(budget: int, total_steps: int) -> list[int]:
    """⌊B/T⌋ per step, one more in the first B mod T steps: sums to B."""
    base, extra = divmod(budget, total_steps)
    return [base + (t < extra) for t in range(total_steps)]


def d3_scores(grad: torch.Tensor, theta: torch.Tensor, exp: float, eps: float) -> torch.Tensor:
    """D3 = |g| / (|θ| + ε)^exp."""
    return grad.abs() / (theta.abs() + eps) ** exp


class ID3Grower:
    """Trainer callback: before each optimizer step, unmask this step's picks and zero δ.grad outside."""

    def __init__(self, model, adapter_name: str, config: ID3Config):
        self.model, self.name, self.config = model, adapter_name, config
        self.step = 0  # growth steps done
        self.schedule: list[int] = []
        self.history: list[int] = []  # entries chosen after each step

    def on_train_begin(self, trainer) -> None:
        if any(g.get("weight_decay", 0.0) for g in trainer.optimizer.param_groups):
            raise ValueError("ID3 needs weight_decay=0: decay would move chosen deltas toward 0 between picks")
        layers = id3_layers(self.model, self.name)
        n = sum(d.numel() for _, layer in layers for d in layer.id3_delta[self.name].values())
        total = self.config.total_steps or trainer.max_steps
        self.schedule = picks_per_step(budget_for(self.config.density, self.config.budget, n), total)

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer) -> None:
        if self.model.active_adapter != self.name:
            return
        entries = []  # (mask, delta, score over the unchosen entries)
        for _, layer in id3_layers(self.model, self.name):
            for key, d in layer.id3_delta[self.name].items():
                mask = layer.masks(self.name)[key]
                grad = d.grad if d.grad is not None else torch.zeros_like(d)
                theta = layer.theta0(key) + torch.where(mask, d, torch.zeros_like(d))
                score = d3_scores(grad.float(), theta.float(), self.config.exp, self.config.eps)
                entries.append((mask, d, score.masked_fill(mask, -1.0)))  # chosen ones never picked again
        k = self.schedule[self.step] if self.step < len(self.schedule) else 0
        if k:
            flat = torch.cat([s.flatten() for _, _, s in entries])
            top = torch.topk(flat, k).indices  # D3 >= 0 > -1: unchosen entries first
            hit = torch.zeros_like(flat, dtype=torch.bool)
            hit[top] = True
            start = 0
            for mask, _, s in entries:
                mask |= hit[start:start + s.numel()].view_as(mask)
                start += s.numel()
        for mask, d, _ in entries:
            if d.grad is not None:
                d.grad.mul_(mask)
        self.step += 1
        self.history.append(sum(int(m.sum()) for m, _, _ in entries))
        self.config.chosen_counts = self.chosen_counts()

    def chosen_counts(self) -> dict[str, int]:
        """{parameter name: entries chosen}, as adapter_config.json records them."""
        out = {}
        for path, layer in id3_layers(self.model, self.name):
            for key, m in layer.masks(self.name).items():
                if m.any():
                    out[f"{path}.{key.replace(KEY_SEP, '.')}"] = int(m.sum())
        return out


__all__ = ["ID3Config", "ID3Layer", "ID3Grower", "id3_budget_used", "picks_per_step", "d3_scores"]
