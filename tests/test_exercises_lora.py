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


def test_lora_linear_correct_passes():
    assert check_lora_linear(GoodLoRA)


@pytest.mark.parametrize("broken, failing", [
    (lambda b, r, a: GoodLoRA(b, r, a, zero="none"), 0),            # B random: not identity at init
    (NotFrozen, 1),                                                  # base weight trains too
    (lambda b, r, a: GoodLoRA(b, r, a, scale=a / math.sqrt(r)), 3),  # rsLoRA scale where α/r is asked
    (lambda b, r, a: GoodLoRA(b, r, a, merge_scale=1.0), 4),         # merge forgets the scale
    (MergeTwice, 4),                                                 # branch added twice after merge
])
def test_lora_linear_broken_fails(broken, failing):
    report = check_lora_linear(broken)
    assert not report
    assert not results(report)[failing]


def good_grads(x, g_y, A, B, s):
    g_dW = g_y.T @ x  # (d_out, d_in): the gradient a full weight would get, summed over the batch
    return s * B.T @ g_dW, s * g_dW @ A.T


@pytest.mark.parametrize("fn, ok", [
    (good_grads, True),
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


@pytest.mark.parametrize("fn, expected", [
    (init_b_zero, [True, True]),
    (init_a_zero, [True, True]),
    (lambda A, B: (A.zero_(), B.zero_()), [True, False]),     # both zero: stuck at a saddle
    (lambda A, B: (A.normal_(), B.normal_()), [False, True]),  # both random: does not start at the base
])
def test_lora_init(fn, expected):
    assert results(check_lora_init(fn)) == expected
