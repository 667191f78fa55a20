"""The RoCoFT and Propulsion chapter's exercise checks: each passes several different correct answers and fails
typical mistakes on the right line (columns instead of rows, R starting at zero, R sharing memory with W0, the
base left trainable, rows put back in the wrong place, R detached; z instead of z^k, z^k linearised, the bias left
alone, a transposed weight; the factor k forgotten, the power k instead of k − 1, no sum over the tokens). A
solution that raises gives FAIL lines, never a traceback.

The correct answers are written independently of minipeft (plain tensors).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minipeft.exercises import check_propulsion_grad, check_propulsion_merge, check_rocoft_linear


def failing(report):
    return [i for i, (_, ok) in enumerate(report) if not ok]


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


class IndexedRows(nn.Module):
    """A third: W0 and b kept as buffers, a copy of W0 with rows 0..k-1 assigned from R (autograd follows)."""

    def __init__(self, base, k):
        super().__init__()
        self.register_buffer("W0", base.weight.detach().clone())
        self.register_buffer("b", base.bias.detach().clone())
        self.rocoft_weight = nn.Parameter(self.W0[:k].clone())

    def forward(self, x):
        W = self.W0.clone()
        W[: len(self.rocoft_weight)] = self.rocoft_weight
        return x @ W.T + self.b


class LinearRows(nn.Module):
    """A fourth: R is a bias-free nn.Linear(d_in, k) holding the rows; its outputs replace the first k."""

    def __init__(self, base, k):
        super().__init__()
        self.base, self.k = base, k
        base.weight.requires_grad_(False)
        base.bias.requires_grad_(False)
        self.R = nn.Linear(base.in_features, k, bias=False)
        with torch.no_grad():
            self.R.weight.copy_(base.weight[:k])

    def forward(self, x):
        y = self.base(x)
        return torch.cat([self.R(x) + self.base.bias[:self.k], y[..., self.k:]], dim=-1)


@pytest.mark.parametrize("cls", [CatRows, DeltaRows, IndexedRows, LinearRows])
def test_rocoft_linear_correct_passes(cls):
    assert check_rocoft_linear(cls)


class Columns(nn.Module):
    """Mistake: the first k COLUMNS (inputs) trained: no (k, d_in) tensor at all."""

    def __init__(self, base, k):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.C = nn.Parameter(base.weight.detach()[:, :k].clone())   # (d_out, k)
        self.k = k

    def forward(self, x):
        return F.linear(x, torch.cat([self.C, self.base.weight[:, self.k:]], dim=1), self.base.bias)


class LastRows(CatRows):
    """Mistake: the forward places R at the end of W (rows d_out-k..)."""

    def forward(self, x):
        return F.linear(x, torch.cat([self.base.weight[:-self.k], self.R]), self.base.bias)


class SharedRows(CatRows):
    """Mistake: R = nn.Parameter(base.weight[:k]) without a copy: an optimizer step on R writes into W0."""

    def __init__(self, base, k):
        super().__init__(base, k)
        self.R = nn.Parameter(base.weight.detach()[:k])


class DeltaNotRows(CatRows):
    """Mistake: R holds a change added to the rows (starting at 0), not the rows themselves."""

    def __init__(self, base, k):
        super().__init__(base, k, init="zeros")

    def forward(self, x):
        W = torch.cat([self.base.weight[:self.k] + self.R, self.base.weight[self.k:]])
        return F.linear(x, W, self.base.bias)


class DetachedRows(CatRows):
    """Mistake: R read through .detach() in the forward: nothing reaches it."""

    def forward(self, x):
        return F.linear(x, torch.cat([self.R.detach(), self.base.weight[self.k:]]), self.base.bias)


@pytest.mark.parametrize("cls, fails", [
    (lambda base, k: CatRows(base, k, init="zeros"), [0]),                   # R starts at 0, not W0[:k]
    (lambda base, k: CatRows(base.requires_grad_(True), k, freeze=False), [1]),  # W0 trains
    (Columns, [0, 1, 2, 3]),                                                 # columns, not rows
    (LastRows, [0, 2, 3]),                                                   # rows put back in the wrong place
    (SharedRows, [0]),
    (DeltaNotRows, [0, 2]),
    (DetachedRows, [3]),
])
def test_rocoft_linear_broken_fails_on_its_line(cls, fails):
    report = check_rocoft_linear(cls)
    assert not report and failing(report) == fails


def test_rocoft_linear_names_shape_and_sharing(capsys):
    class TransposedR(CatRows):  # R stored (d_in, k)
        def __init__(self, base, k):
            super().__init__(base, k)
            self.R = nn.Parameter(base.weight.detach()[:k].T.clone())

    assert failing(check_rocoft_linear(TransposedR)) == [0, 1, 2, 3]
    assert "R has shape (9, 2); expected (k, d_in) = (2, 9)" in capsys.readouterr().out
    check_rocoft_linear(SharedRows)
    assert "R shares memory with it" in capsys.readouterr().out


def test_rocoft_linear_raising_is_a_fail_not_a_traceback():
    class Typo(CatRows):
        def forward(self, x):
            return F.linear(x, torch.cat([self.R, self.base.weight[self.k:]]), self.bias)  # no self.bias

    report = check_rocoft_linear(Typo)
    assert not report and failing(report) == [0, 2, 3]

    class InitFails(nn.Module):
        def __init__(self, base, k):
            super().__init__()
            self.R = nn.Parameter(base.weight[:k].detach().clone().view(k, -1, 4))  # 9 columns do not split by 4

    report = check_rocoft_linear(InitFails)
    assert not report and failing(report) == [0, 1, 2, 3]


# -- exercise 2: Propulsion's merged layer ---------------------------------------------------------
def merge_rows(W0, b, z, k):
    p = z**k
    return p[:, None] * W0, p * b


def merge_diag(W0, b, z, k):  # an explicit diagonal matrix
    D = torch.diag(torch.pow(z, k))
    return D @ W0, D @ b


def merge_in_place(W0, b, z, k):  # in place on the tensors it was given, z^k as exp(k log z)
    s = torch.exp(k * torch.log(z))
    W0.mul_(s.unsqueeze(1))
    b.mul_(s)
    return W0, b


@pytest.mark.parametrize("fn", [merge_rows, merge_diag, merge_in_place])
def test_propulsion_merge_correct_passes(fn):
    assert check_propulsion_merge(fn)


@pytest.mark.parametrize("fn, fails", [
    (lambda W0, b, z, k: (z[:, None] * W0, z * b), [1, 2, 3]),                               # z, not z^k
    (lambda W0, b, z, k: ((1 + k * (z - 1))[:, None] * W0, (1 + k * (z - 1)) * b), [1, 2, 3]),  # 1 + k(z − 1)
    (lambda W0, b, z, k: ((z * k)[:, None] * W0, z * k * b), [1, 2, 3]),                      # z·k, not z^k
    (lambda W0, b, z, k: ((z**k)[:, None] * W0, b), [2, 3]),                                   # bias left alone
    (lambda W0, b, z, k: (((z**k)[:, None] * W0).T, (z**k) * b), [0, 1, 3]),                   # W transposed
])
def test_propulsion_merge_broken_fails_on_its_line(fn, fails):
    report = check_propulsion_merge(fn)
    assert not report and failing(report) == fails


def test_propulsion_merge_shape_and_raising(capsys):
    check_propulsion_merge(lambda W0, b, z, k: (((z**k)[:, None] * W0).T, (z**k) * b))
    assert "W (like W0, (d_out, d_in)) has shape (6, 5); expected (5, 6)" in capsys.readouterr().out
    # columns: (d_out,) against d_in columns does not broadcast; the learner's error is a FAIL line
    report = check_propulsion_merge(lambda W0, b, z, k: (W0 * (z**k)[None, :], (z**k) * b))
    assert not report and failing(report) == [0, 1, 2, 3]


# -- exercise 3: the gradient of z -----------------------------------------------------------------
def grad_formula(y0, g, z, k):
    return k * z ** (k - 1) * (y0 * g).sum(dim=(0, 1))


def grad_flat(y0, g, z, k):  # flatten the tokens, an einsum
    d = y0.shape[-1]
    per_out = torch.einsum("nd,nd->d", y0.reshape(-1, d), g.reshape(-1, d))
    return k * torch.pow(z, k - 1) * per_out


def grad_loops(y0, g, z, k):  # explicit loops over batch and tokens, chain rule written out
    total = torch.zeros_like(z)
    for b in range(y0.shape[0]):
        for t in range(y0.shape[1]):
            total += g[b, t] * y0[b, t]
    return total * k * z ** (k - 1)


@pytest.mark.parametrize("fn", [grad_formula, grad_flat, grad_loops])
def test_propulsion_grad_correct_passes(fn):
    assert check_propulsion_grad(fn)


@pytest.mark.parametrize("fn, fails", [
    (lambda y0, g, z, k: z ** (k - 1) * (y0 * g).sum(dim=(0, 1)), [1, 2]),        # factor k forgotten
    (lambda y0, g, z, k: k * z**k * (y0 * g).sum(dim=(0, 1)), [2]),                # power k, not k - 1
    (lambda y0, g, z, k: k * z ** (k - 1) * (y0 * g).mean(dim=(0, 1)), [1, 2]),    # mean, not sum
    (lambda y0, g, z, k: k * z ** (k - 1) * (y0 * g), [0, 1, 2]),                  # no sum over tokens
    (lambda y0, g, z, k: k * z ** (k - 1) * (y0 * g).sum(0), [0, 1, 2]),           # summed over the batch only
])
def test_propulsion_grad_broken_fails_on_its_line(fn, fails):
    report = check_propulsion_grad(fn)
    assert not report and failing(report) == fails


def test_propulsion_grad_shape_and_raising(capsys):
    check_propulsion_grad(lambda y0, g, z, k: k * z ** (k - 1) * (y0 * g).sum(0))
    assert "has shape (4, 6); expected (6,)" in capsys.readouterr().out
    report = check_propulsion_grad(lambda y0, g, z, k: k * z ** (k - 1) * (y0 @ g).sum((0, 1)))  # (3,4,6)@(3,4,6)
    assert not report and failing(report) == [0, 1, 2]


def test_unstarted_stubs_are_invitations():
    class Stub(nn.Module):  # the class is built inside the checks: a stub is "to do", not a traceback
        def __init__(self, base, k):
            raise NotImplementedError("your code here")

    def stub(*args):
        raise NotImplementedError("your code here")

    for report in (check_rocoft_linear(Stub), check_propulsion_merge(stub), check_propulsion_grad(stub)):
        assert not report and not report.attempted
