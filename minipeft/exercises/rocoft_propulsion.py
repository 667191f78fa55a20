"""Checks for the RoCoFT and Propulsion chapter's exercises.

    from minipeft.exercises import check_rocoft_linear, check_propulsion_merge, check_propulsion_grad
    check_rocoft_linear(MyRoCoFTLinear)     # MyRoCoFTLinear(base: nn.Linear, k: int): trains rows 0..k-1 of W
    check_propulsion_merge(my_merge)        # my_merge(W0, b, z, k) -> (W, b): the merged layer of y = (W0x+b) ⊙ z^k
    check_propulsion_grad(my_z_grad)        # my_z_grad(y0, g, z, k) -> ∂L/∂z, y0 = W0x + b, g = ∂L/∂y

Shapes follow PyTorch: a weight is (d_out, d_in), row i belongs to output i. The references inside the checks
are plain tensors and autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._runner import find_param, run_checks


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _tensor(t, shape: tuple, what: str) -> torch.Tensor:
    """The learner's tensor as float32, after checking its shape (a wrong shape is named here, not met as a
    matmul or broadcasting error in the check's own comparison)."""
    assert isinstance(t, torch.Tensor), f"{what} is a {type(t).__name__}, expected a tensor of shape {shape}"
    assert tuple(t.shape) == tuple(shape), f"{what} has shape {_shape(t)}; expected {tuple(shape)}"
    return t.detach().float()


def check_rocoft_linear(cls, d_in: int = 9, d_out: int = 7, k: int = 2):
    """Property checks for a learner's RoCoFT layer `cls(base_linear, k)`: one trainable tensor R (k, d_in)
    (attribute `R`, `rows` or `rocoft_weight`, or the only trainable (k, d_in) parameter) holding rows 0..k-1 of
    the weight, starting at W0[:k]; the forward is the base layer with those rows replaced by R. Every check
    builds its own layer, inside the check, so that an error is a FAIL line and no check sees another's changes."""
    x = torch.randn(5, d_in, generator=torch.Generator().manual_seed(3))

    def build():
        torch.manual_seed(0)
        base = nn.Linear(d_in, d_out)
        W0, b = base.weight.detach().clone(), base.bias.detach().clone()
        layer = cls(base, k)
        R = find_param(layer, ["R", "rows", "rocoft_weight"], (k, d_in), "(k, d_in)")
        return base, W0, b, layer, R

    def out(layer):
        return _tensor(layer(x), (5, d_out), f"the output for an input {tuple(x.shape)}")

    def identity():
        base, W0, b, layer, R = build()
        assert torch.allclose(R.detach(), W0[:k]), "R at init is not the first k rows of the base weight, W0[:k]"
        assert torch.allclose(out(layer), F.linear(x, W0, b), atol=1e-5), \
            "output at init differs from the base layer's"
        with torch.no_grad():  # what an optimizer step does to R
            R.add_(1.0)
        assert torch.equal(base.weight.detach(), W0), \
            "changing R changed base.weight: R shares memory with it; make R a copy (.detach().clone())"

    def frozen():
        _, _, _, layer, R = build()  # a copy of W0 in buffers is frozen too: only the layer's parameters count
        trainable = [p for p in layer.parameters() if p.requires_grad]
        assert len(trainable) == 1 and trainable[0] is R, \
            f"exactly one tensor, R, must require grad; {len(trainable)} do, of shapes " \
            f"{[tuple(p.shape) for p in trainable]}"
        assert sum(p.numel() for p in trainable) == k * d_in, f"expected k·d_in = {k * d_in} trainable numbers"

    def forward():
        _, W0, b, layer, R = build()
        with torch.no_grad():
            R.add_(torch.randn(k, d_in, generator=torch.Generator().manual_seed(1)))
        W = torch.cat([R.detach(), W0[k:]])
        assert torch.allclose(out(layer), F.linear(x, W, b), atol=1e-5), \
            "forward is not W x + b with rows 0..k-1 of W replaced by R"

    def gradient():
        base, W0, _, layer, R = build()
        g_y = torch.randn(5, d_out, generator=torch.Generator().manual_seed(2))
        y = layer(x)
        _tensor(y, (5, d_out), f"the output for an input {tuple(x.shape)}")
        assert y.requires_grad, "the output does not depend on R through autograd (was R detached?)"
        y.backward(g_y)
        full = g_y.T @ x                              # ∂L/∂W of full fine-tuning, (d_out, d_in)
        assert R.grad is not None, "R received no gradient"
        assert torch.allclose(R.grad, full[:k], atol=1e-5), \
            "∂L/∂R is not the first k rows of the full gradient g_yᵀ x: full fine-tuning, masked to the rows"
        assert torch.equal(base.weight.detach(), W0), \
            "the base weight changed: RoCoFT never writes into W0 while training"

    return run_checks(f"check_rocoft_linear({getattr(cls, '__name__', cls)})", [
        ("starts at the base layer", "R = nn.Parameter(base.weight[:k].detach().clone())", identity),
        ("only R trains (k·d_in numbers)", "freeze the base layer: base.requires_grad_(False)", frozen),
        ("forward = W0 with rows replaced", "torch.cat([R, W0[k:]]) along dim 0, then F.linear(x, W, b)", forward),
        ("gradient = masked full gradient", "no extra scaling; keep W0 a constant (detach it)", gradient),
    ], learner=(cls,))


def check_propulsion_merge(fn, d_in: int = 6, d_out: int = 5, k: int = 5):
    """Check `fn(W0, b, z, k) -> (W, b_new)`: the plain linear layer that computes (W0 x + b) ⊙ z^k."""
    torch.manual_seed(0)
    W0, b = torch.randn(d_out, d_in), torch.randn(d_out)
    z = 1 + 0.1 * torch.randn(d_out)
    x = torch.randn(4, d_in)
    want = F.linear(x, W0, b) * z**k

    def call(need_w=True, need_b=True):
        """The learner's (W, b_new); only the shapes a line uses are required, so that each line tells its own."""
        res = fn(W0.clone(), b.clone(), z.clone(), k)
        assert isinstance(res, (tuple, list)) and len(res) == 2, \
            f"returned {type(res).__name__}; expected a pair (W, b_new)"
        return (_tensor(res[0], (d_out, d_in), "W (like W0, (d_out, d_in))") if need_w else None,
                _tensor(res[1], (d_out,), "b_new (like b, (d_out,))") if need_b else None)

    def shapes():
        call()

    def weight():
        W, _ = call(need_b=False)
        assert torch.allclose(x @ W.T, F.linear(x, W0) * z**k, atol=1e-5), \
            "W x is not (W0 x) ⊙ z^k: scale row i of W0 (output i) by z_i^k"

    def bias():
        _, b2 = call(need_w=False)
        assert torch.allclose(b2, b * z**k, atol=1e-6), "the bias must be scaled too: b_new = b ⊙ z^k"

    def same_function():
        W, b2 = call()
        assert torch.allclose(F.linear(x, W, b2), want, atol=1e-5), "the merged layer does not compute (W0x + b) ⊙ z^k"

    return run_checks("check_propulsion_merge", [
        ("shapes", "W like W0, b like b", shapes),
        ("W = diag(z^k) W0", "z**k (not z) times each ROW: (z**k)[:, None] * W0", weight),
        ("b = z^k ⊙ b", "the scale acts on W0x + b, bias included", bias),
        ("merged layer == (W0x + b) ⊙ z^k", "all of the above", same_function),
    ], learner=(fn,))


def check_propulsion_grad(fn, d_out: int = 6, k: int = 5):
    """Check `fn(y0, g, z, k) -> ∂L/∂z` (d_out,) for y = y0 ⊙ z^k, with y0 = W0x + b and g = ∂L/∂y of shape
    (batch, tokens, d_out); against autograd."""
    torch.manual_seed(0)
    y0, g = torch.randn(3, 4, d_out), torch.randn(3, 4, d_out)

    def reference(z, k_):
        zz = z.clone().requires_grad_(True)
        (y0 * zz**k_).backward(g)
        return zz.grad

    def call(z, k_):
        return _tensor(fn(y0.clone(), g.clone(), z.clone(), k_), (d_out,),
                       "∂L/∂z (one number per entry of z, summed over the batch and the tokens)")

    def shape():
        call(torch.ones(d_out), k)

    def at_one():
        z = torch.ones(d_out)
        assert torch.allclose(call(z, k), reference(z, k), atol=1e-4), \
            "at z = 1 the gradient is k · Σ y0 ⊙ g (did you forget the factor k?)"

    def anywhere():
        for k_ in (1, 3, k):
            z = 1 + 0.2 * torch.randn(d_out, generator=torch.Generator().manual_seed(k_))
            assert torch.allclose(call(z, k_), reference(z, k_), atol=1e-4), \
                f"with k = {k_} and z ≠ 1 the gradient differs from autograd's: k · z^(k-1) ⊙ Σ y0 ⊙ g"

    return run_checks("check_propulsion_grad", [
        ("shape (d_out,)", "sum y0 * g over every axis but the last", shape),
        ("at z = 1", "d(z^k)/dz = k z^(k-1): at z = 1 that is k", at_one),
        ("at any z, several k", "the power is k - 1, not k", anywhere),
    ], learner=(fn,))


__all__ = ["check_rocoft_linear", "check_propulsion_merge", "check_propulsion_grad"]
