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

from ._runner import find_param, run_checks


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

    def shape():
        x, g_y = torch.randn(5, d_in), torch.randn(5, d_out)
        g = fn(x @ A.T, g_y, s)
        assert tuple(g.shape) == (d_out, r), f"g_B has shape {tuple(g.shape)}, expected B's shape {(d_out, r)}"

    def matrix():
        x, g_y = torch.randn(5, d_in), torch.randn(5, d_out)
        assert torch.allclose(fn(x @ A.T, g_y, s), reference(x, g_y), atol=1e-5), \
            "g_B differs from autograd's for a (tokens, features) batch"

    def batched():
        x, g_y = torch.randn(2, 4, d_in), torch.randn(2, 4, d_out)
        for scale in (s, 0.5):  # a second scale: s must enter once, linearly
            Bg = B.clone().requires_grad_(True)
            (scale * F.linear(F.linear(x, A), Bg)).backward(g_y)
            assert torch.allclose(fn(x @ A.T, g_y, scale), Bg.grad, atol=1e-5), \
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

    def full_size():
        b, d = torch.randn(max_out), torch.randn(r)
        got = fn(A.clone(), B.clone(), b, d, max_in, max_out)
        assert tuple(got.shape) == (max_out, max_in), f"ΔW has shape {tuple(got.shape)}, expected (d_out, d_in)"
        assert torch.allclose(got, reference(b, d, max_in, max_out), atol=1e-5), \
            "ΔW is not diag(b) B diag(d) A (b scales the rows of B, i.e. the outputs; d scales the r middle dims)"

    def sliced():
        for d_in, d_out in ((5, 9), (11, 3), (4, 6)):
            b, d = torch.randn(d_out), torch.randn(r)
            got = fn(A.clone(), B.clone(), b, d, d_in, d_out)
            assert tuple(got.shape) == (d_out, d_in), \
                f"for a {d_out}×{d_in} layer ΔW has shape {tuple(got.shape)}"
            assert torch.allclose(got, reference(b, d, d_in, d_out), atol=1e-5), \
                f"wrong ΔW for a {d_out}×{d_in} layer: slice the first d_in columns of A, the first d_out rows of B"

    def starts_at_zero():
        got = fn(A.clone(), B.clone(), torch.zeros(max_out), torch.full((r,), 0.1), max_in, max_out)
        assert torch.count_nonzero(got) == 0, "with b = 0 (VeRA's init) ΔW must be exactly 0"

    return run_checks("check_vera_delta", [
        ("ΔW = Λ_b B Λ_d A at the shared size", "(b[:, None] * B) @ (d[:, None] * A)", full_size),
        ("each layer slices the shared A, B", "A[:, :d_in] and B[:d_out, :]", sliced),
        ("ΔW = 0 when b = 0", "b multiplies every output row", starts_at_zero),
    ], learner=(fn,))


def check_vera_linear(cls, d_in: int = 10, d_out: int = 6, r: int = 4):
    """Property checks for a learner's VeRA layer `cls(base_linear, A, B)` where A (r, ≥ d_in) and B (≥ d_out, r)
    are shared, frozen, and must not be copied into trainable parameters; trainable `lambda_b` (d_out,), init 0,
    and `lambda_d` (r,), init 0.1 (or peft's names `vera_lambda_b`, `vera_lambda_d`)."""
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out)
    A, B = torch.randn(r, d_in + 3), torch.randn(d_out + 2, r)  # shared: larger than this layer
    A_copy, B_copy = A.clone(), B.clone()
    x = torch.randn(5, d_in)
    layer = cls(base, A, B)
    lb = lambda: find_param(layer, ["lambda_b", "vera_lambda_b", "b"], (d_out,))  # noqa: E731
    ld = lambda: find_param(layer, ["lambda_d", "vera_lambda_d", "d"], (r,))  # noqa: E731

    def init():
        assert torch.count_nonzero(lb().detach()) == 0, "lambda_b must start at 0 (so ΔW = 0)"
        assert torch.allclose(ld().detach(), torch.full((r,), 0.1)), "lambda_d must start at 0.1 (the paper's d)"
        assert torch.allclose(layer(x), base(x), atol=1e-6), "output at init differs from the base layer's"

    def trainable():
        ids = {id(p) for p in layer.parameters() if p.requires_grad}
        assert ids == {id(lb()), id(ld())}, "exactly lambda_b and lambda_d must require grad (A, B, the base are frozen)"
        n = sum(p.numel() for p in layer.parameters() if p.requires_grad)
        assert n == d_out + r, f"{n} trainable parameters, expected d_out + r = {d_out + r}"

    def forward():
        torch.manual_seed(1)
        with torch.no_grad():
            lb().normal_()
            ld().normal_()
        dW = torch.diag(lb().detach()) @ B_copy[:d_out] @ torch.diag(ld().detach()) @ A_copy[:, :d_in]
        assert torch.allclose(layer(x), base(x) + x @ dW.T, atol=1e-5), \
            "forward is not base(x) + Λ_b B Λ_d A x with the sliced shared A, B"

    def frozen_shared():
        for p in (lb(), ld()):
            p.grad = None
        layer(x).sum().backward()
        assert lb().grad is not None and ld().grad is not None, "lambda_b and lambda_d received no gradient"
        assert torch.equal(A, A_copy) and torch.equal(B, B_copy), "the shared A or B changed"
        params = {p.data_ptr() for p in layer.parameters()}
        assert A.data_ptr() not in params and B.data_ptr() not in params, \
            "the shared A or B became a parameter of the layer: keep them as (non-trainable) references"

    return run_checks(f"check_vera_linear({getattr(cls, '__name__', cls)})", [
        ("starts at the base layer", "lambda_b = zeros(d_out), lambda_d = full((r,), 0.1)", init),
        ("only lambda_b, lambda_d train: d_out + r", "freeze the base; A, B are not nn.Parameters", trainable),
        ("forward = base(x) + Λ_b B Λ_d A x", "slice A[:, :d_in], B[:d_out]; b ⊙ ((d ⊙ (x Aᵀ)) Bᵀ)", forward),
        ("A, B shared and frozen", "store A, B as given (buffers or plain attributes), never nn.Parameter(A)",
         frozen_shared),
    ], learner=(cls,))


__all__ = ["check_lora_fa_grad", "check_vera_delta", "check_vera_linear"]
