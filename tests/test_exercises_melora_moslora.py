"""The MELoRA / MoSLoRA chapter's exercise checks: each passes two different correct answers and fails
typical mistakes (concatenated instead of block-diagonal blocks, strided instead of contiguous slices, the
scale forgotten, the outputs summed, a zero mixer, the mixer transposed, the mixer frozen, ...).

The correct answers are written independently of minipeft (plain tensors), so a check that accepted
anything would fail the broken cases here.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minipeft.exercises import check_melora_branch, check_melora_delta, check_moslora_linear


def failing(report):
    return [i for i, (_, ok) in enumerate(report) if not ok]


# -- exercise 1: MELoRA's ΔW ------------------------------------------------------------------------
def delta_block_diag(A, B, scale):
    return scale * torch.block_diag(*(B @ A))


def delta_filled(A, B, scale):  # a second correct answer: fill the blocks of a zero matrix in a loop
    n, r, k = A.shape
    o = B.shape[1]
    dW = torch.zeros(n * o, n * k)
    for i in range(n):
        dW[i * o:(i + 1) * o, i * k:(i + 1) * k] = scale * B[i] @ A[i]
    return dW


def delta_padded(A, B, scale):  # a third: each block row padded with zeros left and right, then stacked
    n, _, k = A.shape
    return torch.cat([F.pad(scale * B[i] @ A[i], (i * k, (n - 1 - i) * k)) for i in range(n)], dim=0)


@pytest.mark.parametrize("fn", [delta_block_diag, delta_filled, delta_padded])
def test_melora_delta_correct_passes(fn):
    assert check_melora_delta(fn)


@pytest.mark.parametrize("fn, fails", [
    (lambda A, B, s: s * torch.cat(list(B @ A), dim=1), [0, 1, 2]),                  # concatenated, not diagonal
    (lambda A, B, s: torch.block_diag(*(B @ A)), [2]),                               # scale forgotten
    (lambda A, B, s: s * torch.block_diag(*(B @ A).flip(0)), [2]),                   # blocks in reverse order
    (lambda A, B, s: s * torch.cat([torch.cat([B[i] @ A[j] for j in range(len(A))], 1)  # every B_i A_j: dense
                                    for i in range(len(A))], 0), [1, 2]),
    (lambda A, B, s: s * torch.block_diag(*(A.mT @ B.mT)), [0, 1, 2]),              # ΔWᵀ: (d_in, d_out)
])
def test_melora_delta_broken_fails(fn, fails):
    report = check_melora_delta(fn)
    assert not report and failing(report) == fails


def test_melora_delta_shape_named(capsys):
    check_melora_delta(lambda A, B, s: s * torch.block_diag(*(A.mT @ B.mT)))
    assert "ΔW has shape (12, 8) for n=4, d_in=12, d_out=8; expected (d_out, d_in) = (8, 12)" in capsys.readouterr().out


def test_melora_delta_raising_is_a_fail(capsys):
    report = check_melora_delta(lambda A, B, s: s * torch.block_diag(B @ A))  # one 3-D tensor, not n matrices
    assert not report and not any(_ok for _, _ok in report)
    assert "RuntimeError" in capsys.readouterr().out


# -- exercise 2: MELoRA's forward branch --------------------------------------------------------------
def branch_einsum(x, A, B, scale):
    n = A.shape[0]
    xs = x.reshape(*x.shape[:-1], n, -1)
    return scale * torch.einsum("...nr,nor->...no", torch.einsum("...nk,nrk->...nr", xs, A), B).flatten(-2)


def branch_loop(x, A, B, scale):  # a second correct answer: the official code's loop over minis
    chunks = x.chunk(A.shape[0], dim=-1)
    return torch.cat([scale * (c @ A[i].T) @ B[i].T for i, c in enumerate(chunks)], dim=-1)


def branch_bmm(x, A, B, scale):  # a third: batched matmuls over the minis, tokens flattened and restored
    n, _, k = A.shape
    xs = x.reshape(-1, n, k).transpose(0, 1)                  # (n, N, k)
    y = torch.bmm(torch.bmm(xs, A.transpose(1, 2)), B.transpose(1, 2)) * scale   # (n, N, d_out/n)
    return y.transpose(0, 1).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("fn", [branch_einsum, branch_loop, branch_bmm])
def test_melora_branch_correct_passes(fn):
    assert check_melora_branch(fn)


def strided(x, A, B, scale):  # slices x[..., i::n] instead of contiguous pieces
    n = A.shape[0]
    xs = x.reshape(*x.shape[:-1], -1, n).transpose(-1, -2)
    return scale * torch.einsum("...nr,nor->...no", torch.einsum("...nk,nrk->...nr", xs, A), B).flatten(-2)


def summed(x, A, B, scale):  # adds the minis' outputs (an "ensemble" average) and tiles the sum to d_out
    outs = [scale * (c @ A[i].T) @ B[i].T for i, c in enumerate(x.chunk(A.shape[0], dim=-1))]
    return torch.stack(outs).sum(0).tile(A.shape[0])


def matrix_only(x, A, B, scale):  # works for (batch, d_in) only: flattens every leading dimension away
    x2 = x.reshape(-1, x.shape[-1])
    return branch_loop(x2, A, B, scale).reshape(x.shape[0], -1)


def detached(x, A, B, scale):  # right numbers, but the factors are cut out of the graph
    return branch_loop(x, A.detach(), B.detach(), scale) + 0 * (A.sum() + B.sum())


@pytest.mark.parametrize("fn, fails", [
    (strided, [0, 1, 2]),
    (summed, [0, 1, 2]),
    (lambda x, A, B, s: branch_loop(x, A, B, 1.0), [0, 1, 2]),  # scale forgotten
    (matrix_only, [1]),
    (detached, [2]),
])
def test_melora_branch_broken_fails(fn, fails):
    report = check_melora_branch(fn)
    assert not report and failing(report) == fails


def test_melora_branch_raising_is_a_fail(capsys):  # subscripts written for (tokens, d_in) only: 3-D input raises
    def two_d_only(x, A, B, scale):
        xs = x.reshape(x.shape[0], A.shape[0], -1)
        return scale * torch.einsum("bnr,nor->bno", torch.einsum("bnk,nrk->bnr", xs, A), B).flatten(1)
    report = check_melora_branch(two_d_only)
    assert failing(report) == [1]
    assert "RuntimeError" in capsys.readouterr().out


# -- exercise 3: a MoSLoRA layer ------------------------------------------------------------------------
class Mos(nn.Module):
    """y = W0 x + b + s B M A x with A, M kaiming-uniform and B = 0 (the official init)."""

    def __init__(self, base, r, alpha, m_init="kaiming", transpose_m=False, freeze_m=False):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.A = nn.Parameter(torch.empty(r, base.in_features))
        self.M = nn.Parameter(torch.empty(r, r), requires_grad=not freeze_m)
        self.B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        if m_init == "kaiming":
            nn.init.kaiming_uniform_(self.M, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.M)
        self.s, self.t = alpha / r, transpose_m

    def forward(self, x):
        M = self.M.T if self.t else self.M
        return self.base(x) + self.s * x @ self.A.T @ M.T @ self.B.T


class MosLinear(nn.Module):
    """A second correct answer: the official code's names, three nn.Linear, M starting orthogonal."""

    def __init__(self, base, r, alpha):
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_AB = nn.Linear(r, r, bias=False)
        nn.init.orthogonal_(self.lora_AB.weight)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / r

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_AB(self.lora_A(x))) * self.scaling


class MosMerged(nn.Module):
    """A third correct answer: A and M as raw Parameters initialised like nn.Linear, the merged weight in forward."""

    def __init__(self, base, r, alpha):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.A = nn.Parameter(nn.Linear(base.in_features, r, bias=False).weight.detach().clone())
        self.M = nn.Parameter(nn.Linear(r, r, bias=False).weight.detach().clone())
        self.B = nn.Parameter(torch.zeros(base.out_features, r))
        self.alpha, self.r = alpha, r

    def forward(self, x):
        W = self.base.weight + (self.alpha / self.r) * torch.linalg.multi_dot([self.B, self.M, self.A])
        return F.linear(x, W, self.base.bias)


class MosTransposedA(Mos):
    """A stored as (d_in, r) and used as x @ A: the text asks for A (r, d_in)."""

    def __init__(self, base, r, alpha):
        super().__init__(base, r, alpha)
        self.A = nn.Parameter(self.A.detach().T.clone())

    def forward(self, x):
        return self.base(x) + self.s * x @ self.A @ self.M.T @ self.B.T


@pytest.mark.parametrize("cls", [Mos, MosLinear, MosMerged])
def test_moslora_linear_correct_passes(cls):
    assert check_moslora_linear(cls)


@pytest.mark.parametrize("broken, fails", [
    (lambda b, r, a: Mos(b, r, a, m_init="zeros"), [1]),       # a zero mixer: nothing ever learns
    (lambda b, r, a: Mos(b, r, a, transpose_m=True), [3]),     # the mixer applied transposed
    (lambda b, r, a: Mos(b, r, a, freeze_m=True), [2]),        # the mixer not trained
    (lambda b, r, a: Mos(b, r, 1.0), [3, 4]),                  # alpha ignored: scale 1/r
    (MosTransposedA, [1, 2, 3, 4]),                             # A stored as (d_in, r)
    (lambda b, r, a: Mos(b.requires_grad_(True), r, a).requires_grad_(True), [2]),  # base left trainable
])
def test_moslora_linear_broken_fails(broken, fails):
    report = check_moslora_linear(broken)
    assert not report and failing(report) == fails


def test_moslora_linear_shape_named(capsys):
    check_moslora_linear(MosTransposedA)
    assert "A has shape (12, 3); expected (r, d_in) = (3, 12)" in capsys.readouterr().out


class MosMixerLast(Mos):
    def forward(self, x):  # the mixer after B: (.., d_out) @ (r, r) raises in the learner's forward
        return self.base(x) + self.s * x @ self.A.T @ self.B.T @ self.M.T


def test_moslora_linear_raising_is_a_fail():
    report = check_moslora_linear(MosMixerLast)
    assert not report
    report = check_moslora_linear(lambda b, r, a: Mos(b, r))  # the constructor raises (a missing argument)
    assert not any(ok for _, ok in report)
