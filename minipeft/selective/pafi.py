r"""PaFi: train the entries of smallest magnitude, chosen before seeing any data (Liao, Meng & Monz, ACL 2023,
"Parameter-Efficient Fine-Tuning without Introducing New Latency", arXiv:2305.16742).

    S = the k entries of θ0 with the smallest |θ0_j|      (global over every parameter but the head)

The mask is task-agnostic: it depends on the pretrained weights only, so one mask serves every task and
needs no forward pass. The intuition: the smallest weights contribute least to the pretrained function, so
they are the cheapest to repurpose. `magnitude="largest"` is the opposite choice, kept for comparison.
Selected entries train as sparse deltas (`sparse.py`); merging adds them back into θ0 exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import check_choice, register
from .masks import ScoredSelectionConfig


@register
@dataclass
class PaFiConfig(ScoredSelectionConfig):
    """The `density` (or `budget` entries) of smallest |θ0| (or largest: the ablation); no data needed."""

    magnitude: str = "smallest"

    method = "pafi"
    saved_fields = ("density", "budget", "magnitude")

    def validate(self):
        super().validate()
        check_choice("magnitude", self.magnitude, ("smallest", "largest"))

    def scores(self, model, params):
        sign = -1.0 if self.magnitude == "smallest" else 1.0  # top_k takes the largest scores
        return {name: sign * p.detach().float().abs() for name, p in params.items()}


__all__ = ["PaFiConfig"]
