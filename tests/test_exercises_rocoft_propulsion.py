"""The RoCoFT and Propulsion chapter's exercise checks: each passes two different correct answers and fails
typical mistakes (columns instead of rows, R starting at zero, the base left trainable, rows put back in the
wrong place, z instead of z^k, z^k linearised, the bias left alone, the factor k forgotten, the power k instead of k − 1, no sum over
the tokens).

The correct answers are written independently of minipeft (plain tensors).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minipeft.exercises import check_propulsion_grad, check_propulsion_merge, check_rocoft_linear


def results(report):
    return [ok for _, ok in report]


# -- exercise 1: a RoCoFT layer --------------------------------------------------------------------
class CatRows(nn.Module):
    """The official code's form: the trained rows concatenated with the frozen rest on every forward."""

    def __init__(self, base, k, init="rows", freeze=True):
        super().__init__()
        self.base = base.requires_grad_(not freeze)
        W0 = base.weight.detach()
        self.R = nn.Parameter(W0[:k].clone() if init == "rows" else torch.zeros(k, base.in_features))
        self.k = k

    def forward(self, x):
        W = torch.cat([self.R, self.base.weight[self.k:]])
        return F.linear(x, W, self.base.bias)


class DeltaRows(nn.Module):
    """A second correct answer: base output plus the change of the k rows, written into the first k outputs."""

    def __init__(self, base, k):
        super().__init__()
        self.lin = base.requires_grad_(False)
        self.rows = nn.Parameter(base.weight.detach()[:k].clone())
        self.k = k

    def forward(self, x):
        y = self.lin(x)
        extra = x @ (self.rows - self.lin.weight[:self.k]).T          # (..., k)
        pad = torch.zeros(*y.shape[:-1], y.shape[-1] - self.k)
        return y + torch.cat([extra, pad], dim=-1)


class Columns(nn.Module):
    """Mistake: the first k COLUMNS (inputs) trained: no (k, d_in) tensor at all."""

    def __init__(self, base, k):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.C = nn.Parameter(base.weight.detach()[:, :k].clone())   # (d_out, k)
        self.k = k

    def forward(self, x):
        return F.linear(x, torch.cat([self.C, self.base.weight[:, self.k:]], dim=1), self.base.bias)


class LastRows(nn.Module):
    """Mistake: the gradient reaches the rows, but the forward places them at the end of W (rows d_out-k..)."""

    def __init__(self, base, k):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.R = nn.Parameter(base.weight.detach()[:k].clone())
        self.k = k

    def forward(self, x):
        return F.linear(x, torch.cat([self.base.weight[:-self.k], self.R]), self.base.bias)


@pytest.mark.parametrize("cls", [CatRows, DeltaRows])
def test_rocoft_linear_correct_passes(cls):
    assert check_rocoft_linear(cls)


@pytest.mark.parametrize("cls, expected", [
    (lambda base, k: CatRows(base, k, init="zeros"), [False, True, True, True]),  # R starts at 0, not W0[:k]
    (lambda base, k: CatRows(base.requires_grad_(True), k, freeze=False), [True, False, True, True]),  # W0 trains
    (Columns, [False, False, False, False]),                                      # columns, not rows
    (LastRows, [False, True, False, False]),                                      # rows put back in the wrong place
])
def test_rocoft_linear_broken_fails(cls, expected):
    report = check_rocoft_linear(cls)
    assert not report
    assert results(report) == expected


# -- exercise 2: Propulsion's merged layer ---------------------------------------------------------
def merge_rows(W0, b, z, k):
    p = z**k
    return p[:, None] * W0, p * b


def merge_diag(W0, b, z, k):  # a second correct answer: an explicit diagonal matrix
    D = torch.diag(torch.pow(z, k))
    return D @ W0, D @ b


@pytest.mark.parametrize("fn", [merge_rows, merge_diag])
def test_propulsion_merge_correct_passes(fn):
    assert check_propulsion_merge(fn)


@pytest.mark.parametrize("fn, expected", [
    (lambda W0, b, z, k: (z[:, None] * W0, z * b), [True, False, False, False]),           # z, not z^k
    (lambda W0, b, z, k: ((1 + k * (z - 1))[:, None] * W0, (1 + k * (z - 1)) * b),
     [True, False, False, False]),                                                       # z^k ≈ 1 + k(z − 1)
    (lambda W0, b, z, k: ((z**k)[:, None] * W0, b), [True, True, False, False]),          # bias left alone
])
def test_propulsion_merge_broken_fails(fn, expected):
    report = check_propulsion_merge(fn)
    assert not report
    assert results(report) == expected


# -- exercise 3: the gradient of z -----------------------------------------------------------------
def grad_formula(y0, g, z, k):
    return k * z ** (k - 1) * (y0 * g).sum(dim=(0, 1))


def grad_flat(y0, g, z, k):  # a second correct answer: flatten the tokens, a matrix-vector product
    d = y0.shape[-1]
    per_out = torch.einsum("nd,nd->d", y0.reshape(-1, d), g.reshape(-1, d))
    return k * torch.pow(z, k - 1) * per_out


@pytest.mark.parametrize("fn", [grad_formula, grad_flat])
def test_propulsion_grad_correct_passes(fn):
    assert check_propulsion_grad(fn)


@pytest.mark.parametrize("fn, expected", [
    (lambda y0, g, z, k: z ** (k - 1) * (y0 * g).sum(dim=(0, 1)), [True, False, False]),   # factor k forgotten
    (lambda y0, g, z, k: k * z**k * (y0 * g).sum(dim=(0, 1)), [True, True, False]),        # power k, not k - 1
    (lambda y0, g, z, k: k * z ** (k - 1) * (y0 * g), [False, False, False]),              # no sum over tokens
])
def test_propulsion_grad_broken_fails(fn, expected):
    report = check_propulsion_grad(fn)
    assert not report
    assert results(report) == expected
