"""The LoRA-FA / VeRA chapter's exercise checks: each passes two different correct answers and fails typical
mistakes (g_B transposed, s forgotten, batch dims not flattened; Λ_b and Λ_d on the wrong side, the wrong end
of the shared matrices sliced; A, B copied into trainable parameters, d initialised at 0, ...).

The correct answers are written independently of minipeft (plain tensors), so a check that accepted anything
would fail the broken cases here.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minipeft.exercises import check_lora_fa_grad, check_vera_delta, check_vera_linear


def results(report):
    return [ok for _, ok in report]


# -- exercise 1: LoRA-FA's gradient of B from A·x ---------------------------------------------------
def grad_flatten(Ax, g_y, s):
    return s * g_y.reshape(-1, g_y.shape[-1]).T @ Ax.reshape(-1, Ax.shape[-1])


def grad_einsum(Ax, g_y, s):  # a second correct answer: an einsum over every leading dim
    return s * torch.einsum("...o,...r->or", g_y, Ax)


@pytest.mark.parametrize("fn", [grad_flatten, grad_einsum])
def test_lora_fa_grad_correct_passes(fn):
    assert check_lora_fa_grad(fn)


@pytest.mark.parametrize("fn, expected", [
    (lambda Ax, g_y, s: s * Ax.reshape(-1, Ax.shape[-1]).T @ g_y.reshape(-1, g_y.shape[-1]),
     [False, False, False]),                                                          # transposed: (r, d_out)
    (lambda Ax, g_y, s: g_y.reshape(-1, g_y.shape[-1]).T @ Ax.reshape(-1, Ax.shape[-1]),
     [True, False, False]),                                                           # s forgotten
    (lambda Ax, g_y, s: s * g_y.T @ Ax, [True, True, False]),                         # 3-D inputs not flattened
])
def test_lora_fa_grad_broken_fails(fn, expected):
    report = check_lora_fa_grad(fn)
    assert not report
    assert results(report) == expected


# -- exercise 2: VeRA's ΔW from the shared A, B and the two vectors ------------------------------------
def delta_broadcast(A, B, b, d, d_in, d_out):
    return (b[:, None] * B[:d_out]) @ (d[:, None] * A[:, :d_in])


def delta_diag(A, B, b, d, d_in, d_out):  # a second correct answer: explicit diagonal matrices, narrow()
    return torch.diag(b) @ B.narrow(0, 0, d_out) @ torch.diag(d) @ A.narrow(1, 0, d_in)


@pytest.mark.parametrize("fn", [delta_broadcast, delta_diag])
def test_vera_delta_correct_passes(fn):
    assert check_vera_delta(fn)


@pytest.mark.parametrize("fn, expected", [
    (lambda A, B, b, d, d_in, d_out: B[:d_out] @ A[:, :d_in], [False, False, False]),  # the vectors ignored
    (lambda A, B, b, d, d_in, d_out: (b[:, None] * B[-d_out:]) @ (d[:, None] * A[:, -d_in:]),
     [True, False, True]),                                                           # slices from the wrong end
    (lambda A, B, b, d, d_in, d_out: (d[None, :] * B[:d_out]) @ A[:, :d_in] * b.sum(),
     [False, False, True]),                                                          # b applied as a scalar
])
def test_vera_delta_broken_fails(fn, expected):
    report = check_vera_delta(fn)
    assert not report
    assert results(report) == expected


# -- exercise 3: a VeRA layer -----------------------------------------------------------------------
class BufferVeRA(nn.Module):
    """Shared A, B as buffers, the branch computed in the efficient order (no ΔW formed)."""

    def __init__(self, base, A, B, d_init=0.1, train_AB=False, copy_AB=False):
        super().__init__()
        self.base = base.requires_grad_(False)
        A, B = A[:, :base.in_features], B[:base.out_features]
        if train_AB:
            self.A, self.B = nn.Parameter(A.clone()), nn.Parameter(B.clone())
        else:
            self.register_buffer("A", A.clone() if copy_AB else A)
            self.register_buffer("B", B.clone() if copy_AB else B)
        self.lambda_b = nn.Parameter(torch.zeros(base.out_features))
        self.lambda_d = nn.Parameter(torch.full((A.shape[0],), float(d_init)))

    def forward(self, x):
        return self.base(x) + self.lambda_b * F.linear(self.lambda_d * F.linear(x, self.A), self.B)


class DenseVeRA(nn.Module):
    """A second correct answer: peft's names, the shared tensors kept whole as plain attributes, ΔW formed."""

    def __init__(self, base, A, B):
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        self.shared = (A, B)  # a tuple attribute: neither parameter nor buffer
        self.vera_lambda_b = nn.Parameter(torch.zeros(base.out_features))
        self.vera_lambda_d = nn.Parameter(torch.ones(A.shape[0]) / 10)

    def forward(self, x):
        A, B = self.shared
        d_out, d_in = self.base_layer.weight.shape
        dW = torch.diag(self.vera_lambda_b) @ B[:d_out] @ torch.diag(self.vera_lambda_d) @ A[:, :d_in]
        return self.base_layer(x) + x @ dW.T


class SwappedVeRA(BufferVeRA):
    """b applied before B (on the r dims, cut to d_out), d after: the two vectors on the wrong sides."""

    def __init__(self, base, A, B):
        super().__init__(base, A, B)
        self.lambda_b = nn.Parameter(torch.zeros(base.out_features))
        self.lambda_d = nn.Parameter(torch.full((A.shape[0],), 0.1))

    def forward(self, x):
        h = F.linear(x, self.A)                                       # (..., r)
        return self.base(x) + F.linear(h, self.B) * self.lambda_d.mean() * self.lambda_b.flip(0)


@pytest.mark.parametrize("cls", [BufferVeRA, DenseVeRA])
def test_vera_linear_correct_passes(cls):
    assert check_vera_linear(cls)


@pytest.mark.parametrize("broken, failing", [
    (lambda base, A, B: BufferVeRA(base, A, B, train_AB=True), [1]),      # A, B became trainable parameters
    (lambda base, A, B: BufferVeRA(base, A, B, d_init=0.0), [0]),         # d = 0: b's gradient is 0 at the start
    (SwappedVeRA, [2]),                                                   # the vectors on the wrong sides
])
def test_vera_linear_broken_fails(broken, failing):
    report = check_vera_linear(broken)
    assert not report
    assert [i for i, ok in enumerate(results(report)) if not ok] == failing
