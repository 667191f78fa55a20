r"""MonteCLoRA: a Bayesian LoRA (Sengupta et al., TMLR 2025, arXiv:2411.04358).

LoRA's A becomes the mean of a mixture of N Gaussians. While training, each forward pass draws

    Σ   = diag(clip(diag(S Z_W Sᵀ), 1e-3)),   S = diag(exp(std_prior)),  Z_W ~ Wishart(df=r, I_r)   (Bartlett)
    ε_k = c · Z_k Σ^½,                        Z_k ~ N(0, 1) of shape (d_in, r),  k = 1..N,   c = sample_scaler
    π   = softmax(μ + diag(σ)^½ z),           z ~ N(0, I_N)   (a Laplace-softmax draw from Dirichlet(α))
          α = exp(expert_weights_prior),  μ_i = log α_i − mean_j log α_j,
          σ_i = (1/α_i)(1 − 2/N) + (1/N²) Σ_j 1/α_j
    Aᵀ_eff = Σ_k π_k (Aᵀ + ε_k) = Aᵀ + Σ_k π_k ε_k

and computes y = W0 x + s · B A_eff x. In eval mode y = W0 x + s · B A x: plain LoRA, and merging is
LoRA's merge. Because Σ_k π_k = 1 and E[ε_k | Σ] = 0, E[A_eff] = A: a training-mode output is an unbiased
estimate of the LoRA output (for a linear layer). Given Σ and π, each row of Aᵀ_eff − Aᵀ is
N(0, c² ‖π‖² Σ) — the sampled noise's covariance that tests/test_monteclora.py checks.

Loss: the task loss plus the mean over adapted layers of
    kl_loss_weight · (KL_Dir + KL_Wish + KL_MVN)  (+ Σ_k π_k² if use_entropy)
    KL_Dir  = KL(Dir(α) ‖ Dir(dirichlet_prior · 1))          (the standard closed form, lgamma/digamma)
    KL_Wish = ½ (−r Σ_i log v_i + r Σ_i v_i − r²),          v = exp(2 · std_prior) = diag(S Sᵀ)
    KL_MVN  = N · ½ (Σ_i Σ_ii − Σ_i log Σ_ii − r)            with Σ the last forward's draw (I before any)
returned by `MonteCLoRAConfig.extra_loss` (the Trainer adds it). KL_Wish and KL_MVN are the paper code's
expressions (not exact KLs of a Wishart or of the N Gaussians; they pull v and Σ towards 1).

Code names (peft's): A = `lora_A[name].weight` (r, d_in), B = `lora_B[name].weight` (d_out, r), s =
`scaling[name]`, and per layer `lora_monteclora_sampler[name]` holding `std_prior` (r,) = log diag S and
`expert_weights_prior` (N,) = log α, both trainable, init U(0, 1) as the paper's code and peft.

Trainable parameters per layer: r·(d_in + d_out) + r + N.

Where this differs from the references (the official code LCS2-IIITD/MonteCLoRA and peft 0.21.2's port):
- KL_Dir: both references compute lnΓ(Σα) − lnΓ(Σα0) **+** Σ(lnΓ(α_i) − lnΓ(α0_i)) + …; the standard KL has
  **−** on the middle sum (their value can be negative). We use the standard KL, equal to
  torch.distributions.kl_divergence; peft's value = ours + 2 Σ_i (lnΓ(α_i) − lnΓ(α0_i)) (tested).
- The noise is never written into A: peft's port averages into a new tensor too, the official code replaces
  lora_A.weight with the noisy matrix on every forward (so the mean drifts with the noise).
- Σ is diagonal, so Σ^½ is its elementwise square root (peft takes a Cholesky factor: the same matrix).
- The official code draws m Gaussians × n samples each (defaults 4 × 4, sample_scaler 5e-3 applied twice,
  clip 0.1, sigmoid-normalised π, KL divided by m·n, dirichlet_prior 1); we follow peft's single-level form:
  N = 8 samples, one per Gaussian, sample_scaler 1e-4, kl_loss_weight 1e-5, dirichlet_prior 0.1, clip 1e-3,
  use_entropy False (peft's MontecloraConfig defaults). No pre-drawn sample buffer: we draw from torch's
  global generator at each forward, so `torch.manual_seed` fixes a run.
- Linear bases only (Linear, Conv1D, 4-bit): no embedding variant.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import targeting
from ..config import check_positive, check_positive_int, register
from .lora import LoRAConfig, LoRALinear

SIGMA_MIN = 1e-3  # clip of the sampled variances (peft's port; the official code uses 0.1)


# ---- the pieces of the sampling step, each usable on its own (the chapter checks them one by one) ----
def bartlett_wishart(r: int, df: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """Z ~ Wishart(df, I_r), (r, r), by Bartlett's decomposition: Z = L Lᵀ with L lower-triangular,
    L_ii = √χ²(df − i) (i = 0..r−1) and L_ij ~ N(0, 1) below the diagonal. E[Z] = df · I. Needs df > r − 1."""
    chi2 = torch.distributions.Chi2(torch.arange(df, df - r, -1.0, device=device)).sample()  # (r,)
    L = torch.randn(r, r, device=device).tril(-1) + torch.diag(chi2.sqrt())
    return (L @ L.T).to(dtype)


def dirichlet_laplace_logits(alpha: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """μ + diag(σ)^½ z: softmax of this is a Laplace-approximate draw from Dirichlet(α) (MacKay 1998, as in
    ProdLDA). alpha (N,) concentrations > 0, z (N,) standard normal."""
    n = alpha.numel()
    alpha = alpha.clamp_min(1e-6)
    mu = alpha.log() - alpha.log().mean()
    sigma = (1 / alpha) * (1 - 2 / n) + (1 / alpha).sum() / n**2
    return mu + sigma.clamp_min(1e-6).sqrt() * z


def dirichlet_kl(alpha: torch.Tensor, prior: float) -> torch.Tensor:
    """KL(Dir(α) ‖ Dir(prior · 1)), the closed form with lgamma and digamma."""
    alpha0 = torch.full_like(alpha, prior)
    total = alpha.sum()
    return (torch.lgamma(total) - torch.lgamma(alpha0.sum()) - (torch.lgamma(alpha) - torch.lgamma(alpha0)).sum()
            + ((alpha - alpha0) * (torch.digamma(alpha) - torch.digamma(total))).sum())


def wishart_kl(std_prior: torch.Tensor) -> torch.Tensor:
    """½ (−r Σ log v + r Σ v − r²) with v = exp(2 · std_prior), the diagonal of S Sᵀ (the paper code's term)."""
    r, v = std_prior.numel(), torch.exp(2 * std_prior)
    return 0.5 * (-r * v.log().sum() + r * v.sum() - r * r)


def mvn_kl(sigma: torch.Tensor, n: int) -> torch.Tensor:
    """n · KL(N(0, diag σ) ‖ N(0, I)) = n · ½ (Σ σ − Σ log σ − r), σ (r,) the sampled variances."""
    sigma = sigma.clamp_min(1e-6)
    return n * 0.5 * (sigma.sum() - sigma.log().sum() - sigma.numel())


class MonteCLoRASampler(nn.Module):
    """One layer's variational parameters (peft's `lora_monteclora_sampler[name]`) and its last draw."""

    def __init__(self, r: int, config: "MonteCLoRAConfig", device=None, dtype=torch.float32):
        super().__init__()
        self.std_prior = nn.Parameter(torch.rand(r, device=device, dtype=dtype))  # log diag S, U(0, 1)
        self.expert_weights_prior = nn.Parameter(torch.rand(config.num_samples, device=device, dtype=dtype))
        self.num_samples, self.sample_scaler = config.num_samples, config.sample_scaler
        self.kl_loss_weight, self.dirichlet_prior = config.kl_loss_weight, config.dirichlet_prior
        self.use_entropy = config.use_entropy
        self.last_sigma = self.last_pi = None  # the last training forward's Σ (r,) and π (N,): not saved

    def forward(self, A: torch.Tensor) -> torch.Tensor:
        """A_eff (r, d_in) for A (r, d_in): A plus the π-weighted mixture of N Gaussian perturbations."""
        r, d_in = A.shape
        n, dev, dt = self.num_samples, A.device, A.dtype
        S2 = torch.exp(2 * self.std_prior)  # diag(S Sᵀ), (r,)
        sigma = (S2 * bartlett_wishart(r, r, dev, dt).diagonal()).clamp_min(SIGMA_MIN)  # diag Σ, (r,)
        eps = self.sample_scaler * torch.randn(n, d_in, r, device=dev, dtype=dt) * sigma.sqrt()  # ε_k (N, d_in, r)
        logits = dirichlet_laplace_logits(self.expert_weights_prior.exp(), torch.randn(n, device=dev, dtype=dt))
        pi = torch.softmax(logits, dim=-1)  # (N,)
        self.last_sigma, self.last_pi = sigma, pi
        return A + torch.einsum("k,kir->ri", pi, eps)  # Aᵀ_eff = Σ_k π_k (Aᵀ + ε_k), stored as (r, d_in)

    def train(self, mode: bool = True):
        if not mode:  # forget the last draw (it holds a graph): the KL is a training-time term
            self.last_sigma = self.last_pi = None
        return super().train(mode)

    def variational_loss(self) -> torch.Tensor:
        """kl_loss_weight · (KL_Dir + KL_Wish + KL_MVN) (+ Σπ² if use_entropy), from the last draw."""
        p = self.std_prior
        sigma = self.last_sigma if self.last_sigma is not None else torch.ones_like(p)
        pi = self.last_pi if self.last_pi is not None else torch.full_like(self.expert_weights_prior,
                                                                           1 / self.num_samples)
        kl = (dirichlet_kl(self.expert_weights_prior.exp(), self.dirichlet_prior) + wishart_kl(p)
              + mvn_kl(sigma, self.num_samples))
        return self.kl_loss_weight * kl + ((pi ** 2).sum() if self.use_entropy else 0)


@register
@dataclass
class MonteCLoRAConfig(LoRAConfig):
    num_samples: int = 8  # N: Gaussian perturbations of A mixed per forward (peft's default)
    sample_scaler: float = 1e-4  # c: scale of the perturbations (peft 1e-4; the official code 5e-3, applied twice)
    kl_loss_weight: float = 1e-5  # weight of KL_Dir + KL_Wish + KL_MVN in the loss
    dirichlet_prior: float = 0.1  # α0 of the Dirichlet prior on the mixture weights (peft 0.1; official 1)
    use_entropy: bool = False  # add Σ π_k² (penalises one expert taking all the weight)

    method = "monteclora"

    def validate(self):
        super().validate()
        check_positive_int("num_samples", self.num_samples)
        check_positive("sample_scaler", self.sample_scaler)
        check_positive("dirichlet_prior", self.dirichlet_prior)
        if isinstance(self.kl_loss_weight, bool) or not isinstance(self.kl_loss_weight, (int, float)) \
                or not self.kl_loss_weight >= 0:
            raise ValueError(f"kl_loss_weight must be a number ≥ 0, got {self.kl_loss_weight!r}")
        if not isinstance(self.use_entropy, bool):
            raise ValueError(f"use_entropy must be True or False, got {self.use_entropy!r}")

    @property
    def base_types(self):
        return targeting.LINEAR_TYPES

    @property
    def layer_class(self):
        return MonteCLoRALinear

    def extra_loss(self, model, adapter_name: str):
        """The mean over adapted layers of their variational loss (peft's `_get_monteclora_loss`)."""
        terms = [layer.lora_monteclora_sampler[adapter_name].variational_loss()
                 for _, layer in model.adapter_layers()
                 if isinstance(layer, MonteCLoRALinear) and adapter_name in layer.lora_monteclora_sampler]
        return sum(terms) / len(terms) if terms else None


class MonteCLoRALinear(LoRALinear):
    """LoRALinear whose A is sampled around its mean while training; eval mode is plain LoRA."""

    adapter_dicts = LoRALinear.adapter_dicts + ("lora_monteclora_sampler",)

    def __init__(self, base_layer: nn.Module, path: str = ""):
        super().__init__(base_layer, path)
        self.lora_monteclora_sampler = nn.ModuleDict()

    def init_adapter(self, name: str, config: MonteCLoRAConfig) -> None:
        device, dtype = self.base_device_dtype()
        r = self.lora_A[name].weight.shape[0]
        self.lora_monteclora_sampler[name] = MonteCLoRASampler(r, config, device, dtype)

    def lora_branch(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Eval: s · B A x (LoRA). Training: s · B A_eff dropout(x) with a fresh A_eff; A itself is not changed."""
        if not self.training:
            return super().lora_branch(name, x)
        A = self.lora_A[name].weight  # (r, d_in), the mean
        A_eff = self.lora_monteclora_sampler[name](A)  # (r, d_in)
        h = F.linear(self.lora_dropout[name](x.to(A.dtype)), A_eff)  # (..., r)
        return self.lora_B[name](h) * self.scaling[name]  # (..., d_out)


__all__ = ["MonteCLoRAConfig", "MonteCLoRALinear", "MonteCLoRASampler", "bartlett_wishart",
           "dirichlet_laplace_logits", "dirichlet_kl", "wishart_kl", "mvn_kl"]
