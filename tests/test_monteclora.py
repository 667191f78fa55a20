"""MonteCLoRA against references nobody here wrote: LoRA itself (eval mode, and training mode as the noise
scale goes to 0), HF peft's MonteCLoRA port (`LoraConfig(monteclora_config=...)`: same tensors in, same
KL terms and tensor names out), torch.distributions (Dirichlet KL, Wishart moments), and the stated
distribution of the sampled noise (a statistical test with a fixed seed and a generous tolerance)."""
import pytest
import torch
from conftest import tiny_llama
from torch import nn

import minipeft as mp
from minipeft.reparam.monteclora import (MonteCLoRALinear, bartlett_wishart, dirichlet_kl, mvn_kl,
                                         wishart_kl)

peft = pytest.importorskip("peft")
from peft import LoraConfig, MontecloraConfig, get_peft_model  # noqa: E402
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


def perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.adapter_parameters("default"):
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def ours_and_peft(r=4, n=6, **kw):
    ours = mp.wrap(tiny_llama(), mp.MonteCLoRAConfig(r=r, alpha=8, target=TARGETS, num_samples=n, **kw))
    perturb(ours)
    mc = MontecloraConfig(num_samples=n, buffer_size=2, **kw)
    theirs = get_peft_model(tiny_llama(), LoraConfig(r=r, lora_alpha=8, target_modules=TARGETS, monteclora_config=mc))
    state = {"base_model.model." + k: v for k, v in ours.adapter_state_dict().items()}
    result = set_peft_model_state_dict(theirs, state)
    assert not result.unexpected_keys
    return ours, theirs


def peft_samplers(theirs):
    return {n.removeprefix("base_model.model.").removesuffix(".lora_monteclora_sampler.default"): m
            for n, m in theirs.named_modules() if n.endswith("lora_monteclora_sampler.default")}


def our_samplers(ours):
    return {n: layer.lora_monteclora_sampler["default"] for n, layer in ours.adapter_layers()}


def test_peft_tensor_names_and_parameter_count(input_ids):
    ours, theirs = ours_and_peft()
    theirs_keys = {k.removeprefix("base_model.model.") for k in get_peft_model_state_dict(theirs)
                   if not k.endswith(("gaussian_var_prior", "expert_weights"))}  # peft also saves its last draw
    assert set(ours.adapter_state_dict()) == theirs_keys
    r, n = 4, 6
    want = 0
    for _, layer in ours.adapter_layers():
        want += r * (layer.in_features + layer.out_features) + r + n  # METHODS.md: r(d_in + d_out) + r + N
    assert ours.trainable_summary()["trainable"] == want == theirs.get_nb_trainable_parameters()[0]


def test_eval_mode_is_lora_with_the_same_A_and_B(input_ids):
    ours, theirs = ours_and_peft()
    lora = mp.wrap(tiny_llama(), mp.LoRAConfig(r=4, alpha=8, target=TARGETS))
    with torch.no_grad():
        for (_, a), (_, b) in zip(lora.adapter_layers(), ours.adapter_layers()):
            a.lora_A["default"].weight.copy_(b.lora_A["default"].weight)
            a.lora_B["default"].weight.copy_(b.lora_B["default"].weight)
    got = logits(ours.eval(), input_ids)
    assert (got - logits(tiny_llama(), input_ids)).abs().max() > 1e-2
    assert torch.equal(got, logits(lora.eval(), input_ids))
    torch.testing.assert_close(got, logits(theirs.eval(), input_ids), atol=1e-5, rtol=0)
    mine, ref = ours.merge_and_unload().state_dict(), theirs.merge_and_unload().state_dict()
    for k in mine:
        torch.testing.assert_close(mine[k], ref[k], atol=1e-6, rtol=0, msg=k)


def test_kl_terms_equal_peft_for_the_same_parameters(input_ids):
    ours, theirs = ours_and_peft(dirichlet_prior=0.1, use_entropy=True, kl_loss_weight=1e-2)
    ours.train(), theirs.train()
    ours(input_ids=input_ids)  # one draw: KL_MVN and the entropy use the last Σ and π
    mine, ref = our_samplers(ours), peft_samplers(theirs)
    assert set(mine) == set(ref) and len(mine) == 6
    correction = 0.0
    for path, s in mine.items():
        t = ref[path]
        with torch.no_grad():  # peft's sampler keeps its last draw in two buffers: give it ours
            t.gaussian_var_prior = torch.diag(s.last_sigma)
            t.expert_weights = s.last_pi
        alpha = s.expert_weights_prior.exp()
        torch.testing.assert_close(wishart_kl(s.std_prior), t.wishart_kl(torch.diag(s.std_prior.exp())),
                                   atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(mvn_kl(s.last_sigma, 6), t.multivariate_kl(t.gaussian_var_prior),
                                   atol=1e-5, rtol=1e-6)
        # the Dirichlet KL: ours is the standard one (torch.distributions); peft's has + on Σ lnΓ(α_i)/Γ(α0_i)
        D = torch.distributions.Dirichlet
        ours_kl = dirichlet_kl(alpha, 0.1)
        torch.testing.assert_close(ours_kl, torch.distributions.kl_divergence(D(alpha), D(torch.full_like(alpha, .1))),
                                   atol=1e-5, rtol=1e-6)
        lg = (torch.lgamma(alpha) - torch.lgamma(torch.tensor(0.1))).sum()
        torch.testing.assert_close(t.dirichlet_kl(alpha), ours_kl + 2 * lg, atol=1e-4, rtol=1e-6)
        correction = correction + 1e-2 * 2 * lg
    total = ours.extra_loss()
    torch.testing.assert_close(total, theirs.base_model._get_monteclora_loss() - correction / len(mine),
                               atol=1e-5, rtol=1e-6)
    total.backward()  # the KL reaches both variational parameters
    assert all(s.std_prior.grad.abs().sum() > 0 and s.expert_weights_prior.grad.abs().sum() > 0
               for s in mine.values())


def test_before_any_draw_the_kl_uses_identity_and_uniform_weights():
    ours, theirs = ours_and_peft(use_entropy=True)
    ours.train(), theirs.train()
    mine, ref = our_samplers(ours), peft_samplers(theirs)
    for path, s in mine.items():
        alpha = s.expert_weights_prior.exp()
        peft_kl, peft_entropy = ref[path].get_variational_loss()
        lg = (torch.lgamma(alpha) - torch.lgamma(torch.tensor(0.1))).sum()
        torch.testing.assert_close(s.variational_loss(), peft_kl - 1e-5 * 2 * lg + peft_entropy, atol=1e-6, rtol=1e-6)
    assert ours.eval().extra_loss() is None  # eval: no KL term


def test_training_mode_tends_to_lora_as_the_noise_scale_goes_to_zero(input_ids):
    diffs = []
    for scaler in (1e-2, 1e-4, 1e-6):
        torch.manual_seed(0)
        model = mp.wrap(tiny_llama(), mp.MonteCLoRAConfig(r=4, alpha=8, target=TARGETS, sample_scaler=scaler))
        perturb(model)
        want = logits(model.eval(), input_ids)
        torch.manual_seed(1)
        diffs.append((logits(model.train(), input_ids) - want).abs().max().item())
    assert diffs[0] > 1e-4 and diffs[2] < 1e-5
    assert diffs[0] / diffs[1] > 30 and diffs[1] / diffs[2] > 30  # linear in the scale (100× per step)


def test_forward_never_writes_the_noise_into_A(input_ids):
    model = mp.wrap(tiny_llama(), mp.MonteCLoRAConfig(r=4, target=TARGETS, sample_scaler=0.1)).train()
    perturb(model)
    before = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    out = model(input_ids=input_ids, labels=input_ids)
    (out.loss + model.extra_loss()).backward()
    assert all(torch.equal(before[k], v) for k, v in model.adapter_state_dict().items())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in model.adapter_parameters("default"))


def one_layer(d_in=64, d_out=5, r=4, n=8, scaler=0.1, seed=0):
    torch.manual_seed(seed)
    layer = MonteCLoRALinear(nn.Linear(d_in, d_out), "layer")
    layer.add_adapter("default", mp.MonteCLoRAConfig(r=r, alpha=r, num_samples=n, sample_scaler=scaler))
    layer.active_adapter = "default"
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    return layer


def test_sampled_noise_has_the_stated_covariance():
    """Given Σ and π, each row of Aᵀ_eff − Aᵀ is N(0, c²‖π‖²Σ): whitened, the draws are i.i.d. N(0, 1)."""
    layer = one_layer().train()
    sampler, A = layer.lora_monteclora_sampler["default"], layer.lora_A["default"].weight.detach()
    torch.manual_seed(0)
    white = []
    with torch.no_grad():
        for _ in range(400):
            E = (sampler(A) - A).T  # (d_in, r)
            white.append(E / (0.1 * sampler.last_pi.norm() * sampler.last_sigma.sqrt()))
    W = torch.cat(white)  # (400·d_in, r)
    cov = W.T @ W / len(W)
    assert W.mean().abs() < 0.02
    torch.testing.assert_close(cov, torch.eye(4), atol=0.03, rtol=0)
    # and Σ itself: diag(S Z_W Sᵀ) with E[Z_W] = r·I, so E[Σ_ii] = r·exp(2·std_prior_i) (the clip never bites here)
    sig = []
    with torch.no_grad():
        for _ in range(4000):
            sampler(A)
            sig.append(sampler.last_sigma)
    sig = torch.stack(sig)
    torch.testing.assert_close(sig.mean(0) / (4 * torch.exp(2 * sampler.std_prior.detach())), torch.ones(4),
                               atol=0.08, rtol=0)


def test_training_outputs_are_unbiased_estimates_of_the_lora_output():
    layer = one_layer(scaler=0.3)
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = layer.eval()(x)
        layer.train()
        torch.manual_seed(0)
        draws = torch.stack([layer(x) for _ in range(3000)])
    spread = draws.std(0)
    assert spread.min() > 0.05  # the noise is visible ...
    assert ((draws.mean(0) - want).abs() < 4 * spread / 3000 ** 0.5).all()  # ... and averages out


@pytest.mark.filterwarnings("ignore:Singular sample")
def test_bartlett_wishart_moments():
    """Wishart(ν, I_r): E[Z] = ν I and Var(Z_ij) = ν (1 + δ_ij) (and torch's sampler agrees)."""
    torch.manual_seed(0)
    r, nu, n = 4, 4, 20000
    Z = torch.stack([bartlett_wishart(r, nu) for _ in range(n)])
    torch.testing.assert_close(Z.mean(0), nu * torch.eye(r), atol=0.1, rtol=0)
    torch.testing.assert_close(Z.var(0), nu * (1 + torch.eye(r)), atol=0.4, rtol=0)
    ref = torch.distributions.Wishart(df=torch.tensor(float(nu)), covariance_matrix=torch.eye(r)).sample((n,))
    torch.testing.assert_close(Z.var(0), ref.var(0), atol=0.5, rtol=0)
    assert torch.allclose(Z, Z.transpose(1, 2)) and (torch.linalg.eigvalsh(Z) > -1e-4).all()  # PSD


def test_kl_loss_reaches_the_trainer(input_ids):
    model = mp.wrap(tiny_llama(), mp.MonteCLoRAConfig(r=4, target=TARGETS, kl_loss_weight=1.0))
    model.train()
    model(input_ids=input_ids)
    assert model.extra_loss() is not None and model.extra_loss() > 0
    with pytest.raises(ValueError, match="kl_loss_weight"):
        mp.MonteCLoRAConfig(kl_loss_weight=-1)


def test_wrapping_an_eval_model_gives_eval_layers(input_ids):
    """The spine gives each new layer its module's mode: wrapping an eval model must not start sampling."""
    model = mp.wrap(tiny_llama(), mp.MonteCLoRAConfig(r=4, target=TARGETS, sample_scaler=0.1))
    perturb(model)
    assert not any(layer.training for _, layer in model.adapter_layers())
    assert torch.equal(logits(model, input_ids), logits(model, input_ids))
