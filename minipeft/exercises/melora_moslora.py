"""Checks for the MELoRA / MoSLoRA chapter's exercises.

    from minipeft.exercises import check_melora_delta, check_melora_branch, check_moslora_linear
    check_melora_delta(my_melora_delta)     # my_melora_delta(A, B, scale) -> ΔW (d_out, d_in)
    check_melora_branch(my_melora_branch)   # my_melora_branch(x, A, B, scale) -> (..., d_out)
    check_moslora_linear(MyMoSLoRALinear)   # MyMoSLoRALinear(base: nn.Linear, r: int, alpha: float)

MELoRA's minis come stacked: A (n, r, d_in/n), B (n, d_out/n, r); mini i reads slice i of x (x[..., i·d_in/n :
(i+1)·d_in/n]) and writes slice i of the output. The references inside the checks are loops over the minis,
torch.block_diag and plain matrix products.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._runner import built_once, find_param, run_checks


def _minis(n, r, d_in, d_out, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, r, d_in // n, generator=g), torch.randn(n, d_out // n, r, generator=g)


def _block_diagonal(A, B, scale):
    return scale * torch.block_diag(*[B[i] @ A[i] for i in range(A.shape[0])])


def check_melora_delta(fn):
    """Check `fn(A, B, scale) -> ΔW` = scale · blockdiag(B_1 A_1, …, B_n A_n), shape (d_out, d_in)."""
    sizes = [(4, 2, 12, 8), (3, 1, 9, 15), (2, 3, 16, 16)]  # (n, r, d_in, d_out): wide, tall, square

    def call(A, B, n, d_in, d_out):
        dW = torch.as_tensor(fn(A.clone(), B.clone(), 0.5))
        assert tuple(dW.shape) == (d_out, d_in), f"ΔW has shape {tuple(dW.shape)} for n={n}, d_in={d_in}, " \
                                                 f"d_out={d_out}; expected (d_out, d_in) = {(d_out, d_in)}"
        return dW

    def shape():
        for n, r, d_in, d_out in sizes:
            call(*_minis(n, r, d_in, d_out, 0), n, d_in, d_out)

    def off_diagonal_zero():
        for n, r, d_in, d_out in sizes:
            A, B = _minis(n, r, d_in, d_out, 1)
            dW = call(A, B, n, d_in, d_out).detach().clone()
            k, o = d_in // n, d_out // n
            for i in range(n):
                dW[i * o:(i + 1) * o, i * k:(i + 1) * k] = 0
            assert torch.count_nonzero(dW.abs() > 1e-6) == 0, \
                "ΔW has non-zero entries outside the n diagonal blocks: mini i must only connect input slice i " \
                "to output slice i"

    def blocks():
        for n, r, d_in, d_out in sizes:
            A, B = _minis(n, r, d_in, d_out, 2)
            want = _block_diagonal(A, B, 0.5)
            got = call(A, B, n, d_in, d_out)
            assert torch.allclose(got, want, atol=1e-5), "the diagonal blocks are not scale · B_i A_i, in order"
            assert torch.linalg.matrix_rank(got) == n * min(r, d_in // n, d_out // n), "rank ΔW is not n·r"

    return run_checks("check_melora_delta", [
        ("shape (d_out, d_in)", "n blocks of (d_out/n, d_in/n) along the diagonal: torch.block_diag", shape),
        ("zero outside the diagonal blocks", "block (i, j) is B_i A_i when i = j and 0 otherwise", off_diagonal_zero),
        ("blocks = scale · B_i A_i, rank n·r", "B[i] @ A[i] for i in range(n), times scale", blocks),
    ], learner=[fn])


def check_melora_branch(fn):
    """Check `fn(x, A, B, scale) -> (..., d_out)`: mini i maps slice i of x (contiguous, d_in/n wide) to
    slice i of the output; equal to x @ ΔWᵀ with ΔW = scale · blockdiag(B_i A_i), for any leading shape."""
    n, r, d_in, d_out = 4, 2, 12, 8
    A, B = _minis(n, r, d_in, d_out, 3)
    W = _block_diagonal(A, B, 0.5)
    x2 = torch.randn(5, d_in, generator=torch.Generator().manual_seed(4))
    x3 = torch.randn(2, 3, d_in, generator=torch.Generator().manual_seed(5))

    def matrix():
        got = fn(x2.clone(), A.clone(), B.clone(), 0.5)
        assert tuple(got.shape) == (5, d_out), f"output shape {tuple(got.shape)}, expected (5, {d_out})"
        assert torch.allclose(got, x2 @ W.T, atol=1e-5), \
            "output is not x @ ΔWᵀ: slice x into n contiguous pieces x[..., i·k:(i+1)·k], concatenate the outputs"

    def batched():
        got = fn(x3.clone(), A.clone(), B.clone(), 0.5)
        assert tuple(got.shape) == (2, 3, d_out), f"output shape {tuple(got.shape)}, expected (2, 3, {d_out})"
        assert torch.allclose(got, x3 @ W.T, atol=1e-5), "wrong output for a (batch, tokens, d_in) input"

    def grads():
        Ag, Bg = A.clone().requires_grad_(), B.clone().requires_grad_()
        g_y = torch.randn(5, d_out, generator=torch.Generator().manual_seed(6))
        y = fn(x2.clone(), Ag, Bg, 0.5)
        assert tuple(y.shape) == (5, d_out), f"output shape {tuple(y.shape)}, expected (5, {d_out})"
        y.backward(g_y)
        Ar, Br = A.clone().requires_grad_(), B.clone().requires_grad_()
        (x2 @ _block_diagonal(Ar, Br, 0.5).T).backward(g_y)
        assert Ag.grad is not None and Bg.grad is not None, "no gradient reached A or B (detached somewhere?)"
        assert torch.allclose(Ag.grad, Ar.grad, atol=1e-4) and torch.allclose(Bg.grad, Br.grad, atol=1e-4), \
            "gradients of A and B differ from those of the dense block-diagonal formula"

    return run_checks("check_melora_branch", [
        ("2-D input: x @ ΔWᵀ", "x.reshape(..., n, d_in // n): slice i is x[..., i*k:(i+1)*k]", matrix),
        ("3-D input (batch, tokens, d_in)", "keep the leading dimensions: x.shape[:-1]", batched),
        ("gradients of A and B", "use only differentiable torch ops on A and B", grads),
    ], learner=[fn])


def check_moslora_linear(cls, d_in: int = 12, d_out: int = 10, r: int = 3, alpha: float = 6.0):
    """Property checks for a learner's MoSLoRA layer `cls(base_linear, r, alpha)` with trainable A (r, d_in),
    mixer M (r, r) and B (d_out, r) (attributes `A`/`M`/`B`, or `lora_A`/`lora_AB`/`lora_B` as nn.Linear):
    y = W0 x + b + (α/r)·B M A x."""
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out)
    W0, b = base.weight.detach().clone(), base.bias.detach().clone()
    x = torch.randn(6, d_in)
    s = alpha / r

    layer = built_once(lambda: cls(base, r, alpha))  # the learner's class, built in the first check

    A = lambda: find_param(layer(), ["A", "lora_A"], (r, d_in), "(r, d_in)")  # noqa: E731
    M = lambda: find_param(layer(), ["M", "lora_AB", "mixer"], (r, r), "(r, r)")  # noqa: E731
    B = lambda: find_param(layer(), ["B", "lora_B"], (d_out, r), "(d_out, r)")  # noqa: E731

    def out():
        y = layer()(x)
        assert tuple(y.shape) == (6, d_out), f"the output has shape {tuple(y.shape)} for x of shape (6, d_in); " \
                                             f"expected (6, d_out) = {(6, d_out)}"
        return y

    def identity():
        assert torch.allclose(out(), base(x), atol=1e-6), "output at init differs from the base layer's"

    def learns():
        for p in (A(), M(), B()):
            p.grad = None
        out().backward(torch.randn(6, d_out))
        g = B().grad
        assert g is not None and g.abs().max() > 1e-4, \
            "at init B gets no gradient: with B = 0 only B can move first, and its gradient is s·g_y (M A x)ᵀ, " \
            "which is zero if M (or A) is zero"

    def trainable():
        params = {id(p) for p in layer().parameters() if p.requires_grad}
        assert params == {id(A()), id(M()), id(B())}, "exactly A, M and B must require grad (freeze the base)"
        n = sum(p.numel() for p in layer().parameters() if p.requires_grad)
        assert n == r * (d_in + d_out) + r * r, f"{n} trainable parameters, expected r(d_in + d_out) + r² = " \
                                                f"{r * (d_in + d_out) + r * r}"

    def forward():
        torch.manual_seed(1)
        with torch.no_grad():
            B().normal_()
            M().copy_(torch.randn(r, r))
        want = F.linear(x, W0 + s * B().detach() @ M().detach() @ A().detach(), b)
        assert torch.allclose(out(), want, atol=1e-4), "forward is not W0 x + b + (α/r)·B M A x (order: A, M, B)"

    def identity_mixer_is_lora():
        with torch.no_grad():
            B().normal_()
            M().copy_(torch.eye(r))
        want = F.linear(x, W0 + s * B().detach() @ A().detach(), b)
        assert torch.allclose(out(), want, atol=1e-4), "with M = I the layer should be LoRA: W0 x + b + (α/r)·BAx"

    return run_checks(f"check_moslora_linear({getattr(cls, '__name__', cls)})", [
        ("starts at the base layer", "initialise B with zeros", identity),
        ("B can learn at init", "initialise A and M randomly (kaiming-uniform), B = 0", learns),
        ("only A, M, B train; r(d_in+d_out)+r²", "freeze the base; A (r, d_in), M (r, r), B (d_out, r)", trainable),
        ("forward = W0 x + b + (α/r) B M A x", "x @ A.T @ M.T @ B.T, times alpha / r", forward),
        ("M = I gives LoRA", "the mixer sits between A and B; scale alpha / r once", identity_mixer_is_lora),
    ], learner=[cls])


__all__ = ["check_melora_delta", "check_melora_branch", "check_moslora_linear"]
