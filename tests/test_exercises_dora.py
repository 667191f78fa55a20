"""The DoRA chapter's exercise checks: each passes two different correct answers and fails typical
mistakes (column norm instead of row norm, m not initialised from W0, norm not detached, bias scaled
by m/n, the detached gradient where the exact one is asked, ...).

The correct answers are written independently of minipeft (plain tensors), so a check that accepted
anything would fail the broken cases here.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minipeft.exercises import check_dora_linear, check_dora_magnitude_grad, check_weight_norm


def results(report):
    return [ok for _, ok in report]


# -- exercise 1: weight normalisation --------------------------------------------------------------
def decompose_norm(W):
    m = W.norm(dim=1)
    return m, W / m[:, None]


def decompose_normalize(W):  # a second correct answer: F.normalize and an explicit sqrt
    return (W * W).sum(dim=1).sqrt(), F.normalize(W, dim=1)


@pytest.mark.parametrize("fn", [decompose_norm, decompose_normalize])
def test_weight_norm_correct_passes(fn):
    assert check_weight_norm(fn)


@pytest.mark.parametrize("fn, expected", [
    (lambda W: (W.norm(dim=0), W / W.norm(dim=0, keepdim=True)), [False, False, False]),  # column norm
    (lambda W: (W.norm().expand(W.shape[0]), W / W.norm()), [True, False, False]),        # Frobenius norm
    (lambda W: (W.norm(dim=1), W), [True, False, False]),                                 # D not normalised
])
def test_weight_norm_broken_fails(fn, expected):
    report = check_weight_norm(fn)
    assert not report
    assert results(report) == expected


# -- exercise 2: a DoRA layer ----------------------------------------------------------------------
class EfficientDoRA(nn.Module):
    """y = (m/n) ⊙ (W0 x + s B A x) + b, n detached (the chapter's form)."""

    def __init__(self, base, r, alpha, m_init="norm", norm_dim=1, detach=True, bias_scaled=False):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.A = nn.Parameter(torch.empty(r, base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        W0 = base.weight.detach()
        self.m = nn.Parameter(W0.norm(dim=1).clone() if m_init == "norm" else torch.ones(base.out_features))
        self.s, self.dim, self.detach, self.bias_scaled = alpha / r, norm_dim, detach, bias_scaled

    def forward(self, x):
        V = self.base.weight + self.s * self.B @ self.A
        n = V.norm(dim=self.dim)
        if self.dim == 0:  # a column norm, one per input: broadcast it back the wrong way round
            n = n.mean().expand(V.shape[0])
        n = n.detach() if self.detach else n
        if self.bias_scaled:
            return (self.m / n) * (self.base(x) + self.s * x @ self.A.T @ self.B.T)
        y = (self.m / n) * (F.linear(x, self.base.weight) + self.s * x @ self.A.T @ self.B.T)
        return y + self.base.bias


class DenseDoRA(nn.Module):
    """A second correct answer: peft's names, nn.Linear factors, the dense merged weight in forward."""

    def __init__(self, base, r, alpha):
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.zeros_(self.lora_B.weight)
        self.lora_magnitude_vector = nn.Parameter(torch.linalg.vector_norm(base.weight.detach(), dim=1))
        self.scaling = alpha / r

    def forward(self, x):
        V = self.base_layer.weight + self.scaling * self.lora_B.weight @ self.lora_A.weight
        W = (self.lora_magnitude_vector / V.norm(dim=1).detach())[:, None] * V
        return F.linear(x, W, self.base_layer.bias)


@pytest.mark.parametrize("cls", [EfficientDoRA, DenseDoRA])
def test_dora_linear_correct_passes(cls):
    assert check_dora_linear(cls)


@pytest.mark.parametrize("broken, failing", [
    (lambda b, r, a: EfficientDoRA(b, r, a, m_init="ones"), [0]),          # m not initialised from W0
    (lambda b, r, a: EfficientDoRA(b, r, a, norm_dim=0), [0, 3, 4]),       # column norm, not row norm
    (lambda b, r, a: EfficientDoRA(b, r, a, detach=False), [4]),           # norm not detached
    (lambda b, r, a: EfficientDoRA(b, r, a, bias_scaled=True), [3, 4]),    # bias scaled by m/n
])
def test_dora_linear_broken_fails(broken, failing):
    report = check_dora_linear(broken)
    assert not report
    assert [i for i, ok in enumerate(results(report)) if not ok] == failing


# -- exercise 3: the gradients of magnitude and direction ------------------------------------------
def grads_projection(V, m, G):
    n = V.norm(dim=1, keepdim=True)
    u = V / n
    along = (G * u).sum(dim=1, keepdim=True)
    return m[:, None] / n * (G - along * u), along.squeeze(1)


def grads_matrix(V, m, G):  # a second correct answer: the projector I - vv^T/|v|^2 per row, explicitly
    g_V, g_m = [], []
    for v, mn, g in zip(V, m, G):
        nv = v.norm()
        P = torch.eye(len(v)) - torch.outer(v, v) / nv**2
        g_V.append(mn / nv * P @ g)
        g_m.append(g @ v / nv)
    return torch.stack(g_V), torch.stack(g_m)


@pytest.mark.parametrize("fn, ok", [
    (grads_projection, True),
    (grads_matrix, True),
    (lambda V, m, G: (m[:, None] / V.norm(dim=1, keepdim=True) * G, grads_projection(V, m, G)[1]),
     False),                                                                     # detached formula (Eq. 11)
    (lambda V, m, G: (grads_projection(V, m, G)[0], (G * V).sum(dim=1)), False),  # g_m without dividing by ‖v‖
    (lambda V, m, G: (grads_projection(V, m, G)[0] / m[:, None], grads_projection(V, m, G)[1]),
     False),                                                                     # forgot the factor m
])
def test_dora_magnitude_grad(fn, ok):
    assert bool(check_dora_magnitude_grad(fn)) is ok
