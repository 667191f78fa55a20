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


def decompose_in_place(W):  # a third: divide the given tensor in place, vector_norm over the last dim
    m = torch.linalg.vector_norm(W, dim=-1)
    return m, W.div_(m.unsqueeze(1))


@pytest.mark.parametrize("fn", [decompose_norm, decompose_normalize, decompose_in_place])
def test_weight_norm_correct_passes(fn):
    assert check_weight_norm(fn)


@pytest.mark.parametrize("fn, expected", [
    (lambda W: (W.norm(dim=0), W / W.norm(dim=0, keepdim=True)), [False, False, False]),  # column norm
    (lambda W: (W.norm().expand(W.shape[0]), W / W.norm()), [True, False, False]),        # Frobenius norm
    (lambda W: (W.norm(dim=1), W), [True, False, False]),                                 # D not normalised
    (lambda W: (W.norm(dim=1, keepdim=True), W / W.norm(dim=1, keepdim=True)), [False, True, True]),  # keepdim m
    (lambda W: decompose_norm(W)[::-1], [False, False, False]),                           # (D, m): wrong order
])
def test_weight_norm_broken_fails(fn, expected):
    report = check_weight_norm(fn)
    assert not report
    assert results(report) == expected


def test_weight_norm_shape_named(capsys):
    check_weight_norm(lambda W: (W.norm(dim=1, keepdim=True), W / W.norm(dim=1, keepdim=True)))
    assert "m has shape (7, 1); expected (d_out,) = (7,)" in capsys.readouterr().out


def test_weight_norm_raising_is_a_fail(capsys):
    report = check_weight_norm(lambda W: W.norm(dim=2))  # IndexError inside the learner's code
    assert not report and not any(results(report))
    assert "IndexError" in capsys.readouterr().out


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


class PeftFormulaDoRA(nn.Module):
    """A third correct answer: peft's rearranged forward base(x) + (m/n − 1)·W0 x + (m/n)·s·BAx, and the other
    zero-product init (A = 0, B random), which the text allows: it starts at the base layer too."""

    def __init__(self, base, r, alpha):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad = False
        self.A = nn.Parameter(torch.zeros(r, base.in_features))
        self.B = nn.Parameter(torch.randn(base.out_features, r) * 0.1)
        self.m = nn.Parameter(torch.sqrt((base.weight.detach() ** 2).sum(1)))
        self.s = alpha / r

    def forward(self, x):
        with torch.no_grad():
            n = torch.linalg.norm(self.base.weight + self.s * torch.matmul(self.B, self.A), dim=1)
        k = self.m / n
        return self.base(x) + (k - 1) * F.linear(x, self.base.weight) + k * (self.s * (x @ self.A.T) @ self.B.T)


@pytest.mark.parametrize("cls", [EfficientDoRA, DenseDoRA, PeftFormulaDoRA])
def test_dora_linear_correct_passes(cls):
    assert check_dora_linear(cls)


@pytest.mark.parametrize("broken, failing", [
    (lambda b, r, a: EfficientDoRA(b, r, a, m_init="ones"), [0]),          # m not initialised from W0
    (lambda b, r, a: EfficientDoRA(b, r, a, norm_dim=0), [0, 3, 4]),       # column norm, not row norm
    (lambda b, r, a: EfficientDoRA(b, r, a, detach=False), [4]),           # norm not detached
    (lambda b, r, a: EfficientDoRA(b, r, a, bias_scaled=True), [3, 4]),    # bias scaled by m/n
    (lambda b, r, a: PeftNoScale(b, r, a), [3, 4]),                         # s = α/r forgotten (with A = 0 at init)
    (lambda b, r, a: Unfrozen(b, r, a), [1, 2]),                            # base layer left trainable
    (lambda b, r, a: TransposedA(b, r, a), [1, 3, 4]),                      # A stored as (d_in, r)
])
def test_dora_linear_broken_fails(broken, failing):
    report = check_dora_linear(broken)
    assert not report
    assert [i for i, ok in enumerate(results(report)) if not ok] == failing


class PeftNoScale(PeftFormulaDoRA):
    def __init__(self, base, r, alpha):
        super().__init__(base, r, alpha)
        self.s = 1.0


class Unfrozen(EfficientDoRA):
    def __init__(self, base, r, alpha):
        super().__init__(base, r, alpha)
        self.base.requires_grad_(True)


class TransposedA(EfficientDoRA):
    """A kept as (d_in, r) and used as x @ A: the text asks for A (r, d_in)."""

    def __init__(self, base, r, alpha):
        super().__init__(base, r, alpha)
        self.A = nn.Parameter(self.A.detach().T.clone())

    def forward(self, x):
        V = self.base.weight + self.s * self.B @ self.A.T
        n = V.norm(dim=1).detach()
        return (self.m / n) * (F.linear(x, self.base.weight) + self.s * x @ self.A @ self.B.T) + self.base.bias


def test_dora_linear_shape_named(capsys):
    check_dora_linear(TransposedA)
    assert "A has shape (12, 3); expected (r, d_in) = (3, 12)" in capsys.readouterr().out


class Raising(EfficientDoRA):
    def __init__(self, base, r, alpha):
        super().__init__(base, r, alpha)
        self.B = nn.Parameter(torch.zeros(r, base.out_features))  # B transposed: the learner's forward raises


def test_dora_linear_raising_is_a_fail():
    assert not check_dora_linear(Raising)  # an error in the learner's forward: FAIL lines, no traceback
    report = check_dora_linear(lambda b, r, a: 1 / 0)  # an error in the constructor: every line fails
    assert not any(results(report))


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
    (lambda V, m, G: grads_column(V, m, G), False),                              # column norms
    (lambda V, m, G: (grads_projection(V, m, G)[0], grads_projection(V, m, G)[1][:, None]), False),  # g_m (d_out, 1)
    (lambda V, m, G: (grads_projection(V, m, G)[0], torch.zeros(())), False),   # g_m a scalar
])
def test_dora_magnitude_grad(fn, ok):
    assert results(check_dora_magnitude_grad(fn)) == [ok]  # one line: its hint is the one shown


def grads_column(V, m, G):  # mistake: the norm of each column of V, as in the paper's (d_in, d_out) layout
    n = V.norm(dim=0, keepdim=True)
    u = V / n
    return m[:, None] / n * (G - (G * u).sum(dim=0, keepdim=True) * u), (G * u).sum(dim=1)


def test_dora_magnitude_grad_shape_named(capsys):
    check_dora_magnitude_grad(lambda V, m, G: (grads_projection(V, m, G)[0], grads_projection(V, m, G)[1][:, None]))
    assert "g_m has shape (6, 1); expected m's shape (d_out,) = (6,)" in capsys.readouterr().out


def test_dora_magnitude_grad_raising_is_a_fail():
    report = check_dora_magnitude_grad(lambda V, m, G: (m[:, None] / V.norm(dim=1)) @ G)  # a shape error
    assert not report and results(report) == [False]
