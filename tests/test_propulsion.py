"""Propulsion against references nobody here wrote: the dense formula y = (W0x + b) ⊙ z^k on the base layer's own
output, the merged weight diag(z^k)·W0 built with torch.diag, and autograd against the analytic gradient
∂L/∂z = k·z^(k−1) ⊙ Σ_tokens (W0x + b) ⊙ g."""
import pytest
import torch
from conftest import BUILDERS, tiny_llama, train_losses
from torch import nn

import minipeft as mp
from minipeft.reparam import PropulsionLayer, propulsion_scales
from minipeft.weights import base_weight


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.adapter_parameters("default"):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_identity_at_init_is_exact(arch, input_ids):
    model = mp.wrap(BUILDERS[arch](), mp.PropulsionConfig(k=15))
    assert all(torch.equal(lay.propulsion["default"], torch.ones_like(lay.propulsion["default"]))
               for _, lay in model.adapter_layers())
    assert torch.equal(logits(model, input_ids), logits(BUILDERS[arch](), input_ids))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_is_diag_z_k_times_w0_and_exact(arch, input_ids):
    targets = {"llama": ["q_proj", "down_proj", "embed_tokens"], "gpt2": ["c_attn", "c_proj", "wpe"]}[arch]
    base = BUILDERS[arch]()
    before = {n: (base_weight(m).detach().clone(), getattr(m, "bias", None))
              for n, m in base.named_modules() if n.rsplit(".", 1)[-1] in targets}
    before = {n: (W, None if b is None else b.detach().clone()) for n, (W, b) in before.items()}
    model = mp.wrap(base, mp.PropulsionConfig(k=5, target=targets))
    perturb(model)
    want = logits(model, input_ids)
    scales = propulsion_scales(model)
    model.merge()
    worst = (logits(model, input_ids) - want).abs().max().item()
    assert worst < 1e-5, worst
    for path, (W0, b0) in before.items():
        layer = model.base_model.get_submodule(path)
        p = scales[path]
        W = base_weight(layer.base_layer)
        if isinstance(layer.base_layer, nn.Embedding):
            torch.testing.assert_close(W, W0 @ torch.diag(p), atol=1e-6, rtol=0)  # each dimension scaled
        else:
            torch.testing.assert_close(W, torch.diag(p) @ W0, atol=1e-6, rtol=0)  # each output (row) scaled
        if b0 is not None:
            torch.testing.assert_close(layer.base_layer.bias, p * b0, atol=1e-6, rtol=0)


def test_an_embedding_tied_to_the_head_trains_but_refuses_to_merge(input_ids):
    model = mp.wrap(BUILDERS["gpt2"](), mp.PropulsionConfig(target=["wte", "c_fc"]))  # GPT-2 ties wte and lm_head
    perturb(model)
    assert not torch.allclose(logits(model, input_ids), logits(BUILDERS["gpt2"](), input_ids))
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge()
    assert not any(layer.merged_adapters for _, layer in model.adapter_layers())  # nothing half-merged


@pytest.mark.parametrize("k", [1, 5, 15])
def test_gradient_of_z_is_k_z_k_minus_1_times_output_times_g(k):
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    layer = PropulsionLayer(base)
    layer.add_adapter("default", mp.PropulsionConfig(k=k))
    layer.active_adapter = "default"
    with torch.no_grad():
        layer.propulsion["default"].copy_(1 + 0.05 * torch.randn(10))
    x, g = torch.randn(3, 5, 12), torch.randn(3, 5, 10)
    y = layer(x)
    z = layer.propulsion["default"].detach()
    torch.testing.assert_close(y, base(x) * z**k)  # the dense formula
    y.backward(g)
    want = k * z ** (k - 1) * (base(x).detach() * g).sum(dim=(0, 1))
    torch.testing.assert_close(layer.propulsion["default"].grad, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_parameter_count_is_d_out_per_layer_and_dim_per_embedding(arch):
    base = BUILDERS[arch]()
    model = mp.wrap(base, mp.PropulsionConfig())
    want = sum(base_weight(lay.base_layer).shape[0] for _, lay in model.adapter_layers())
    assert model.trainable_summary()["trainable"] == want
    emb = {"llama": "embed_tokens", "gpt2": "wte", "bert": "word_embeddings"}[arch]
    model = mp.wrap(BUILDERS[arch](), mp.PropulsionConfig(target=[emb]))
    assert model.trainable_summary()["trainable"] == base.config.hidden_size


def test_it_learns_and_the_degree_speeds_up_the_scales(input_ids):
    moved, final = {}, {}
    for k in (1, 5):
        model = mp.wrap(tiny_llama(), mp.PropulsionConfig(k=k))
        losses = train_losses(model, input_ids, steps=20, lr=1e-2)
        assert losses[-1] < losses[0]
        final[k] = losses[-1]
        moved[k] = torch.cat(list(propulsion_scales(model).values())).sub(1).abs().mean().item()
    assert moved[5] > 3 * moved[1]  # Adam moves z by ~lr a step either way; z^5 moves ~5 times as far
    assert final[5] < final[1] - 0.05, final


def test_invalid_degree_names_the_field():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="k"):
            mp.PropulsionConfig(k=bad)
