"""Checks for the DoRA chapter's exercises.

    from minipeft.exercises import check_weight_norm, check_dora_linear, check_dora_magnitude_grad
    check_weight_norm(my_decompose)          # my_decompose(W) -> (m, D): W = m[:, None] * D
    check_dora_linear(MyDoRALinear)          # MyDoRALinear(base: nn.Linear, r: int, alpha: float)
    check_dora_magnitude_grad(my_dora_grads)  # my_dora_grads(V, m, G) -> (g_V, g_m), Eqs. 6-7

Shapes follow PyTorch: a weight is (d_out, d_in) and the DoRA norm ‖·‖_c is one L2 norm per output
neuron, i.e. per ROW. The references inside the checks are plain tensors and autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._runner import built_once, find_param, run_checks


def check_weight_norm(fn, d_out: int = 7, d_in: int = 5):
    """Check `fn(W) -> (m, D)`: m (d_out,) the row norms of W, D (d_out, d_in) with unit rows, m ⊙ D = W."""
    torch.manual_seed(0)
    W = torch.randn(d_out, d_in) * torch.rand(d_out, 1) * 3  # rows of different lengths
    Wsq = torch.randn(d_in, d_in) * torch.rand(d_in, 1) * 3  # square: a column norm has the right shape

    def call(M):
        out = fn(M.clone())
        assert isinstance(out, (tuple, list)) and len(out) == 2, \
            f"my_decompose returned {type(out).__name__}; expected the pair (m, D)"
        return torch.as_tensor(out[0]), torch.as_tensor(out[1])

    def D_like(D, M):
        assert tuple(D.shape) == tuple(M.shape), \
            f"D has shape {tuple(D.shape)}; expected W's shape (d_out, d_in) = {tuple(M.shape)}"

    def m_values(m, M):  # any layout with one entry per row is read as a vector here; `shapes` names the layout
        assert m.numel() == M.shape[0], \
            f"m has shape {tuple(m.shape)}; expected (d_out,) = ({M.shape[0]},): one magnitude per output neuron"
        return m.reshape(-1)

    def shapes():
        m, D = call(W)
        assert tuple(m.shape) == (d_out,), f"m has shape {tuple(m.shape)}; expected (d_out,) = ({d_out},): " \
                                            "one magnitude per output neuron (row), a vector (no keepdim)"
        D_like(D, W)

    def unit_rows():
        for M in (W, Wsq):
            _, D = call(M)
            D_like(D, M)
            assert torch.allclose(D.norm(dim=1), torch.ones(M.shape[0]), atol=1e-5), \
                "the rows of D are not unit vectors"

    def rebuild():
        for M in (W, Wsq):
            m, D = call(M)
            D_like(D, M)
            m = m_values(m, M)
            assert torch.allclose(m[:, None] * D, M, atol=1e-5), "m[:, None] * D does not give W back"
            assert torch.allclose(m, M.norm(dim=1), atol=1e-5), "m is not the L2 norm of each row"

    return run_checks("check_weight_norm", [
        ("shapes: m (d_out,), D like W", "norm over d_in: W.norm(dim=1)", shapes),
        ("rows of D have norm 1", "divide each row by its own norm: W / m[:, None]", unit_rows),
        ("m ⊙ D = W with m = row norms", "PyTorch's ‖·‖_c is per ROW (dim=1), not per column", rebuild),
    ], learner=(fn,))


def check_dora_linear(cls, d_in: int = 12, d_out: int = 10, r: int = 3, alpha: float = 6.0):
    """Property checks for a learner's DoRA layer `cls(base_linear, r, alpha)` with trainable A (r, d_in),
    B (d_out, r) and m (d_out,) (attributes `A`/`B`/`m`, or peft's `lora_A`/`lora_B` as nn.Linear and
    `lora_magnitude_vector`), and the norm ‖W0 + sBA‖_c treated as a constant in backward (paper §4.3)."""
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out)
    with torch.no_grad():
        base.bias.normal_()  # a clearly non-zero bias, so scaling it by m/n shows
    W0, b = base.weight.detach().clone(), base.bias.detach().clone()
    x = torch.randn(6, d_in)
    s = alpha / r

    layer = built_once(lambda: cls(base, r, alpha))  # the learner's class, built in the first check

    A = lambda: find_param(layer(), ["A", "lora_A"], (r, d_in), "(r, d_in)")  # noqa: E731
    B = lambda: find_param(layer(), ["B", "lora_B"], (d_out, r), "(d_out, r)")  # noqa: E731
    m = lambda: find_param(layer(), ["m", "lora_magnitude_vector", "magnitude"], (d_out,), "(d_out,)")  # noqa: E731

    def out():
        y = layer()(x)
        assert tuple(y.shape) == (6, d_out), f"the output has shape {tuple(y.shape)} for x of shape (6, d_in); " \
                                             f"expected (6, d_out) = {(6, d_out)}"
        return y

    def identity():
        assert torch.allclose(m().detach(), W0.norm(dim=1), atol=1e-5), \
            "m at init is not ‖W0‖_c (the norm of each row of the base weight)"
        assert torch.allclose(out(), base(x), atol=1e-5), "output at init differs from the base layer's"

    def frozen():
        trainable = {id(p) for p in layer().parameters() if p.requires_grad}
        assert trainable == {id(A()), id(B()), id(m())}, "exactly A, B and m must require grad"

    def count():
        n = sum(p.numel() for p in layer().parameters() if p.requires_grad)
        want = r * (d_in + d_out) + d_out
        assert n == want, f"{n} trainable parameters, expected r·(d_in + d_out) + d_out = {want}"

    def perturb():
        torch.manual_seed(1)
        with torch.no_grad():  # A too: with a zero A (also a valid init) the forward would not test s or A
            A().copy_(torch.randn(r, d_in) / d_in ** 0.5)
            B().normal_()
            m().mul_(1 + 0.3 * torch.randn(d_out))

    def forward():
        perturb()
        V = W0 + s * B().detach() @ A().detach()
        Wp = (m().detach() / V.norm(dim=1))[:, None] * V
        assert torch.allclose(out(), F.linear(x, Wp, b), atol=1e-4), \
            "forward is not m ⊙ (W0 + sBA)/‖W0 + sBA‖_c · x + b"

    def detached():
        perturb()
        for p in (A(), B(), m()):
            p.grad = None
        g_y = torch.randn(6, d_out)
        out().backward(g_y)
        V = W0 + s * B().detach() @ A().detach()
        n = V.norm(dim=1, keepdim=True)
        G = g_y.T @ x                                       # dL/dW'
        want_B = s * ((m().detach()[:, None] / n) * G) @ A().detach().T
        assert B().grad is not None, "B received no gradient"
        assert torch.allclose(B().grad, want_B, atol=1e-4), \
            "grad of B is not s·((m/n) ⊙ G)·Aᵀ: is the norm detached (treated as a constant)?"
        want_m = (G * V / n).sum(dim=1)
        assert m().grad is not None, "m received no gradient"
        assert torch.allclose(m().grad, want_m, atol=1e-4), "grad of m is not G·V/‖V‖_c (row by row)"

    return run_checks(f"check_dora_linear({getattr(cls, '__name__', cls)})", [
        ("starts at the base layer", "B = 0 and m = ‖W0‖_c = base.weight.norm(dim=1)", identity),
        ("only A, B and m train", "freeze the base layer; A, B, m are nn.Parameters", frozen),
        ("parameter count", "A (r, d_in), B (d_out, r), m (d_out,)", count),
        ("forward = m ⊙ V/‖V‖_c x + b", "row norms (dim=1) of W0 + (α/r)·B@A; add the bias after scaling",
         forward),
        ("norm detached in backward", "compute n, then n.detach() before dividing", detached),
    ], learner=(cls,))


def check_dora_magnitude_grad(fn, d_out: int = 6, d_in: int = 9):
    """Check `fn(V, m, G) -> (g_V, g_m)` for W' = m ⊙ V/‖V‖_c (rows), G = dL/dW', against autograd with
    the norm NOT detached (paper Eqs. 6 and 7)."""
    torch.manual_seed(0)
    V = torch.randn(d_out, d_in) * torch.rand(d_out, 1) * 2 + 0.1
    m = torch.rand(d_out) + 0.5
    G = torch.randn(d_out, d_in)
    Vg, mg = V.clone().requires_grad_(True), m.clone().requires_grad_(True)
    (mg[:, None] * Vg / Vg.norm(dim=1, keepdim=True)).backward(G)

    def check():
        res = fn(V.clone(), m.clone(), G.clone())
        assert isinstance(res, (tuple, list)) and len(res) == 2, \
            f"my_dora_grads returned {type(res).__name__}; expected the pair (g_V, g_m)"
        g_V, g_m = (torch.as_tensor(t) for t in res)
        assert tuple(g_V.shape) == (d_out, d_in), \
            f"g_V has shape {tuple(g_V.shape)}; expected V's shape (d_out, d_in) = {(d_out, d_in)}"
        assert tuple(g_m.shape) == (d_out,), \
            f"g_m has shape {tuple(g_m.shape)}; expected m's shape (d_out,) = ({d_out},)"
        assert torch.allclose(g_m, mg.grad, atol=1e-5), "g_m differs from autograd's"
        assert torch.allclose(g_V, Vg.grad, atol=1e-5), "g_V differs from autograd's"

    return run_checks("check_dora_magnitude_grad", [
        ("g_V and g_m match autograd",
         "per row: g_m = g·v/‖v‖, g_V = (m/‖v‖)(g − (g·u)u) with u = v/‖v‖", check)], learner=(fn,))


__all__ = ["check_weight_norm", "check_dora_linear", "check_dora_magnitude_grad"]
