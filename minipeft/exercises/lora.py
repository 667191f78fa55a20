"""Checks for the LoRA chapter's exercises.

    from minipeft.exercises import check_lora_linear, check_lora_grads
    check_lora_linear(MyLoRALinear)   # MyLoRALinear(base: nn.Linear, r: int, alpha: float)
    check_lora_grads(my_lora_grads)   # my_lora_grads(x, g_y, A, B, scale) -> (g_A, g_B)
    check_lora_init(my_init)          # my_init(A, B) fills both in place
"""
from __future__ import annotations

import torch
from torch import nn

from ._runner import find_param, run_checks


def check_lora_linear(cls, d_in: int = 12, d_out: int = 10, r: int = 3, alpha: float = 6.0):
    """Property checks for a learner's LoRA layer `cls(base_linear, r, alpha)` with parameters A (r, d_in)
    and B (d_out, r) (attributes `A`/`B` or `lora_A`/`lora_B`; nn.Linear or Parameter both fine)."""
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out)
    W0 = base.weight.detach().clone()
    x = torch.randn(5, d_in)
    layer = cls(base, r, alpha)
    A = lambda: find_param(layer, ["A", "lora_A"], (r, d_in))  # noqa: E731
    B = lambda: find_param(layer, ["B", "lora_B"], (d_out, r))  # noqa: E731
    s = alpha / r

    def identity():
        assert torch.allclose(layer(x), base(x), atol=1e-6), "output at init differs from the base layer's"

    def frozen():
        trainable = {id(p) for p in layer.parameters() if p.requires_grad}
        assert trainable == {id(A()), id(B())}, "exactly A and B must require grad (freeze the base layer)"

    def count():
        n = sum(p.numel() for p in layer.parameters() if p.requires_grad)
        assert n == r * (d_in + d_out), f"{n} trainable parameters, expected r·(d_in + d_out) = {r * (d_in + d_out)}"

    def forward():
        with torch.no_grad():
            B().normal_()
        want = x @ W0.T + base.bias + s * x @ A().T @ B().T
        assert torch.allclose(layer(x), want, atol=1e-5), "forward is not W0·x + (alpha/r)·B·A·x"

    def merge():
        if not hasattr(layer, "merge"):
            raise AssertionError("no merge() method")
        before = layer(x).detach()
        layer.merge()
        assert torch.allclose(base.weight, W0 + s * B() @ A(), atol=1e-5), "merged weight is not W0 + (alpha/r)·B·A"
        assert torch.allclose(layer(x), before, atol=1e-5), "after merge() the output changed (adding BA twice?)"

    return run_checks(f"check_lora_linear({getattr(cls, '__name__', cls)})", [
        ("zero-init identity", "initialise B with zeros so that B·A = 0", identity),
        ("only A and B train", "call base.requires_grad_(False) and make A, B nn.Parameters", frozen),
        ("parameter count", "A is (r, d_in) and B is (d_out, r)", count),
        ("forward = W0 x + (α/r) B A x", "scale by alpha / r and apply A first: x @ A.T @ B.T", forward),
        ("merge keeps the output", "W ← W0 + (alpha/r)·B @ A, then skip the LoRA branch", merge),
    ])


def check_lora_grads(fn, d_in: int = 7, d_out: int = 5, r: int = 2, scale: float = 2.0):
    """Check `fn(x, g_y, A, B, scale) -> (g_A, g_B)` against autograd (seed 004's formulas)."""
    torch.manual_seed(0)
    x, A, B = torch.randn(9, d_in), torch.randn(r, d_in, requires_grad=True), torch.randn(d_out, r, requires_grad=True)
    g_y = torch.randn(9, d_out)
    (scale * x @ A.T @ B.T).backward(g_y)

    def check():
        g_A, g_B = fn(x, g_y, A.detach(), B.detach(), scale)
        assert tuple(g_A.shape) == (r, d_in) and tuple(g_B.shape) == (d_out, r), "g_A is (r, d_in), g_B is (d_out, r)"
        assert torch.allclose(g_B, B.grad, atol=1e-5), "g_B differs from autograd's"
        assert torch.allclose(g_A, A.grad, atol=1e-5), "g_A differs from autograd's"

    return run_checks("check_lora_grads", [
        ("g_A and g_B match autograd", "g_ΔW = g_yᵀ·x (summed over rows); g_B = s·g_ΔW·Aᵀ, g_A = s·Bᵀ·g_ΔW", check)])


def check_lora_init(init_fn, d_in: int = 8, d_out: int = 6, r: int = 3, scale: float = 2.0):
    """Check `init_fn(A, B)`, which fills A (r, d_in) and B (d_out, r) in place, the way LoRA needs:
    the update s·BA starts at zero, and plain gradient descent can move both factors."""
    def fresh():
        torch.manual_seed(0)
        A, B = torch.empty(r, d_in), torch.empty(d_out, r)
        with torch.no_grad():
            init_fn(A, B)
        return A.requires_grad_(True), B.requires_grad_(True)

    def grads(A, B):  # autograd on a random regression of the LoRA branch
        gen = torch.Generator().manual_seed(1)
        x, t = torch.randn(16, d_in, generator=gen), torch.randn(16, d_out, generator=gen)
        A.grad = B.grad = None
        ((scale * x @ A.T @ B.T - t) ** 2).mean().backward()
        return A.grad.clone(), B.grad.clone()

    def identity():
        A, B = fresh()
        assert torch.all(torch.isfinite(A)) and torch.all(torch.isfinite(B)), "A or B holds nan/inf (fill them in place)"
        assert torch.count_nonzero(B @ A) == 0, "B·A is not zero at init: the wrapped model would not start at the base"

    def moves():
        A, B = fresh()
        g_A, g_B = grads(A, B)
        assert g_A.abs().sum() + g_B.abs().sum() > 0, "both gradients are zero at step 0: nothing can ever train"
        with torch.no_grad():  # one step of gradient descent, then both factors must get a gradient
            A -= 0.1 * g_A
            B -= 0.1 * g_B
        g_A, g_B = grads(A, B)
        assert g_A.abs().sum() > 0 and g_B.abs().sum() > 0, \
            "after one step a factor still gets no gradient (is one of A, B zero and the other zero too?)"

    return run_checks("check_lora_init", [
        ("s·B·A = 0 at init", "zero exactly one of the two factors (LoRA zeroes B)", identity),
        ("both factors learn", "the other factor must be random (LoRA: kaiming_uniform_ on A)", moves),
    ])
