r"""AdaLoRA: Adaptive Budget Allocation for PEFT (Zhang et al., ICLR 2023, arXiv:2303.10512).

LoRA gives every matrix the same rank r. AdaLoRA starts every matrix at r_init, then prunes the least
important rank-one pieces across the whole model, so the rank goes where it helps (paper Eq. 3):

    y = W0 x + s · P Λ Q x,     P ∈ R^{d_out×r},  Λ = diag(λ_1..λ_r),  Q ∈ R^{r×d_in},  s = α / r_init

Λ is a vector, so zeroing λ_i removes the triplet G_i = {P_{:,i}, λ_i, Q_{i,:}} without an SVD. P and Q are
kept near-orthogonal by a regulariser added to the loss (paper Eq. 4; code: unsquared norms, averaged):

    R = mean over matrices of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F,        loss += γ · R

Importance of one entry w after each optimizer step t (paper Eqs. 8–11):

    I_t = |w · ∂L/∂w|                               sensitivity
    Ī_t = β1 Ī_{t−1} + (1 − β1) I_t                 smoothed sensitivity
    Ū_t = β2 Ū_{t−1} + (1 − β2) |I_t − Ī_t|         uncertainty
    s_t = Ī_t · Ū_t
    S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)  score of triplet i

Budget b(t) = the number of triplets kept, over all matrices (cubic schedule, paper Eq. 12):

    t ≤ t_i:               b(0) = r_init · #matrices           warm-up, nothing pruned
    t_i < t < T − t_f:      ⌊b(T) + (b(0) − b(T)) · (1 − (t − t_i)/(T − t_f − t_i))³⌋, pruned every ΔT
    t ≥ T − t_f:           b(T) = target_r · #matrices          the mask is fixed, training goes on

and λ_i = 0 for every triplet whose S_i is at or below the (b(0) − b(t))-th smallest score (one global
threshold: a matrix that matters keeps more rank).

Code names (peft's): Q = `lora_A[name].weight` (r_init, d_in), P = `lora_B[name].weight` (d_out, r_init),
λ = `lora_E[name]` (r_init, 1), s = `scaling[name]` = α / (r_init + 1e-5) — peft divides by its
`ranknum + 1e-5`, and ranknum stays r_init while triplets are pruned; Ī, Ū = `RankAllocator.exp_avg_ipt`,
`exp_avg_unc`; γ = `orth_reg_weight`; t_i, t_f, ΔT, T = `tinit`, `tfinal`, `deltaT`, `total_step`.

Init: λ = 0 (so the model starts at the base), P, Q ~ N(0, 0.02²).
Pruning is a mask, as in the official code and in peft during training: tensors keep r_init rows and the
pruned λ_i are 0. The surviving triplets are recorded in `config.rank_pattern` {module path: [bool]*r_init},
so a saved adapter reloads bit for bit with the same ranks. (peft also slices the saved tensors to the
survivors; we keep them whole: the file is r_init-sized, but reload is exact and training can resume.)
Trainable parameters per layer: r_init · (d_in + d_out + 1).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .. import targeting
from ..config import check_positive, check_positive_int, check_probability, register
from .lora import LoRAConfig, LoRALinear


@register
@dataclass
class AdaLoRAConfig(LoRAConfig):
    init_r: int = 12  # r_init: rank every matrix starts with (≈ 1.5 × target_r in the paper)
    target_r: int = 8  # average rank left at the end: budget b(T) = target_r · #matrices
    tinit: int = 0  # t_i: warm-up steps before any pruning
    tfinal: int = 0  # t_f: last steps trained with the final mask fixed
    deltaT: int = 1  # ΔT: prune every deltaT steps during the schedule
    beta1: float = 0.85  # β1: EMA of the sensitivity
    beta2: float = 0.85  # β2: EMA of the uncertainty
    orth_reg_weight: float = 0.1  # γ: weight of the orthogonality regulariser (peft's default is 0.5)
    total_step: int | None = None  # T; None: the Trainer's max_steps, read at on_train_begin
    alpha: float = 16  # s = alpha / r_init (METHODS.md default)
    rank_pattern: dict | None = None  # written by the RankAllocator: {module path: [bool] * init_r} survivors
    # `r`, `rslora` and `alpha_pattern` of LoRAConfig are not used: every matrix has init_r rows (peft also
    # ignores r and warns when it is set).

    method = "adalora"

    def validate(self):
        check_positive_int("init_r", self.init_r)
        check_positive_int("target_r", self.target_r)
        if self.target_r > self.init_r:
            raise ValueError(f"target_r ({self.target_r}) must be at most init_r ({self.init_r}): pruning only "
                             f"removes rank")
        for field_name, value in (("tinit", self.tinit), ("tfinal", self.tfinal)):
            if type(value) is not int or value < 0:
                raise ValueError(f"{field_name} must be an integer >= 0, got {value!r}")
        check_positive_int("deltaT", self.deltaT)
        check_probability("beta1", self.beta1)
        check_probability("beta2", self.beta2)
        if type(self.orth_reg_weight) not in (int, float) or not self.orth_reg_weight >= 0:
            raise ValueError(f"orth_reg_weight must be a number >= 0, got {self.orth_reg_weight!r}")
        if self.total_step is not None:
            self.check_total_step(self.total_step)
        check_positive("alpha", self.alpha)
        check_probability("dropout", self.dropout)
        if self.rslora or self.alpha_pattern is not None:
            raise ValueError("rslora and alpha_pattern are not used by AdaLoRA (s = alpha / init_r)")
        if self.r != 8:
            warnings.warn("r is not used by AdaLoRA; every matrix starts at init_r")
        if self.rank_pattern is not None and not (isinstance(self.rank_pattern, dict) and all(
                isinstance(m, list) and len(m) == self.init_r and all(isinstance(b, bool) for b in m)
                for m in self.rank_pattern.values())):
            raise ValueError(f"rank_pattern must be {{module path: list of init_r booleans}} (written by the "
                                 f"RankAllocator), got {self.rank_pattern!r}")

    def check_total_step(self, total_step) -> None:
        check_positive_int("total_step", total_step)
        if self.tinit + self.tfinal >= total_step:
            raise ValueError(f"total_step ({total_step}) must exceed tinit + tfinal ({self.tinit} + {self.tfinal}):"
                             f" no step is left for pruning")

    # every matrix gets init_r triplets and s = α / (r_init + 1e-5), whatever `r` says
    def r_for(self, path: str) -> int:
        return self.init_r

    def scaling_for(self, path: str) -> float:
        return self.alpha / (self.init_r + 1e-5)

    @property
    def base_types(self):
        return targeting.LINEAR_TYPES

    @property
    def layer_class(self):
        return AdaLoRALinear

    def extra_loss(self, model, adapter_name: str):
        """γ · R: the mean of ‖QQᵀ − I‖_F and ‖PᵀP − I‖_F over every adapted matrix (None when γ = 0)."""
        if self.orth_reg_weight == 0:
            return None
        terms = [orthogonality(M) for _, layer in adalora_layers(model, adapter_name)
                 for M in (layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight.T)]
        return self.orth_reg_weight * (sum(terms) / len(terms)) if terms else None

    def training_callbacks(self, model, adapter_name: str) -> list:
        return [RankAllocator(model, self, adapter_name)]


class AdaLoRALinear(LoRALinear):
    """LoRALinear with the update s · P diag(λ) Q: adds `lora_E` (λ) and overrides the variant hooks."""

    adapter_dicts = LoRALinear.adapter_dicts + ("lora_E",)

    def __init__(self, base_layer: nn.Module, path: str = ""):
        super().__init__(base_layer, path)
        self.lora_E = nn.ParameterDict()

    @torch.no_grad()
    def init_adapter(self, name: str, config: AdaLoRAConfig) -> None:
        Q, P = self.lora_A[name].weight, self.lora_B[name].weight  # (r, d_in), (d_out, r)
        nn.init.normal_(Q, mean=0.0, std=0.02)
        nn.init.normal_(P, mean=0.0, std=0.02)
        self.lora_E[name] = nn.Parameter(torch.zeros(Q.shape[0], 1, device=Q.device, dtype=Q.dtype))  # λ = 0
        mask = (config.rank_pattern or {}).get(self.path)
        if mask is not None:  # a learned allocation: pruned triplets stay at λ = 0
            self.lora_E[name].masked_fill_(~torch.tensor(mask, device=Q.device)[:, None], 0.0)

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = s · P diag(λ) Q = s · B (A ⊙ E), shape (d_out, d_in)."""
        return self.lora_B[name].weight @ (self.lora_A[name].weight * self.lora_E[name]) * self.scaling[name]

    def lora_branch(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """s · P diag(λ) Q dropout(x), computed as peft does: x (A ⊙ E)ᵀ Bᵀ · s."""
        Q, P, E = self.lora_A[name].weight, self.lora_B[name].weight, self.lora_E[name]
        x = self.lora_dropout[name](x.to(Q.dtype))
        return (x @ (Q * E).T @ P.T) * self.scaling[name]  # (..., r) then (..., d_out)


def adalora_layers(model, adapter_name: str):
    """(path, layer) of every AdaLoRALinear that carries adapter `adapter_name`."""
    return [(p, m) for p, m in model.adapter_layers() if isinstance(m, AdaLoRALinear) and adapter_name in m.lora_E]


def orthogonality(M: torch.Tensor) -> torch.Tensor:
    """‖M Mᵀ − I‖_F for M (r, d): Q as stored, or Pᵀ."""
    cov = M @ M.T  # (r, r)
    return torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype))


# ---- importance and budget: pure functions a chapter can call --------------------------------------
def sensitivity(w: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """I = |w · ∂L/∂w|, element-wise: the first-order loss change if w were set to 0."""
    return (w * grad).abs()


def smooth_importance(I, I_bar, U_bar, beta1: float, beta2: float):
    """One EMA step: (Ī, Ū) from the new sensitivity I and the previous Ī, Ū."""
    I_bar = beta1 * I_bar + (1 - beta1) * I
    U_bar = beta2 * U_bar + (1 - beta2) * (I - I_bar).abs()
    return I_bar, U_bar


def triplet_scores(s_E: torch.Tensor, s_A: torch.Tensor, s_B: torch.Tensor) -> torch.Tensor:
    """S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji) from entry scores s = Ī·Ū of E (r,1), A (r,d_in),
    B (d_out,r); returns (r,)."""
    return s_E.view(-1) + (s_A.mean(dim=1) + s_B.mean(dim=0))


def budget_schedule(step: int, total_step: int, tinit: int, tfinal: int, init_budget: int, target_budget: int,
                    deltaT: int = 1) -> tuple[int, bool]:
    """(b(t), whether to prune at step t), as peft: warm-up, cubic decrease, then b(T) with a fixed mask."""
    if step <= tinit:
        return init_budget, False
    if step > total_step - tfinal:
        return target_budget, True
    progress = (step - tinit) / (total_step - tfinal - tinit)
    return int((init_budget - target_budget) * (1 - progress) ** 3 + target_budget), step % deltaT == 0


class RankAllocator:
    """Trainer callback: after each optimizer step, update Ī, Ū and prune to the budget b(t).

    `AdaLoRAConfig.training_callbacks` returns one, so `mp.Trainer(model, ...)` runs the schedule. Outside the
    Trainer, call `update_and_allocate(step)` after `optimizer.step()` and before `zero_grad()` (as peft's).
    """

    def __init__(self, model, config: AdaLoRAConfig, adapter_name: str = "default"):
        self.model, self.config, self.adapter_name = model, config, adapter_name
        self.layers = dict(adalora_layers(model, adapter_name))
        if not self.layers:
            raise ValueError(f"adapter {adapter_name!r} has no AdaLoRA layer")
        self.init_budget = sum(layer.lora_E[adapter_name].shape[0] for layer in self.layers.values())
        self.target_budget = config.target_r * len(self.layers)
        self.total_step = config.total_step
        self.budget = self.init_budget
        self.final_mask: dict[str, list[bool]] | None = None
        self.reset_importance()

    def reset_importance(self) -> None:
        self.exp_avg_ipt: dict[tuple[str, str], torch.Tensor] = {}  # Ī, keyed by (path, "A" | "B" | "E")
        self.exp_avg_unc: dict[tuple[str, str], torch.Tensor] = {}  # Ū

    def tensors(self):
        """((path, "A" | "B" | "E"), Parameter) of every adapted matrix."""
        for path, layer in self.layers.items():
            n = self.adapter_name
            yield from (((path, "A"), layer.lora_A[n].weight), ((path, "B"), layer.lora_B[n].weight),
                        ((path, "E"), layer.lora_E[n]))

    @torch.no_grad()
    def update_importance(self) -> None:
        for key, p in self.tensors():
            zero = torch.zeros_like(p)
            I = sensitivity(p, p.grad if p.grad is not None else zero)
            self.exp_avg_ipt[key], self.exp_avg_unc[key] = smooth_importance(
                I, self.exp_avg_ipt.get(key, zero), self.exp_avg_unc.get(key, zero),
                self.config.beta1, self.config.beta2)

    def scores(self) -> dict[str, torch.Tensor]:
        """{module path: S (r_init,)}, the triplet scores from the current Ī, Ū."""
        s = {key: self.exp_avg_ipt[key] * self.exp_avg_unc[key] for key in self.exp_avg_ipt}
        return {path: triplet_scores(s[path, "E"], s[path, "A"], s[path, "B"]) for path in self.layers}

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero λ_i of every triplet with S_i at or below the global threshold; record and return the mask."""
        scores = self.scores()
        n_prune = self.init_budget - budget
        if n_prune <= 0:
            keep = {path: torch.ones_like(S, dtype=torch.bool) for path, S in scores.items()}
        else:
            threshold = torch.kthvalue(torch.cat(list(scores.values())), k=n_prune)[0].item()  # global
            keep = {path: S > threshold for path, S in scores.items()}
        return self.apply_mask({path: k.tolist() for path, k in keep.items()})

    @torch.no_grad()
    def apply_mask(self, mask: dict[str, list[bool]]) -> dict[str, list[bool]]:
        for path, keep in mask.items():
            E = self.layers[path].lora_E[self.adapter_name]  # (r, 1)
            E.masked_fill_(~torch.tensor(keep, device=E.device)[:, None], 0.0)
        self.config.rank_pattern = mask
        return mask

    def update_and_allocate(self, step: int) -> None:
        """One step of the schedule (step = optimizer steps done before this one, 0-based, as peft's)."""
        if self.total_step is None:
            raise ValueError("total_step is unknown: set AdaLoRAConfig.total_step or train with mp.Trainer")
        end = self.total_step - self.config.tfinal
        if step < end:
            self.update_importance()
            self.budget, prune = budget_schedule(step, self.total_step, self.config.tinit, self.config.tfinal,
                                                 self.init_budget, self.target_budget, self.config.deltaT)
            if prune:
                self.mask_to_budget(self.budget)
        elif step == end or self.final_mask is None:  # the final allocation, then it stays fixed
            self.budget = self.target_budget
            self.final_mask = self.mask_to_budget(self.target_budget)
            self.reset_importance()
        else:  # the optimizer moved the pruned λ off 0: mask them again
            self.apply_mask(self.final_mask)

    # ---- Trainer hooks ----------------------------------------------------------------------------
    def on_train_begin(self, trainer) -> None:
        if self.total_step is None:
            self.config.check_total_step(trainer.max_steps)
            self.total_step = trainer.max_steps

    def on_optimizer_step(self, trainer) -> None:
        self.update_and_allocate(trainer.step)

    def on_train_end(self, trainer) -> None:
        # with tfinal = 0 the last step (T − 1) comes before the final allocation (peft never makes it);
        # we make it here, so training always ends at b(T) = target_r · #matrices
        if self.final_mask is None and trainer.step >= self.total_step:
            self.update_and_allocate(self.total_step - self.config.tfinal)


def rank_allocation(model, name: str | None = None) -> dict[str, int]:
    """{module path: number of surviving triplets} of adapter `name` (default: the active one); init_r
    everywhere before any pruning."""
    name = name or model.active_adapter
    pattern = model.peft_config[name].rank_pattern or {}
    return {path: sum(pattern[path]) if path in pattern else layer.lora_E[name].shape[0]
            for path, layer in adalora_layers(model, name)}


__all__ = ["AdaLoRAConfig", "AdaLoRALinear", "RankAllocator", "rank_allocation", "budget_schedule",
           "sensitivity", "smooth_importance", "triplet_scores", "orthogonality"]
