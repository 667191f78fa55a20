"""Checks for the LoRA-FA and VeRA chapter's exercises.

    from minipeft.exercises import check_lora_fa_grad, check_vera_delta, check_vera_linear
    check_lora_fa_grad(my_grad_B)        # my_grad_B(Ax, g_y, s) -> g_B (d_out, r), from A·x only
    check_vera_delta(my_vera_delta)      # my_vera_delta(A, B, b, d, d_in, d_out) -> ΔW (d_out, d_in)
    check_vera_linear(MyVeRALinear)      # MyVeRALinear(base: nn.Linear, A, B): shared A (r, ≥d_in), B (≥d_out, r)

Shapes follow PyTorch: a weight is (d_out, d_in); activations are (..., features). The references inside the
checks are plain tensors and autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._runner import built_once, find_param, run_checks


def check_lora_fa_grad(fn, d_in: int = 12, d_out: int = 7, r: int = 3, s: float = 2.0):
    """Check `fn(Ax, g_y, s) -> g_B`: the gradient of B in y = W0 x + s·B(Ax) from the saved r-dim
    activations Ax (..., r) and the output gradient g_y (..., d_out) only, against autograd."""
    torch.manual_seed(0)
    A = torch.randn(r, d_in) / d_in ** 0.5
    B = torch.randn(d_out, r)

    def reference(x, g_y):
        Bg = B.clone().requires_grad_(True)
        (s * F.linear(F.linear(x, A), Bg)).backward(g_y)
        return Bg.grad

    def call(Ax, g_y, scale):
        g = torch.as_tensor(fn(Ax, g_y, scale))
        assert tuple(g.shape) == (d_out, r), \
            f"g_B has shape {tuple(g.shape)}; expected B's shape (d_out, r) = {(d_out, r)}" + \
            (f" for inputs of shape {tuple(Ax.shape)}, {tuple(g_y.shape)}" if Ax.dim() > 2 else "")
        return g

    def shape():
        x, g_y = torch.randn(5, d_in), torch.randn(5, d_out)
        call(x @ A.T, g_y, s)

    def matrix():
        x, g_y = torch.randn(5, d_in), torch.randn(5, d_out)
        assert torch.allclose(call(x @ A.T, g_y, s), reference(x, g_y), atol=1e-5), \
            "g_B differs from autograd's for a (tokens, features) batch"

    def batched():
        x, g_y = torch.randn(2, 4, d_in), torch.randn(2, 4, d_out)
        for scale in (s, 0.5):  # a second scale: s must enter once, linearly
            Bg = B.clone().requires_grad_(True)
            (scale * F.linear(F.linear(x, A), Bg)).backward(g_y)
            assert torch.allclose(call(x @ A.T, g_y, scale), Bg.grad, atol=1e-5), \
                f"g_B differs from autograd's for a (batch, time, features) input with s = {scale}"

    return run_checks("check_lora_fa_grad", [
        ("shape of g_B is B's (d_out, r)", "g_B = s · g_yᵀ (Ax): (d_out, N) @ (N, r)", shape),
        ("g_B matches autograd", "sum over tokens of g_y ⊗ (Ax), times s", matrix),
        ("batched inputs and the scale s", "flatten every leading dim: g_y.reshape(-1, d_out), "
                                           "Ax.reshape(-1, r)", batched),
    ], learner=(fn,))


def check_vera_delta(fn, r: int = 4, max_in: int = 11, max_out: int = 9):
    """Check `fn(A, B, b, d, d_in, d_out) -> ΔW = Λ_b B Λ_d A` for one layer of size (d_out, d_in), with A
    (r, max_in) and B (max_out, r) the shared matrices: the layer uses A[:, :d_in] and B[:d_out, :]."""
    torch.manual_seed(0)
    A, B = torch.randn(r, max_in), torch.randn(max_out, r)

    def reference(b, d, d_in, d_out):
        return torch.diag(b) @ B[:d_out] @ torch.diag(d) @ A[:, :d_in]

    def call(b, d, d_in, d_out):
        got = torch.as_tensor(fn(A.clone(), B.clone(), b, d, d_in, d_out))
        assert tuple(got.shape) == (d_out, d_in), \
            f"for a {d_out}×{d_in} layer ΔW has shape {tuple(got.shape)}; expected (d_out, d_in) = {(d_out, d_in)}"
        return got

    def full_size():
        b, d = torch.randn(max_out), torch.randn(r)
        got = call(b, d, max_in, max_out)
        assert torch.allclose(got, reference(b, d, max_in, max_out), atol=1e-5), \
            "ΔW is not diag(b) B diag(d) A (b scales the rows of B, i.e. the outputs; d scales the r middle dims)"

    def sliced():
        for d_in, d_out in ((5, 9), (11, 3), (4, 6)):
            b, d = torch.randn(d_out), torch.randn(r)
            got = call(b, d, d_in, d_out)
            assert torch.allclose(got, reference(b, d, d_in, d_out), atol=1e-5), \
                f"wrong ΔW for a {d_out}×{d_in} layer: slice the first d_in columns of A, the first d_out rows of B"

    def starts_at_zero():
        got = call(torch.zeros(max_out), torch.full((r,), 0.1), max_in, max_out)
        assert torch.count_nonzero(got) == 0, "with b = 0 (VeRA's init) ΔW must be exactly 0"

    return run_checks("check_vera_delta", [
        ("ΔW = Λ_b B Λ_d A at the shared size", "(b[:, None] * B) @ (d[:, None] * A)", full_size),
        ("each layer slices the shared A, B", "A[:, :d_in] and B[:d_out, :]", sliced),
        ("ΔW = 0 when b = 0", "b multiplies every output row", starts_at_zero),
    ], learner=(fn,))


def check_vera_linear(cls, d_in: int = 10, d_out: int = 6, r: int = 4):
    """Property checks for a learner's VeRA layer `cls(base_linear, A, B)` where A (r, ≥ d_in) and B (≥ d_out, r)
    are shared and frozen: kept by reference (views are fine, copies are not; a frozen nn.Parameter sharing their
    storage is accepted), never trainable; trainable `lambda_b` (d_out,), init 0,
    and `lambda_d` (r,), init 0.1 (or peft's names `vera_lambda_b`, `vera_lambda_d`)."""
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out)
    A, B = torch.randn(r, d_in + 3), torch.randn(d_out + 2, r)  # shared: larger than this layer
    A_copy, B_copy = A.clone(), B.clone()
    x = torch.randn(5, d_in)

    layer = built_once(lambda: cls(base, A, B))  # the learner's class, built in the first check

    lb = lambda: find_param(layer(), ["lambda_b", "vera_lambda_b", "b"], (d_out,), "(d_out,)")  # noqa: E731
    ld = lambda: find_param(layer(), ["lambda_d", "vera_lambda_d", "d"], (r,), "(r,)")  # noqa: E731

    def out():
        y = layer()(x)
        assert tuple(y.shape) == (5, d_out), f"the output has shape {tuple(y.shape)} for x of shape (5, d_in); " \
                                             f"expected (5, d_out) = {(5, d_out)}"
        return y

    def perturb():
        torch.manual_seed(1)
        with torch.no_grad():
            lb().normal_()
            ld().normal_()

    def init():
        assert torch.count_nonzero(lb().detach()) == 0, "lambda_b must start at 0 (so ΔW = 0)"
        assert torch.allclose(ld().detach(), torch.full((r,), 0.1)), "lambda_d must start at 0.1 (the paper's d)"
        assert torch.allclose(out(), base(x), atol=1e-6), "output at init differs from the base layer's"

    def trainable():
        ids = {id(p) for p in layer().parameters() if p.requires_grad}
        assert ids == {id(lb()), id(ld())}, \
            "exactly lambda_b and lambda_d must require grad (A, B, the base are frozen)"
        n = sum(p.numel() for p in layer().parameters() if p.requires_grad)
        assert n == d_out + r, f"{n} trainable parameters, expected d_out + r = {d_out + r}"

    def forward():
        perturb()
        dW = torch.diag(lb().detach()) @ B_copy[:d_out] @ torch.diag(ld().detach()) @ A_copy[:, :d_in]
        assert torch.allclose(out(), base(x) + x @ dW.T, atol=1e-5), \
            "forward is not base(x) + Λ_b B Λ_d A x with the sliced shared A, B"

    def frozen_shared():
        perturb()
        for p in (lb(), ld()):
            p.grad = None
        out().sum().backward()
        assert lb().grad is not None and ld().grad is not None, "lambda_b and lambda_d received no gradient"
        assert torch.equal(A, A_copy) and torch.equal(B, B_copy), "the shared A or B changed"
        # shared = the layer reads the very tensors it was given (or views of them): change them in place and
        # its branch must follow; a copy (A.clone(), a new Parameter) would not. Compares outputs, not attributes.
        with torch.no_grad():
            before = out() - base(x)
            try:
                A.mul_(2.0)
                B.mul_(3.0)
                after = out() - base(x)
            finally:
                A.copy_(A_copy)
                B.copy_(B_copy)
        assert torch.allclose(after, 6 * before, atol=1e-4), \
            "scaling the shared A by 2 and B by 3 in place did not scale the branch by 6: the layer keeps a copy " \
            "of A or B instead of the shared tensors themselves"

    return run_checks(f"check_vera_linear({getattr(cls, '__name__', cls)})", [
        ("starts at the base layer", "lambda_b = zeros(d_out), lambda_d = full((r,), 0.1)", init),
        ("only lambda_b, lambda_d train: d_out + r", "freeze the base; A, B must not require grad",
         trainable),
        ("forward = base(x) + Λ_b B Λ_d A x", "slice A[:, :d_in], B[:d_out]; b ⊙ ((d ⊙ (x Aᵀ)) Bᵀ)", forward),
        ("A, B shared and frozen", "store A, B as given (buffers or plain attributes; views such as A[:, :d_in] "
                                   "are fine), no .clone() and no trainable nn.Parameter(A)", frozen_shared),
    ], learner=(cls,))


__all__ = ["check_lora_fa_grad", "check_vera_delta", "check_vera_linear"]
