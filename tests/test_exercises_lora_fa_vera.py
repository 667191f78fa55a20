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


def grad_loop(Ax, g_y, s):  # a third: a sum of outer products, one per token, with flatten(0, -2)
    g = torch.zeros(g_y.shape[-1], Ax.shape[-1])
    for a, gy in zip(Ax.flatten(0, -2), g_y.flatten(0, -2)):
        g += torch.outer(gy, a)
    return s * g


@pytest.mark.parametrize("fn", [grad_flatten, grad_einsum, grad_loop])
def test_lora_fa_grad_correct_passes(fn):
    assert check_lora_fa_grad(fn)


@pytest.mark.parametrize("fn, expected", [
    (lambda Ax, g_y, s: s * Ax.reshape(-1, Ax.shape[-1]).T @ g_y.reshape(-1, g_y.shape[-1]),
     [False, False, False]),                                                          # transposed: (r, d_out)
    (lambda Ax, g_y, s: g_y.reshape(-1, g_y.shape[-1]).T @ Ax.reshape(-1, Ax.shape[-1]),
     [True, False, False]),                                                           # s forgotten
    (lambda Ax, g_y, s: s * g_y.mT @ Ax, [True, True, False]),                        # 3-D inputs not flattened
    (lambda Ax, g_y, s: grad_flatten(Ax, g_y, s) / Ax[..., 0].numel(), [True, False, False]),  # mean over tokens
])
def test_lora_fa_grad_broken_fails(fn, expected):
    report = check_lora_fa_grad(fn)
    assert not report
    assert results(report) == expected


def test_lora_fa_grad_shape_named(capsys):
    check_lora_fa_grad(lambda Ax, g_y, s: s * Ax.reshape(-1, Ax.shape[-1]).T @ g_y.reshape(-1, g_y.shape[-1]))
    assert "g_B has shape (3, 7); expected B's shape (d_out, r) = (7, 3)" in capsys.readouterr().out


def test_lora_fa_grad_raising_is_a_fail(capsys):  # only g_y flattened: (d_out, 8) @ (2, 4, r) raises for 3-D inputs
    report = check_lora_fa_grad(lambda Ax, g_y, s: s * g_y.reshape(-1, g_y.shape[-1]).T @ Ax)
    assert results(report) == [True, True, False]
    assert "RuntimeError" in capsys.readouterr().out


# -- exercise 2: VeRA's ΔW from the shared A, B and the two vectors ------------------------------------
def delta_broadcast(A, B, b, d, d_in, d_out):
    return (b[:, None] * B[:d_out]) @ (d[:, None] * A[:, :d_in])


def delta_diag(A, B, b, d, d_in, d_out):  # a second correct answer: explicit diagonal matrices, narrow()
    return torch.diag(b) @ B.narrow(0, 0, d_out) @ torch.diag(d) @ A.narrow(1, 0, d_in)


def delta_einsum(A, B, b, d, d_in, d_out):  # a third: one einsum on the sliced factors
    return torch.einsum("o,or,r,ri->oi", b, B[:d_out], d, A[:, :d_in])


@pytest.mark.parametrize("fn", [delta_broadcast, delta_diag, delta_einsum])
def test_vera_delta_correct_passes(fn):
    assert check_vera_delta(fn)


@pytest.mark.parametrize("fn, expected", [
    (lambda A, B, b, d, d_in, d_out: B[:d_out] @ A[:, :d_in], [False, False, False]),  # the vectors ignored
    (lambda A, B, b, d, d_in, d_out: (b[:, None] * B[-d_out:]) @ (d[:, None] * A[:, -d_in:]),
     [True, False, True]),                                                           # slices from the wrong end
    (lambda A, B, b, d, d_in, d_out: (d[None, :] * B[:d_out]) @ A[:, :d_in] * b.sum(),
     [False, False, True]),                                                          # b applied as a scalar
    (lambda A, B, b, d, d_in, d_out: (b[:, None] * B[:d_out]) @ (d[:, None] * A), [True, False, True]),  # A unsliced
])
def test_vera_delta_broken_fails(fn, expected):
    report = check_vera_delta(fn)
    assert not report
    assert results(report) == expected


def test_vera_delta_shape_named(capsys):
    check_vera_delta(lambda A, B, b, d, d_in, d_out: (b[:, None] * B[:d_out]) @ (d[:, None] * A))
    assert "for a 9×5 layer ΔW has shape (9, 11); expected (d_out, d_in) = (9, 5)" in capsys.readouterr().out


def test_vera_delta_raising_is_a_fail():  # the two vectors on the wrong sides: a broadcast error in the learner's code
    report = check_vera_delta(lambda A, B, b, d, d_in, d_out: (d[:, None] * B[:d_out]) @ (b[:, None] * A[:, :d_in]))
    assert not report and not any(results(report))


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


class FrozenParamVeRA(nn.Module):
    """A third correct answer: A, B kept as frozen nn.Parameters that share the given storage (nn.Parameter does
    not copy), sliced in forward; the vectors initialised in place."""

    def __init__(self, base, A, B):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.base.bias.requires_grad_(False)
        self.A = nn.Parameter(A, requires_grad=False)
        self.B = nn.Parameter(B, requires_grad=False)
        self.b = nn.Parameter(torch.empty(base.out_features))
        self.d = nn.Parameter(torch.empty(A.shape[0]))
        nn.init.zeros_(self.b)
        nn.init.constant_(self.d, 0.1)

    def forward(self, x):
        d_out, d_in = self.base.weight.shape
        return self.base(x) + torch.einsum("o,or,r,ri,ni->no", self.b, self.B[:d_out], self.d, self.A[:, :d_in], x)


@pytest.mark.parametrize("cls", [BufferVeRA, DenseVeRA, FrozenParamVeRA])
def test_vera_linear_correct_passes(cls):
    assert check_vera_linear(cls)


class WideLambdaB(BufferVeRA):
    """lambda_b sized to the shared B (d_out + 2) instead of this layer's d_out; forward cuts it."""

    def __init__(self, base, A, B):
        super().__init__(base, A, B)
        self.lambda_b = nn.Parameter(torch.zeros(B.shape[0]))

    def forward(self, x):
        d_out = self.base.out_features
        return self.base(x) + self.lambda_b[:d_out] * F.linear(self.lambda_d * F.linear(x, self.A), self.B)


@pytest.mark.parametrize("broken, failing", [
    (lambda base, A, B: BufferVeRA(base, A, B, train_AB=True), [1, 3]),   # A, B copied into trainable parameters
    (lambda base, A, B: BufferVeRA(base, A, B, d_init=0.0), [0]),         # d = 0: b's gradient is 0 at the start
    (SwappedVeRA, [2]),                                                   # the vectors on the wrong sides
    (lambda base, A, B: BufferVeRA(base, A, B, copy_AB=True), [3]),       # frozen copies: nothing shared
    (lambda base, A, B: BufferVeRA(base.requires_grad_(True), A, B).requires_grad_(True), [1]),  # nothing frozen
    (WideLambdaB, [0, 1, 2, 3]),                                           # lambda_b over the shared (max) width
])
def test_vera_linear_broken_fails(broken, failing):
    report = check_vera_linear(broken)
    assert not report
    assert [i for i, ok in enumerate(results(report)) if not ok] == failing


def test_vera_linear_shape_named(capsys):
    check_vera_linear(WideLambdaB)
    assert "lambda_b has shape (8,); expected (d_out,) = (6,)" in capsys.readouterr().out


def test_vera_linear_raising_is_a_fail():
    report = check_vera_linear(lambda base, A, B: BufferVeRA(base, A.T, B))  # A given transposed: its slicing fails
    assert not report and not any(results(report))
    assert not check_vera_linear(lambda base, A, B: None)  # no layer at all
    report = check_vera_linear(lambda base, A, B: BufferVeRA(base, A))  # the constructor raises (B missing)
    assert not any(results(report))
