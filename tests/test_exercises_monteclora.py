"""The MonteCLoRA chapter's exercise checks: each passes two different correct answers and fails typical
mistakes (chi-square degrees of freedom not decreasing, L returned instead of L Lᵀ, χ² instead of √χ² on the
diagonal, peft's sign on the lnΓ sum, swapped KL arguments, noise in eval mode, noise written into A,
mixture weights that do not sum to 1, ...).

The correct answers are written independently of minipeft (plain tensors), so a check that accepted
anything would fail the broken cases here.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minipeft.exercises import check_bartlett_wishart, check_dirichlet_kl, check_monteclora_layer


def failing(report):
    return [i for i, (_, ok) in enumerate(report) if not ok]


# -- exercise 1: a Wishart draw by Bartlett's decomposition --------------------------------------------
def bartlett(r, df):
    chi2 = torch.distributions.Chi2(torch.tensor([df - i for i in range(r)], dtype=torch.float)).sample()
    L = torch.diag(chi2.sqrt()) + torch.randn(r, r).tril(-1)
    return L @ L.T


def gram(r, df):  # a second correct answer for integer df: the Gram matrix of df standard normal vectors
    G = torch.randn(r, df)
    return G @ G.T


def bartlett_same_df(r, df):  # mistake: χ²(df) on every diagonal entry
    L = torch.diag(torch.distributions.Chi2(torch.full((r,), float(df))).sample().sqrt()) + torch.randn(r, r).tril(-1)
    return L @ L.T


def bartlett_returns_L(r, df):  # mistake: L, not L Lᵀ
    chi2 = torch.distributions.Chi2(torch.tensor([df - i for i in range(r)], dtype=torch.float)).sample()
    return torch.diag(chi2.sqrt()) + torch.randn(r, r).tril(-1)


def bartlett_no_sqrt(r, df):  # mistake: χ² on the diagonal of L instead of √χ²
    chi2 = torch.distributions.Chi2(torch.tensor([df - i for i in range(r)], dtype=torch.float)).sample()
    L = torch.diag(chi2) + torch.randn(r, r).tril(-1)
    return L @ L.T


def bartlett_gamma(r, df):  # a third: χ²(k) drawn as 2·Gamma(k/2, 1), L filled by index, Z = Σ_k L[:, k] L[:, k]ᵀ
    L = torch.zeros(r, r)
    L[range(r), range(r)] = (2 * torch.distributions.Gamma(torch.arange(df, df - r, -1.0) / 2, 1.0).sample()).sqrt()
    rows, cols = torch.tril_indices(r, r, -1)
    L[rows, cols] = torch.randn(len(rows))
    return torch.einsum("ik,jk->ij", L, L)


def bartlett_off_by_one(r, df):  # mistake: χ²(df − i − 1), i.e. counting i from 1
    chi2 = torch.distributions.Chi2(torch.tensor([df - i for i in range(1, r + 1)], dtype=torch.float)).sample()
    L = torch.diag(chi2.sqrt()) + torch.randn(r, r).tril(-1)
    return L @ L.T


def bartlett_upper(r, df):  # mistake: the normals above the diagonal (L upper-triangular), Z = L Lᵀ
    chi2 = torch.distributions.Chi2(torch.tensor([df - i for i in range(r)], dtype=torch.float)).sample()
    L = torch.diag(chi2.sqrt()) + torch.randn(r, r).triu(1)
    return L @ L.T


@pytest.mark.parametrize("fn", [bartlett, gram, bartlett_gamma])
def test_bartlett_correct_passes(fn):
    assert check_bartlett_wishart(fn)


@pytest.mark.parametrize("fn, fails", [
    (bartlett_same_df, [1, 2]),
    (bartlett_returns_L, [0, 1, 2]),
    (bartlett_no_sqrt, [1, 2]),
    (bartlett_off_by_one, [1, 2]),
    (bartlett_upper, [1, 2]),
])
def test_bartlett_broken_fails(fn, fails):
    report = check_bartlett_wishart(fn)
    assert not report and failing(report) == fails


def test_bartlett_shape_named(capsys):  # the chi-square draws alone, not the matrix
    report = check_bartlett_wishart(lambda r, df: torch.distributions.Chi2(torch.full((r,), float(df))).sample())
    assert failing(report) == [0, 1, 2]
    assert "a draw has shape (3,); expected (r, r) = (3, 3)" in capsys.readouterr().out


def test_bartlett_raising_is_a_fail(capsys):  # Chi2 of a Python list raises inside torch.distributions
    report = check_bartlett_wishart(lambda r, df: torch.distributions.Chi2([df - i for i in range(r)]).sample())
    assert not report and failing(report) == [0, 1, 2]


# -- exercise 2: the Dirichlet KL --------------------------------------------------------------------
def kl_lgamma(alpha, prior):
    a0 = torch.full_like(alpha, prior)
    return (torch.lgamma(alpha.sum()) - torch.lgamma(a0.sum()) - (torch.lgamma(alpha) - torch.lgamma(a0)).sum()
            + ((alpha - a0) * (torch.digamma(alpha) - torch.digamma(alpha.sum()))).sum())


def kl_log_beta(alpha, prior):  # a second correct answer: log multivariate Beta functions, written out
    def log_beta(a):
        return torch.special.gammaln(a).sum() - torch.special.gammaln(a.sum())
    a0 = prior * torch.ones_like(alpha)
    e_log_p = torch.special.digamma(alpha) - torch.special.digamma(alpha.sum())  # E_p[log p_i]
    return log_beta(a0) - log_beta(alpha) + torch.dot(alpha - a0, e_log_p)


def kl_peft_sign(alpha, prior):  # mistake (as the reference code): + on the lnΓ(α_i) sum
    a0 = torch.full_like(alpha, prior)
    return (torch.lgamma(alpha.sum()) - torch.lgamma(a0.sum()) + (torch.lgamma(alpha) - torch.lgamma(a0)).sum()
            + ((alpha - a0) * (torch.digamma(alpha) - torch.digamma(alpha.sum()))).sum())


def kl_swapped(alpha, prior):  # mistake: KL(prior ‖ alpha)
    a0 = torch.full_like(alpha, prior)
    return (torch.lgamma(a0.sum()) - torch.lgamma(alpha.sum()) - (torch.lgamma(a0) - torch.lgamma(alpha)).sum()
            + ((a0 - alpha) * (torch.digamma(a0) - torch.digamma(a0.sum()))).sum())


def kl_python_floats(alpha, prior):  # mistake: math.lgamma on floats: right value, no gradient
    a = alpha.tolist()
    s = sum(a)
    dig = torch.digamma(torch.tensor(a)) - torch.digamma(torch.tensor(s))
    return torch.tensor(math.lgamma(s) - math.lgamma(prior * len(a)) - sum(math.lgamma(v) - math.lgamma(prior)
                                                                           for v in a)
                        + sum((v - prior) * d for v, d in zip(a, dig.tolist())))


def kl_loop_double(alpha, prior):  # a third: in float64, a loop over the components, prior as a tensor
    a = alpha.double()
    p = torch.tensor(float(prior), dtype=torch.float64)
    total, k = a.sum(), a.numel()
    kl = torch.lgamma(total) - torch.lgamma(k * p)
    for ai in a:
        kl = kl - torch.lgamma(ai) + torch.lgamma(p) + (ai - p) * (torch.digamma(ai) - torch.digamma(total))
    return kl


def kl_no_sum(alpha, prior):  # mistake: the per-component terms returned without summing them
    a0 = torch.full_like(alpha, prior)
    return (torch.lgamma(alpha.sum()) - torch.lgamma(a0.sum()) - (torch.lgamma(alpha) - torch.lgamma(a0))
            + (alpha - a0) * (torch.digamma(alpha) - torch.digamma(alpha.sum())))


def kl_prior_digamma(alpha, prior):  # mistake: ψ(Σα0) of the prior in the expectation, not ψ(Σα)
    a0 = torch.full_like(alpha, prior)
    return (torch.lgamma(alpha.sum()) - torch.lgamma(a0.sum()) - (torch.lgamma(alpha) - torch.lgamma(a0)).sum()
            + ((alpha - a0) * (torch.digamma(alpha) - torch.digamma(a0.sum()))).sum())


@pytest.mark.parametrize("fn", [kl_lgamma, kl_log_beta, kl_loop_double])
def test_dirichlet_kl_correct_passes(fn):
    assert check_dirichlet_kl(fn)


@pytest.mark.parametrize("fn, fails", [
    (kl_peft_sign, [1, 2]),
    (kl_swapped, [1, 2]),
    (kl_python_floats, [2]),
    (kl_no_sum, [0, 1, 2]),
    (kl_prior_digamma, [1, 2]),
])
def test_dirichlet_kl_broken_fails(fn, fails):
    report = check_dirichlet_kl(fn)
    assert not report and failing(report) == fails


def test_dirichlet_kl_shape_named(capsys):
    check_dirichlet_kl(kl_no_sum)
    assert "the KL has shape (6,); expected a scalar" in capsys.readouterr().out


def test_dirichlet_kl_raising_is_a_fail(capsys):  # torch.lgamma of the Python float prior raises a TypeError
    report = check_dirichlet_kl(lambda alpha, prior: torch.lgamma(alpha.sum()) - torch.lgamma(prior * len(alpha)))
    assert not report and failing(report) == [0, 1, 2]
    assert "TypeError" in capsys.readouterr().out


# -- exercise 3: a MonteCLoRA layer ----------------------------------------------------------------------
class TinyMonteCLoRA(nn.Module):
    """The chapter's form: Wishart-scaled variances, N Gaussian perturbations, Laplace-softmax weights.
    Knobs switch on typical mistakes."""

    def __init__(self, base, r, alpha, num_samples, sample_scaler, noise_in_eval=False, in_place=False,
                 unnormalised=False, extra_param=False):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(r, base.in_features) / r)
        self.B = nn.Parameter(torch.zeros(base.out_features, r))
        self.std_prior = nn.Parameter(torch.rand(r))
        self.expert_weights_prior = nn.Parameter(torch.rand(num_samples))
        if extra_param:
            self.bias_noise = nn.Parameter(torch.zeros(base.out_features))
        self.s, self.n, self.c = alpha / r, num_samples, sample_scaler
        self.noise_in_eval, self.in_place, self.unnormalised = noise_in_eval, in_place, unnormalised

    def sampled_A(self):
        r, d_in = self.A.shape
        Z = bartlett(r, r)  # the chapter draws the Wishart with exercise 1
        sigma = (torch.exp(2 * self.std_prior) * Z.diagonal()).clamp_min(1e-3)
        eps = self.c * torch.randn(self.n, d_in, r) * sigma.sqrt()
        a = self.expert_weights_prior.exp()
        mu = a.log() - a.log().mean()
        var = (1 / a) * (1 - 2 / self.n) + (1 / a).sum() / self.n ** 2
        logits = mu + var.sqrt() * torch.randn(self.n)
        pi = logits.exp() if self.unnormalised else torch.softmax(logits, -1)
        return (pi[:, None, None] * (self.A.T + eps)).sum(0).T

    def forward(self, x):
        A = self.A
        if self.training or self.noise_in_eval:
            A = self.sampled_A()
            if self.in_place:
                with torch.no_grad():
                    self.A.copy_(A)
        return self.base(x) + self.s * x @ A.T @ self.B.T


class PeftStyleMonteCLoRA(nn.Module):
    """A second correct answer: peft's names, nn.Linear factors, the mixture noise drawn in one go (given π
    and Σ, Σ_k π_k ε_k is Gaussian with covariance c²‖π‖²Σ per row)."""

    def __init__(self, base, r, alpha, num_samples, sample_scaler):
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.zeros_(self.lora_B.weight)
        self.std_prior = nn.Parameter(torch.rand(r))
        self.expert_weights_prior = nn.Parameter(torch.rand(num_samples))
        self.scaling, self.c = alpha / r, sample_scaler

    def forward(self, x):
        y = self.base_layer(x)
        if not self.training:
            return y + self.scaling * self.lora_B(self.lora_A(x))
        r = self.std_prior.numel()
        sigma = torch.exp(2 * self.std_prior) * torch.distributions.Chi2(float(r)).sample((r,))  # diag of Wishart
        pi = torch.distributions.Dirichlet(self.expert_weights_prior.exp()).rsample()  # the exact Dirichlet
        noise = self.c * pi.norm() * torch.randn(self.lora_A.in_features, r) * sigma.sqrt()
        return y + self.scaling * self.lora_B(F.linear(x, self.lora_A.weight + noise.T))


@pytest.mark.parametrize("cls", [TinyMonteCLoRA, PeftStyleMonteCLoRA])
def test_monteclora_layer_correct_passes(cls):
    assert check_monteclora_layer(cls)


@pytest.mark.parametrize("kw, fails", [
    ({"noise_in_eval": True}, [1]),
    ({"in_place": True}, [2, 3]),
    ({"unnormalised": True}, [3]),
    ({"extra_param": True}, [0]),
])
def test_monteclora_layer_broken_fails(kw, fails):
    report = check_monteclora_layer(lambda *a: TinyMonteCLoRA(*a, **kw))
    assert not report and failing(report) == fails


class TransposedB(PeftStyleMonteCLoRA):
    """B kept as an (r, d_out) Parameter and used as (x A_effᵀ) @ B: the text asks for B (d_out, r)."""

    def __init__(self, base, r, alpha, num_samples, sample_scaler):
        super().__init__(base, r, alpha, num_samples, sample_scaler)
        del self.lora_B
        self.B = nn.Parameter(torch.zeros(r, base.out_features))

    def forward(self, x):
        self.lora_B = lambda h: h @ self.B
        return super().forward(x)


def test_monteclora_layer_shape_named(capsys):
    report = check_monteclora_layer(TransposedB)
    assert failing(report) == [1, 2, 3]
    assert "B has shape (3, 6); expected (d_out, r) = (6, 3)" in capsys.readouterr().out


class RaisingForward(TinyMonteCLoRA):
    def sampled_A(self):  # a shape error in the training-mode branch: (r, d_in) @ (N, 1)
        return self.A @ torch.randn(self.n, 1)


def test_monteclora_layer_raising_is_a_fail():
    report = check_monteclora_layer(lambda base, r, alpha, n, c: TinyMonteCLoRA(base, r, alpha, n))  # missing c
    assert not report and failing(report) == [0, 1, 2, 3]
    report = check_monteclora_layer(RaisingForward)
    assert not report and failing(report) == [2, 3]
