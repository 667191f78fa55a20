"""Checks for the MonteCLoRA chapter's exercises.

    from minipeft.exercises import check_bartlett_wishart, check_dirichlet_kl, check_monteclora_layer
    check_bartlett_wishart(my_wishart)     # my_wishart(r, df) -> (r, r), one draw of Wishart(df, I_r)
    check_dirichlet_kl(my_kl)              # my_kl(alpha, prior) -> KL(Dir(alpha) ‖ Dir(prior · 1)), a scalar
    check_monteclora_layer(MyMonteCLoRA)   # MyMonteCLoRA(base: nn.Linear, r, alpha, num_samples, sample_scaler)

The references inside the checks are torch.distributions (Wishart moments, Dirichlet KL) and plain tensors.
Statistical checks use a fixed seed and a generous tolerance, so a correct answer passes every time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._runner import built_once, find_param, run_checks


def check_bartlett_wishart(fn, r: int = 3, df: int = 5, draws: int = 6000):
    """Check `fn(r, df) -> Z` (r, r): symmetric, positive semi-definite, E[Z] = df·I, Var(Z_ij) = df(1 + δ_ij)."""

    def draw():
        Z = torch.as_tensor(fn(r, df)).float()
        assert tuple(Z.shape) == (r, r), f"a draw has shape {tuple(Z.shape)}; expected (r, r) = {(r, r)}"
        return Z

    cache = {}

    def sample(n):  # the same seeded draws for every check that asks for n of them (drawn once)
        if n not in cache:
            torch.manual_seed(0)
            cache[n] = torch.stack([draw() for _ in range(n)])
        return cache[n]

    def shape():
        Z = sample(5)
        assert torch.allclose(Z, Z.transpose(1, 2), atol=1e-5), "Z is not symmetric: return L @ L.T, not L"
        assert (torch.linalg.eigvalsh(Z) > -1e-4).all(), "Z has a negative eigenvalue: return L @ L.T"

    def mean():
        Z = sample(draws)
        got = Z.mean(0)
        assert torch.allclose(got, df * torch.eye(r), atol=0.25), \
            f"the mean of {draws} draws is\n{got.numpy().round(2)}\nexpected df·I = {df}·I"

    def spread():
        Z = sample(draws)
        got = Z.var(0)
        assert torch.allclose(got, df * (1 + torch.eye(r)), atol=0.2 * df), \
            f"Var(Z_ij) over {draws} draws is\n{got.numpy().round(1)}\nexpected df·(1 + δ_ij)"

    return run_checks("check_bartlett_wishart", [
        ("a symmetric PSD (r, r) matrix", "Bartlett: Z = L Lᵀ with L lower-triangular", shape),
        ("E[Z] = df · I", "L_ii = √χ²(df − i) for i = 0..r−1, N(0, 1) strictly below the diagonal, 0 above", mean),
        ("Var(Z_ij) = df (1 + δ_ij)", "the diagonal of L holds square roots of chi-square draws", spread),
    ], learner=(fn,))


def check_dirichlet_kl(fn, n: int = 6):
    """Check `fn(alpha, prior) -> KL(Dir(alpha) ‖ Dir(prior · 1))` against torch.distributions."""
    torch.manual_seed(0)
    D = torch.distributions.Dirichlet

    def ref(alpha, prior):
        return torch.distributions.kl_divergence(D(alpha), D(torch.full_like(alpha, prior)))

    cases = [(torch.rand(n).exp(), 0.1), (torch.rand(n) * 5 + 0.2, 1.0), (torch.rand(n) + 0.05, 2.5)]

    def call(alpha, prior):
        out = fn(alpha, prior)
        assert torch.as_tensor(out).numel() == 1, \
            f"the KL has shape {tuple(torch.as_tensor(out).shape)}; expected a scalar: sum the terms over the " \
            f"{n} components"
        return out

    def zero():
        got = float(call(torch.full((n,), 0.7), 0.7))
        assert abs(got) < 1e-4, f"KL(p ‖ p) = {got:.4g}, expected 0"

    def value():
        for alpha, prior in cases:
            got, want = float(call(alpha.clone(), prior)), float(ref(alpha, prior))
            assert abs(got - want) < 1e-4 * max(1.0, abs(want)), \
                f"alpha = {alpha.numpy().round(2)}, prior {prior}: got {got:.4f}, expected {want:.4f}"

    def grad():
        alpha = cases[0][0].clone().requires_grad_(True)
        out = call(alpha, 0.1)
        assert isinstance(out, torch.Tensor) and out.requires_grad, \
            "return a tensor that autograd can differentiate (torch.lgamma / torch.digamma, not math.lgamma)"
        out.sum().backward()
        a = cases[0][0].clone().requires_grad_(True)
        ref(a, 0.1).backward()
        assert torch.allclose(alpha.grad, a.grad, atol=1e-4), "the gradient with respect to alpha differs"

    return run_checks("check_dirichlet_kl", [
        ("KL(p ‖ p) = 0", "every term vanishes when alpha equals the prior", zero),
        ("matches torch.distributions", "lnΓ(Σα) − lnΓ(Σα0) − Σ(lnΓ(α_i) − lnΓ(α0_i)) "
                                        "+ Σ(α_i − α0_i)(ψ(α_i) − ψ(Σα))", value),
        ("differentiable in alpha", "torch.lgamma and torch.digamma keep the graph", grad),
    ], learner=(fn,))


def check_monteclora_layer(cls, d_in: int = 16, d_out: int = 6, r: int = 3, n: int = 4, alpha: float = 6.0):
    """Property checks for a learner's MonteCLoRA layer `cls(base, r, alpha, num_samples, sample_scaler)` with
    trainable A (r, d_in), B (d_out, r), std_prior (r,) and expert_weights_prior (N,) (attributes `A`/`B`, or
    peft's `lora_A`/`lora_B` as nn.Linear): eval = LoRA; training = LoRA plus zero-mean noise on A."""
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out)
    x = torch.randn(4, d_in)
    s = alpha / r

    layer = built_once(lambda: cls(base, r, alpha, n, 0.3))  # the learner's class, built in the first check

    A = lambda: find_param(layer(), ["A", "lora_A"], (r, d_in), "(r, d_in)")  # noqa: E731
    B = lambda: find_param(layer(), ["B", "lora_B"], (d_out, r), "(d_out, r)")  # noqa: E731

    def out():
        y = layer()(x)
        assert tuple(y.shape) == (4, d_out), f"the output has shape {tuple(y.shape)} for x of shape (4, d_in); " \
                                             f"expected (4, d_out) = {(4, d_out)}"
        return y

    def lora():
        return F.linear(x, base.weight + s * B().detach() @ A().detach(), base.bias)

    def perturb():
        torch.manual_seed(1)
        with torch.no_grad():
            B().normal_()

    def count():
        got = sum(p.numel() for p in layer().parameters() if p.requires_grad)
        want = r * (d_in + d_out) + r + n
        assert got == want, f"{got} trainable parameters, expected r(d_in + d_out) + r + N = {want}"

    def eval_is_lora():
        perturb()
        layer().eval()
        with torch.no_grad():
            assert torch.allclose(out(), lora(), atol=1e-5), "in eval mode the output is not W0 x + s·B A x"
            assert torch.equal(out(), out()), "two eval-mode calls differ: sample only while training"

    def a_untouched():
        perturb()
        layer().train()
        before = A().detach().clone()
        with torch.no_grad():
            y1, y2 = out(), out()
        assert not torch.allclose(y1, y2), "two training-mode calls gave the same output: no noise was drawn"
        assert torch.equal(A().detach(), before), "A changed in a forward pass: add the noise to a new tensor"

    def unbiased():
        perturb()
        layer().train()
        torch.manual_seed(2)
        with torch.no_grad():
            draws = torch.stack([out() for _ in range(2000)])
        want = lora()
        err = (draws.mean(0) - want).abs()
        tol = 5 * draws.std(0) / 2000 ** 0.5 + 1e-4
        assert (err < tol).all(), f"the mean of 2000 training outputs is off the LoRA output by up to " \
                                  f"{err.max():.3g}: the mixture weights must sum to 1 and the noise have mean 0"

    return run_checks(f"check_monteclora_layer({getattr(cls, '__name__', cls)})", [
        ("parameter count", "A, B, std_prior (r,), expert_weights_prior (N,) are the only Parameters", count),
        ("eval mode is plain LoRA", "if not self.training: use A itself", eval_is_lora),
        ("training draws noise, A untouched", "A_eff = A + noise, a new tensor, every forward", a_untouched),
        ("unbiased: E[output] = LoRA output", "π = softmax(...) sums to 1; ε_k = c·Z_k·√Σ has mean 0", unbiased),
    ], learner=(cls,))


__all__ = ["check_bartlett_wishart", "check_dirichlet_kl", "check_monteclora_layer"]
