"""The MELoRA / MoSLoRA chapter's exercise checks: each passes two different correct answers and fails
typical mistakes (concatenated instead of block-diagonal blocks, strided instead of contiguous slices, the
scale forgotten, the outputs summed, a zero mixer, the mixer transposed, the mixer frozen, ...).

The correct answers are written independently of minipeft (plain tensors), so a check that accepted
anything would fail the broken cases here.
"""
import math

import pytest
import torch
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


@pytest.mark.parametrize("fn", [delta_block_diag, delta_filled])
def test_melora_delta_correct_passes(fn):
    assert check_melora_delta(fn)


@pytest.mark.parametrize("fn, fails", [
    (lambda A, B, s: s * torch.cat(list(B @ A), dim=1), [0, 1, 2]),                  # concatenated, not diagonal
    (lambda A, B, s: torch.block_diag(*(B @ A)), [2]),                               # scale forgotten
    (lambda A, B, s: s * torch.block_diag(*(B @ A).flip(0)), [2]),                   # blocks in reverse order
    (lambda A, B, s: s * torch.cat([torch.cat([B[i] @ A[j] for j in range(len(A))], 1)  # every B_i A_j: dense
                                    for i in range(len(A))], 0), [1, 2]),
])
def test_melora_delta_broken_fails(fn, fails):
    report = check_melora_delta(fn)
    assert not report and failing(report) == fails


# -- exercise 2: MELoRA's forward branch --------------------------------------------------------------
def branch_einsum(x, A, B, scale):
    n = A.shape[0]
    xs = x.reshape(*x.shape[:-1], n, -1)
    return scale * torch.einsum("...nr,nor->...no", torch.einsum("...nk,nrk->...nr", xs, A), B).flatten(-2)


def branch_loop(x, A, B, scale):  # a second correct answer: the official code's loop over minis
    chunks = x.chunk(A.shape[0], dim=-1)
    return torch.cat([scale * (c @ A[i].T) @ B[i].T for i, c in enumerate(chunks)], dim=-1)


@pytest.mark.parametrize("fn", [branch_einsum, branch_loop])
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


@pytest.mark.parametrize("cls", [Mos, MosLinear])
def test_moslora_linear_correct_passes(cls):
    assert check_moslora_linear(cls)


@pytest.mark.parametrize("broken, fails", [
    (lambda b, r, a: Mos(b, r, a, m_init="zeros"), [1]),       # a zero mixer: nothing ever learns
    (lambda b, r, a: Mos(b, r, a, transpose_m=True), [3]),     # the mixer applied transposed
    (lambda b, r, a: Mos(b, r, a, freeze_m=True), [2]),        # the mixer not trained
    (lambda b, r, a: Mos(b, r, 1.0), [3, 4]),                  # alpha ignored: scale 1/r
])
def test_moslora_linear_broken_fails(broken, fails):
    report = check_moslora_linear(broken)
    assert not report and failing(report) == fails
