r"""FISH Mask: train the entries with the largest Fisher information (Sung, Nair & Raffel, NeurIPS 2021,
arXiv:2111.09839).

The Fisher information of θ is the variance of the score function ∇_θ log p(y|x; θ). Its diagonal, estimated
from N examples one at a time (batch size 1, so each example's gradient is squared on its own):

    empirical ("label" in the paper's code):   F̂_j = (1/N) Σ_i (∂ log p(y_i | x_i) / ∂θ_j)²
    expected  ("expect"):                      F̂_j = (1/N) Σ_i Σ_c p(c | x_i) (∂ log p(c | x_i) / ∂θ_j)²

The empirical form uses the true label; the expected form averages over the model's own predicted
distribution (one backward pass per class, so classification only). The mask is the global top k of F̂ over
every parameter but the head (`masks.py`), fixed for the whole run; the chosen entries train as sparse
deltas, so nothing outside the mask can change. The paper keeps k = 0.5% of the parameters with N = 1024.

For a causal language model, log p(y|x) is the sum of the log-probabilities of the labelled tokens (the
empirical form only). Scores are computed with the model in eval mode (no dropout) and the parameters'
requires_grad flags and the model's mode are restored afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_choice, check_positive_int, register
from .masks import ScoredSelectionConfig, eligible_parameters

FISHER_FORMS = ("empirical", "expected")


def log_likelihood_terms(model: nn.Module, batch: dict, fisher: str):
    """[(weight, log p)] for one example: [(1, log p(y|x))] (empirical) or [(p(c|x), log p(c|x)) for each c]."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"]
    logits = model(**inputs).logits
    if labels.is_floating_point() or logits.shape[-1] < 2:
        raise ValueError("fisher_scores needs a classifier or a language model (integer labels, at least two "
                         f"classes); got logits {tuple(logits.shape)} and {labels.dtype} labels")
    if logits.dim() == 2:  # classification: (1, classes)
        logp = F.log_softmax(logits.float(), dim=-1)[0]
        if fisher == "empirical":
            return [(1.0, logp[int(labels.view(-1)[0])])]
        return [(p.item(), lp) for p, lp in zip(logp.exp().detach(), logp)]
    if fisher == "expected":
        raise ValueError("fisher='expected' sums over every class; for a language model (a vocabulary of "
                         "classes per token) use fisher='empirical'")
    logp = F.log_softmax(logits[0, :-1].float(), dim=-1)  # token t predicts token t + 1
    target = labels[0, 1:]
    keep = target != -100
    return [(1.0, logp[keep].gather(1, target[keep, None]).sum())]


def fisher_scores(model: nn.Module, examples, collate, *, n_samples: int | None = None,
                  fisher: str = "empirical", params: dict[str, nn.Parameter] | None = None,
                  modules_to_save=None) -> dict[str, torch.Tensor]:
    """Diagonal Fisher information per parameter entry: {name: tensor of the parameter's shape}.

    examples: a dataset (a list of examples); collate: the task's collate function (as for training);
    n_samples: how many examples (the first n; default all); params: which parameters (default: every
    eligible one, see `masks.eligible_parameters`, less `modules_to_save`)."""
    check_choice("fisher", fisher, FISHER_FORMS)
    if params is None:
        params = eligible_parameters(model, modules_to_save)
    n = len(examples) if n_samples is None else min(n_samples, len(examples))
    if n < 1:
        raise ValueError("fisher_scores needs at least one example")
    names, tensors = list(params), list(params.values())
    flags, was_training = [p.requires_grad for p in tensors], model.training
    scores = [torch.zeros_like(p, dtype=torch.float32) for p in tensors]
    device = tensors[0].device
    try:
        model.eval()
        for p in tensors:
            p.requires_grad_(True)
        for i in range(n):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate([examples[i]]).items()}
            terms = log_likelihood_terms(model, batch, fisher)
            for j, (weight, logp) in enumerate(terms):
                grads = torch.autograd.grad(logp, tensors, retain_graph=j < len(terms) - 1, allow_unused=True)
                for s, g in zip(scores, grads):
                    if g is not None:
                        s.add_(g.float().square(), alpha=weight)
    finally:
        for p, flag in zip(tensors, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    return {name: s / n for name, s in zip(names, scores)}


@register
@dataclass
class FISHConfig(ScoredSelectionConfig):
    """The top `density` (or `budget` entries) of the diagonal Fisher information, fixed before training.

    examples, collate: the data the scores are computed on (not saved; `n_samples` and `fisher` are, and so
    is the count per parameter). Pass the task head in `modules_to_save`: it trains in full and is not scored."""

    n_samples: int = 1024
    fisher: str = "empirical"
    examples: Any = None
    collate: Any = None

    method = "fish"
    saved_fields = ("density", "budget", "n_samples", "fisher")
    wants_data: ClassVar[bool] = True  # runs and benches hand it the training set and collate function

    def validate(self):
        super().validate()
        check_positive_int("n_samples", self.n_samples)
        check_choice("fisher", self.fisher, FISHER_FORMS)

    def scores(self, model, params):
        if self.examples is None or self.collate is None:
            raise ValueError("FISHConfig needs examples= and collate= (the data its Fisher scores come from); "
                             "a saved FISH adapter loads without them")
        return fisher_scores(model, self.examples, self.collate, n_samples=self.n_samples, fisher=self.fisher,
                             params=params)


__all__ = ["FISHConfig", "fisher_scores", "log_likelihood_terms"]
