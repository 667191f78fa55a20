r"""Choosing entries by score: the selection step FISH, PaFi and ID3 share (and the random-mask baseline).

A score method gives every entry of every eligible parameter a number, and the budget k goes to the global
top k (all parameters compete; a layer can get many entries or none):

    S = top_k { score(θ_j) : θ_j an entry of an eligible parameter },     k = budget or ⌊density · N⌋

where N counts the entries of all eligible parameters. Eligible: every parameter of the base model but those
in `modules_to_save` (the task head, trained in full) and weights tied across modules (a sparse delta
through one of them would not reach the other; e.g. Llama's embeddings tied to its output head).

The chosen entries become a `selection` (flat indices per parameter), trained as sparse deltas exactly as
BitFit's biases (`sparse.py`). A saved adapter keeps the indices in its tensor file and, in
adapter_config.json, the number chosen per parameter (`selection`) next to how they were chosen (the
method's fields); loading reads the indices back instead of scoring again (FISH would need the data).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import targeting
from ..config import check_positive_int, register
from .sparse import SelectiveConfig, base_parameters, reserved_selection


def eligible_parameters(model: nn.Module, modules_to_save=None) -> dict[str, nn.Parameter]:
    """{name: parameter} that a score method may choose from, in the model's order (see the module doc)."""
    skip = targeting.find_targets(model, modules_to_save, method="modules_to_save") if modules_to_save else []
    owners: dict[int, set] = {}
    named = []
    for path, _, pname, p in base_parameters(model):
        owners.setdefault(id(p), set()).add(path)
        named.append((f"{path}.{pname}" if path else pname, path, p))
    out = {}
    for name, path, p in named:
        if targeting.within(path, skip) or len(owners[id(p)]) > 1 or name in out:
            continue
        out[name] = p
    if not out:
        raise ValueError("no parameter is eligible: everything is in modules_to_save or tied")
    return out


def top_k(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """The k largest scores over all tensors together → {name: sorted flat indices} (names with none left out).

    Ties at the threshold go to the earlier entries (torch.topk on the concatenation, stable order)."""
    total = sum(s.numel() for s in scores.values())
    if not 0 < k <= total:
        raise ValueError(f"budget k={k} must be between 1 and the {total:,} scored entries")
    flat = torch.cat([s.detach().float().flatten().cpu() for s in scores.values()])
    if not torch.isfinite(flat).all():
        raise ValueError("scores contain NaN or inf")
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    out, start = {}, 0
    for name, s in scores.items():
        n = s.numel()
        mine = order[(order >= start) & (order < start + n)] - start
        if mine.numel():
            out[name] = mine.sort().values
        start += n
    return out


def budget_for(density: float | None, budget: int | None, n_eligible: int) -> int:
    """k from a density (a fraction of the eligible entries) or a count."""
    k = budget if budget is not None else int(density * n_eligible)
    if not 0 < k <= n_eligible:
        raise ValueError(f"the budget ({k:,} entries) must be between 1 and the {n_eligible:,} eligible entries")
    return k


@dataclass
class ScoredSelectionConfig(SelectiveConfig):
    """Base of FISH, PaFi and ID3's saved form: choose `budget` entries (or `density` of the eligible ones).

    selection: how many entries each parameter got ({name: count}). Filled in when the entries are chosen
        and saved in adapter_config.json; a config that has it (one read from a saved adapter) reserves that
        many entries per parameter, and load_adapter copies the saved indices in, without scoring again."""

    density: float | None = None
    budget: int | None = None
    selection: dict | None = None

    def validate(self):
        if (self.density is None) == (self.budget is None) and self.selection is None:
            raise ValueError(f"{type(self).__name__}: give exactly one of density (a fraction of the eligible "
                             f"parameters) or budget (a number of entries)")
        if self.density is not None and not (isinstance(self.density, (int, float)) and 0 < self.density <= 1):
            raise ValueError(f"density must be in (0, 1], got {self.density!r}")
        if self.budget is not None:
            check_positive_int("budget", self.budget)
        if self.target is not None:
            raise ValueError(f"{type(self).__name__}: the scores say which entries are trained; leave target=None")

    def scores(self, model: nn.Module, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        """{name: score tensor of the parameter's shape}; larger = chosen first."""
        raise NotImplementedError

    def select(self, model):
        if self.selection is not None:  # read from a saved adapter: the file has the indices
            return reserved_selection(model, self.selection)
        params = eligible_parameters(model, self.modules_to_save)
        k = budget_for(self.density, self.budget, sum(p.numel() for p in params.values()))
        chosen = top_k(self.scores(model, params), k)
        self.chosen_counts = {name: int(idx.numel()) for name, idx in chosen.items()}
        return chosen

    def to_dict(self):
        """The fields that say how the entries were chosen, and the count per parameter (not the data)."""
        out = {"method": self.method, "target": None, "modules_to_save": self.modules_to_save}
        out.update({k: getattr(self, k) for k in self.saved_fields})
        out["selection"] = self.selection if self.selection is not None else getattr(self, "chosen_counts", None)
        return out

    saved_fields = ("density", "budget")  # subclasses add theirs


@register
@dataclass
class RandomMaskConfig(ScoredSelectionConfig):
    """The baseline every score method must beat: `density` (or `budget`) entries chosen uniformly at random
    among the eligible ones (FISH's paper compares against it at equal k)."""

    seed: int = 0

    method = "random_mask"
    saved_fields = ("density", "budget", "seed")

    def scores(self, model, params):
        g = torch.Generator().manual_seed(self.seed)
        return {name: torch.rand(p.shape, generator=g) for name, p in params.items()}


__all__ = ["eligible_parameters", "top_k", "budget_for", "ScoredSelectionConfig", "RandomMaskConfig"]
