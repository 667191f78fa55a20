"""The LoRA chapter's exercise checks: each passes for a correct answer and fails for a broken one.

The correct answers are written independently of minipeft (plain tensors + autograd as the reference
inside the checks), so a check that accepted anything would fail the `broken` cases here.
"""
import math

import pytest
import torch
from torch import nn

from minipeft.exercises import check_lora_grads, check_lora_init, check_lora_linear


class GoodLoRA(nn.Module):
    def __init__(self, base, r, alpha, scale=None, zero="B", merge_scale=None):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.A = nn.Parameter(torch.empty(r, base.in_features))
        self.B = nn.Parameter(torch.empty(base.out_features, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.normal_(self.B)
        nn.init.zeros_({"B": self.B, "A": self.A, "none": torch.empty(0)}[zero])
        self.s = alpha / r if scale is None else scale
        self.ms = self.s if merge_scale is None else merge_scale
        self.merged = False

    def forward(self, x):
        y = self.base(x)
        return y if self.merged else y + self.s * x @ self.A.T @ self.B.T

    @torch.no_grad()
    def merge(self):
        self.base.weight += self.ms * self.B @ self.A
        self.merged = True


class NotFrozen(GoodLoRA):
    def __init__(self, base, r, alpha):
        super().__init__(base, r, alpha)
        base.requires_grad_(True)


class MergeTwice(GoodLoRA):
    def forward(self, x):  # keeps adding the branch after merging
        return self.base(x) + self.s * x @ self.A.T @ self.B.T


def results(report):
    return [ok for _, ok in report]


class LinearFactors(nn.Module):
    """A second correct layer: nn.Linear factors named lora_A / lora_B, A zero and B random (the transposed
    convention), and a merge that folds B·A into the base weight and then zeroes B instead of a flag."""

    def __init__(self, base, r, alpha):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad = False
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.zeros_(self.lora_A.weight)
        nn.init.normal_(self.lora_B.weight, std=0.02)
        self.scaling = alpha / r

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling

    def merge(self):
        with torch.no_grad():
            self.base.weight.add_(self.scaling * torch.einsum("or,ri->oi", self.lora_B.weight, self.lora_A.weight))
            self.lora_B.weight.zero_()


class CopiedBase(GoodLoRA):
    """A third correct layer: it deep-copies the base layer (the caller's layer stays untouched)."""

    def __init__(self, base, r, alpha):
        import copy
        super().__init__(copy.deepcopy(base), r, alpha)


class NoBranch(GoodLoRA):
    """Never adds the branch, and merge() does nothing: with A zero it looks right until A moves."""

    def __init__(self, base, r, alpha):
        super().__init__(base, r, alpha, zero="A")

    def forward(self, x):
        return self.base(x)

    def merge(self):
        pass


class SwappedShapes(nn.Module):
    def __init__(self, base, r, alpha):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.A = nn.Parameter(torch.zeros(base.in_features, r))  # (d_in, r): transposed
        self.B = nn.Parameter(torch.randn(r, base.out_features))

    def forward(self, x):
        return self.base(x) + x @ self.A @ self.B


class Raises(nn.Module):
    def __init__(self, base, r, alpha):
        super().__init__()
        self.A = nn.Parameter(torch.zeros(r, base.out_features @ 2))  # a learner's typo: int @ int


@pytest.mark.parametrize("cls", [GoodLoRA, LinearFactors, CopiedBase])
def test_lora_linear_correct_passes(cls):
    assert check_lora_linear(cls)


@pytest.mark.parametrize("broken, failing", [
    (lambda b, r, a: GoodLoRA(b, r, a, zero="none"), 0),            # B random: not identity at init
    (NotFrozen, 1),                                                  # base weight trains too
    (lambda b, r, a: GoodLoRA(b, r, a, scale=a / math.sqrt(r)), 3),  # rsLoRA scale where α/r is asked
    (lambda b, r, a: GoodLoRA(b, r, a, zero="A", scale=a * r), 3),  # α·r, hidden at init by a zero A
    (lambda b, r, a: GoodLoRA(b, r, a, merge_scale=1.0), 4),         # merge forgets the scale
    (lambda b, r, a: GoodLoRA(b, r, a, zero="A", merge_scale=1.0), 4),
    (MergeTwice, 4),                                                 # branch added twice after merge
    (NoBranch, 3),                                                   # no branch, no merge
    (SwappedShapes, 1),                                              # A (d_in, r), B (r, d_out): named
])
def test_lora_linear_broken_fails(broken, failing):
    report = check_lora_linear(broken)
    assert not report
    assert not results(report)[failing]


def test_lora_linear_wrong_merge_fails_and_shapes_are_named(capsys):
    assert not results(check_lora_linear(NoBranch))[4]
    check_lora_linear(SwappedShapes)
    assert "A has shape (12, 3); expected (r, d_in) = (3, 12)" in capsys.readouterr().out


def test_lora_linear_raising_constructor_is_a_fail_not_a_traceback(capsys):
    report = check_lora_linear(Raises)
    assert not any(results(report))
    assert "TypeError" in capsys.readouterr().out


def good_grads(x, g_y, A, B, s):
    g_dW = g_y.T @ x  # (d_out, d_in): the gradient a full weight would get, summed over the batch
    return s * B.T @ g_dW, s * g_dW @ A.T


def einsum_grads(x, g_y, A, B, s):  # a second correct answer: per-example chain rule, then a sum
    h = torch.einsum("ni,ri->nr", x, A)               # h = A x, (n, r)
    g_h = s * torch.einsum("no,or->nr", g_y, B)       # ∂L/∂h
    return torch.einsum("nr,ni->ri", g_h, x), s * torch.einsum("no,nr->or", g_y, h)


@pytest.mark.parametrize("fn, ok", [
    (good_grads, True),
    (einsum_grads, True),
    (lambda x, g_y, A, B, s: (x @ y for y in ()), False),                              # raises inside the learner's code
    (lambda x, g_y, A, B, s: (B.T @ (g_y.T @ x), (g_y.T @ x) @ A.T), False),           # scale forgotten
    (lambda x, g_y, A, B, s: (s * B.T @ (g_y.T @ x), s * (g_y.T @ x) @ A), False),    # A not transposed
    (lambda x, g_y, A, B, s: good_grads(x, g_y, A, B, s)[::-1], False),                # swapped
])
def test_lora_grads(fn, ok):
    assert bool(check_lora_grads(fn)) is ok


def init_b_zero(A, B):
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    nn.init.zeros_(B)


def init_a_zero(A, B):  # the transposed convention also starts at ΔW = 0 and trains
    nn.init.zeros_(A)
    nn.init.normal_(B)


def init_copy(A, B):  # a third way: copy values in
    A.copy_(torch.randn(A.shape) / A.shape[1] ** 0.5)
    B.copy_(torch.zeros(B.shape))


def init_rebinds(A, B):  # the caller's tensors are never filled
    A = torch.randn_like(A)  # noqa: F841
    B = torch.zeros_like(B)  # noqa: F841


@pytest.mark.parametrize("fn, expected", [
    (init_b_zero, [True, True, True]),
    (init_a_zero, [True, True, True]),
    (init_copy, [True, True, True]),
    (lambda A, B: (A.zero_(), B.zero_()), [True, False, False]),     # both zero: stuck at a saddle
    (lambda A, B: (A.normal_(), B.normal_()), [False, True, True]),  # both random: does not start at the base
    (lambda A, B: (A.fill_(0.1), B.zero_()), [True, True, False]),    # constant A: rank 1 for ever
    (init_rebinds, [False, False, False]),                            # not in place: NaN stays
])
def test_lora_init(fn, expected):
    assert results(check_lora_init(fn)) == expected
