"""Checks for the LoRA chapter's exercises.

    from minipeft.exercises import check_lora_linear, check_lora_grads
    check_lora_linear(MyLoRALinear)   # MyLoRALinear(base: nn.Linear, r: int, alpha: float)
    check_lora_grads(my_lora_grads)   # my_lora_grads(x, g_y, A, B, scale) -> (g_A, g_B)
    check_lora_init(my_init)          # my_init(A, B) fills both in place
"""
from __future__ import annotations

import torch
from torch import nn

from ._runner import built_once, find_param, run_checks


def check_lora_linear(cls, d_in: int = 12, d_out: int = 10, r: int = 3, alpha: float = 6.0):
    """Property checks for a learner's LoRA layer `cls(base_linear, r, alpha)` with parameters A (r, d_in)
    and B (d_out, r) (attributes `A`/`B` or `lora_A`/`lora_B`; nn.Linear or Parameter both fine).

    The learner's code runs only inside the checks, so an error comes back as a FAIL with its hint. The
    forward and merge checks give both factors random values (a layer whose zero factor is A, not B,
    would otherwise hide a wrong scale), and the merge check compares outputs and the merged weight with
    W0 + (α/r)·B·A computed before merge(), wherever the layer keeps its weight (in `base`, or a copy)."""
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out)
    W0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    x = torch.randn(5, d_in)
    s = alpha / r
    layer = built_once(lambda: cls(base, r, alpha))  # the learner's class, built in the first check

    A = lambda: find_param(layer(), ["A", "lora_A"], (r, d_in), "(r, d_in)")  # noqa: E731
    B = lambda: find_param(layer(), ["B", "lora_B"], (d_out, r), "(d_out, r)")  # noqa: E731

    def randomise():  # both factors nonzero, so that the branch and its scale show in the output
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            A().copy_(torch.randn(r, d_in, generator=g))
            B().copy_(torch.randn(d_out, r, generator=g))
        return A().detach().clone(), B().detach().clone()

    def identity():
        out = layer()(x)
        assert tuple(out.shape) == (5, d_out), f"output shape {tuple(out.shape)}; expected (batch, d_out) = (5, {d_out})"
        assert torch.allclose(out, base(x), atol=1e-6), "output at init differs from the base layer's"

    def frozen():
        trainable = {id(p) for p in layer().parameters() if p.requires_grad}
        assert trainable == {id(A()), id(B())}, "exactly A and B must require grad (freeze the base layer)"

    def count():
        n = sum(p.numel() for p in layer().parameters() if p.requires_grad)
        assert n == r * (d_in + d_out), f"{n} trainable parameters, expected r·(d_in + d_out) = {r * (d_in + d_out)}"

    def forward():
        a, b = randomise()
        want = x @ W0.T + b0 + s * x @ a.T @ b.T
        got = layer()(x)
        assert torch.allclose(got, want, atol=1e-4), "forward is not W0·x + b + (alpha/r)·B·A·x"

    def merge():
        lay = layer()
        if not callable(getattr(lay, "merge", None)):
            raise AssertionError("no merge() method")
        a, b = randomise()
        W = W0 + s * b @ a  # the merged weight, computed before merge() can change A, B or the base
        want = x @ W.T + b0
        with torch.no_grad():
            lay.merge()
            got = lay(x)
        assert torch.allclose(got, want, atol=1e-4), \
            "after merge() the output is not W0·x + b + (alpha/r)·B·A·x any more (the branch added twice? the " \
            "scale left out of the merge?)"
        weights = [t for t in list(lay.parameters()) + list(lay.buffers()) if tuple(t.shape) == (d_out, d_in)]
        assert any(torch.allclose(t.detach(), W, atol=1e-4) for t in weights), \
            "no (d_out, d_in) weight in the layer equals W0 + (alpha/r)·B·A after merge(): fold the update into the weight"

    return run_checks(f"check_lora_linear({getattr(cls, '__name__', cls)})", [
        ("zero-init identity", "initialise one factor (LoRA: B) with zeros so that B·A = 0", identity),
        ("only A and B train", "call base.requires_grad_(False) and make A, B nn.Parameters", frozen),
        ("parameter count", "A is (r, d_in) and B is (d_out, r)", count),
        ("forward = W0 x + (α/r) B A x", "scale by alpha / r and apply A first: x @ A.T @ B.T", forward),
        ("merge keeps the output", "W ← W0 + (alpha/r)·B @ A, then skip the LoRA branch", merge),
    ], learner=(cls,))


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
        # NaN first: an init that rebinds its argument (A = torch.randn_like(A)) leaves the caller's tensor as it was
        A, B = torch.full((r, d_in), float("nan")), torch.full((d_out, r), float("nan"))
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
        assert torch.all(torch.isfinite(A)) and torch.all(torch.isfinite(B)), \
            "A or B still holds nan after my_init: fill them in place (A.normal_(), nn.init.zeros_(B), A.copy_(...)); " \
            "A = torch.randn_like(A) only rebinds the local name"
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

    def full_rank():
        A, B = fresh()
        other = A if torch.count_nonzero(B) == 0 else B  # the factor that is not zero
        rank = int(torch.linalg.matrix_rank(other.detach()))
        assert rank == r, f"the nonzero factor has rank {rank}, not r = {r}: a constant or repeated fill gives " \
                          f"rank 1, and the update B·A can then never use more than one direction"

    return run_checks("check_lora_init", [
        ("s·B·A = 0 at init", "zero exactly one of the two factors (LoRA zeroes B)", identity),
        ("both factors learn", "the other factor must be random (LoRA: kaiming_uniform_ on A)", moves),
        ("the random factor has rank r", "fill it with random numbers (kaiming_uniform_, normal_), not a constant",
         full_rank),
    ], learner=(init_fn,))
