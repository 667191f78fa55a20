"""(IA)³ against references nobody here wrote: peft's IA3Config given the same (random, not all-ones) vectors
(logits on Llama, GPT-2 Conv1D and BERT; merged weights, biases included), the dense formulas l ⊙ (W0x + b) and
W0 (l ⊙ x) + b on the base layer itself, and the parameter formula Σ d_out (k, v targets) + Σ d_in (feedforward)."""
import peft
import pytest
import torch
from conftest import BUILDERS, tiny_bert, tiny_llama, train_losses
from torch import nn

import minipeft as mp
from minipeft.additive import IA3Layer, ia3_vectors
from minipeft.quant import Linear4bit
from minipeft.weights import base_weight, linear_dims

# architecture: (our target, our feedforward, peft's target_modules, peft's feedforward_modules)
SETUPS = {
    "llama": (None, None, ["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (None, None, ["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bert": (None, None, ["key", "value", "output.dense"], ["output.dense"]),
}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomise(model, seed=0):
    """Give every vector random entries around 1 (all-ones would hide a wrong axis or a wrong side)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.adapter_parameters("default"):
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))


def peft_twin(arch, model):
    """peft's (IA)³ on a fresh copy of the same base, with our vectors copied in (peft keeps (d_out, 1) for an
    output-scaled layer and (1, d_in) for a feedforward one)."""
    _, _, target, ff = SETUPS[arch]
    twin = peft.get_peft_model(BUILDERS[arch](), peft.IA3Config(target_modules=target, feedforward_modules=ff))
    ours = ia3_vectors(model)
    theirs = {n: m for n, m in twin.base_model.model.named_modules() if isinstance(m, peft.tuners.ia3.IA3Layer)}
    assert set(theirs) == set(ours)
    with torch.no_grad():
        for path, (lvec, ff_ours) in ours.items():
            assert theirs[path].is_feedforward == ff_ours, path
            p = theirs[path].ia3_l["default"]
            assert p.numel() == lvec.numel()
            p.copy_(lvec.reshape(p.shape))
    return twin.eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_logits_match_peft_with_the_same_vectors(arch, input_ids):
    target, ff, *_ = SETUPS[arch]
    model = mp.wrap(BUILDERS[arch](), mp.IA3Config(target=target, feedforward=ff)).eval()
    randomise(model)
    twin = peft_twin(arch, model)
    ours, want = logits(model, input_ids), logits(twin, input_ids)
    plain = logits(BUILDERS[arch](), input_ids)
    assert (want - plain).abs().max() > 0.01 * plain.abs().max()  # the vectors do something
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_merged_weights_and_biases_match_peft(arch, input_ids):
    model = mp.wrap(BUILDERS[arch](), mp.IA3Config()).eval()
    randomise(model, seed=1)
    twin = peft_twin(arch, model)
    want = logits(model, input_ids)
    merged_theirs = twin.merge_and_unload()
    model.merge()
    torch.testing.assert_close(logits(model, input_ids), want, atol=1e-5, rtol=1e-5)
    theirs = dict(merged_theirs.named_modules())
    checked_bias = {True: 0, False: 0}
    for path, layer in model.adapter_layers():
        W, ref = base_weight(layer.base_layer), base_weight(theirs[path])
        torch.testing.assert_close(W, ref, atol=1e-6, rtol=1e-6)
        if layer.base_layer.bias is not None:
            torch.testing.assert_close(layer.base_layer.bias, theirs[path].bias, atol=1e-6, rtol=1e-6)
            checked_bias[layer.is_feedforward["default"]] += 1
    if arch != "llama":  # GPT-2 and BERT have biases on both kinds of target
        assert checked_bias[True] and checked_bias[False]


def test_merge_scales_rows_and_bias_or_columns_only():
    """Output scaling: W = diag(l) W0, b = l ⊙ b0; input scaling: W = W0 diag(l), b = b0 (torch.diag as reference)."""
    torch.manual_seed(0)
    for ff in (False, True):
        base = nn.Linear(6, 4)
        W0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
        layer = IA3Layer(base, "mlp.down_proj")
        layer.add_adapter("default", mp.IA3Config(feedforward=["down_proj"] if ff else []))
        layer.active_adapter = "default"
        lvec = layer.ia3_l["default"]
        assert lvec.shape == ((6,) if ff else (4,))
        with torch.no_grad():
            lvec.copy_(1 + 0.5 * torch.randn(lvec.shape))
        x = torch.randn(3, 6)
        y = layer(x)
        ref = base(lvec * x) if ff else lvec * base(x)
        torch.testing.assert_close(y, ref)
        layer.merge("default")
        if ff:
            torch.testing.assert_close(base.weight, W0 @ torch.diag(lvec), atol=1e-6, rtol=0)
            assert torch.equal(base.bias, b0)
        else:
            torch.testing.assert_close(base.weight, torch.diag(lvec) @ W0, atol=1e-6, rtol=0)
            torch.testing.assert_close(base.bias, lvec * b0, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=0)
        layer.unmerge()
        assert torch.equal(base.weight, W0) and torch.equal(base.bias, b0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_parameter_count_is_sum_of_d_out_plus_sum_of_d_in_of_feedforward(arch):
    base = BUILDERS[arch]()
    model = mp.wrap(base, mp.IA3Config())
    ff_suffix = SETUPS[arch][3][0]
    want = 0
    for path, layer in model.adapter_layers():
        d_in, d_out = linear_dims(layer.base_layer)
        want += d_in if (path == ff_suffix or path.endswith("." + ff_suffix)) else d_out
    assert model.trainable_summary()["trainable"] == want
    twin = peft.get_peft_model(BUILDERS[arch](), peft.IA3Config(target_modules=SETUPS[arch][2],
                                                                 feedforward_modules=SETUPS[arch][3]))
    assert twin.get_nb_trainable_parameters()[0] == want


def test_llama_count_per_block_is_2_d_kv_plus_d_ff():
    base = tiny_llama()
    cfg = base.config
    d_kv = cfg.hidden_size // cfg.num_attention_heads * cfg.num_key_value_heads
    model = mp.wrap(base, mp.IA3Config())
    assert model.trainable_summary()["trainable"] == cfg.num_hidden_layers * (2 * d_kv + cfg.intermediate_size)


def test_starts_exactly_at_the_base_and_learns(input_ids):
    model = mp.wrap(tiny_llama(), mp.IA3Config())
    assert all(torch.equal(lv, torch.ones_like(lv)) for lv, _ in ia3_vectors(model).values())
    assert torch.equal(logits(model, input_ids), logits(tiny_llama(), input_ids))
    losses = train_losses(model, input_ids, steps=30, lr=5e-2, weight_decay=0.0)
    assert losses[-1] < losses[0] - 0.05, losses
    assert any(not torch.equal(lv, torch.ones_like(lv)) for lv, _ in ia3_vectors(model).values())


def test_gradient_matches_autograd_of_the_dense_formula():
    """∂L/∂l for output scaling is Σ_tokens (W0x + b) ⊙ g; for input scaling Σ_tokens x ⊙ (W0ᵀ g)."""
    torch.manual_seed(0)
    for ff in (False, True):
        base = nn.Linear(5, 7)
        layer = IA3Layer(base, "fc")
        layer.add_adapter("default", mp.IA3Config(feedforward=["fc"] if ff else []))
        layer.active_adapter = "default"
        x, g = torch.randn(2, 3, 5), torch.randn(2, 3, 7)
        (layer(x) * g).sum().backward()
        want = (x * (g @ base.weight)).sum((0, 1)) if ff else (base(x) * g).sum((0, 1))
        torch.testing.assert_close(layer.ia3_l["default"].grad, want.detach(), atol=1e-5, rtol=1e-5)


def test_feedforward_is_per_adapter(input_ids):
    model = mp.wrap(tiny_llama(), mp.IA3Config(target=["v_proj", "down_proj"], feedforward=["down_proj"]))
    model.add_adapter("out", mp.IA3Config(target=["v_proj", "down_proj"], feedforward=[]))
    layer = model.base_model.get_submodule("model.layers.0.mlp.down_proj")
    assert layer.is_feedforward == {"default": True, "out": False}
    d_in, d_out = linear_dims(layer.base_layer)
    assert layer.ia3_l["default"].shape == (d_in,) and layer.ia3_l["out"].shape == (d_out,)


def test_a_4bit_base_works_and_merges_approximately(input_ids):
    base = tiny_llama()
    for name in ("k_proj", "down_proj"):
        for i in range(2):
            parent = base.model.layers[i].self_attn if name == "k_proj" else base.model.layers[i].mlp
            setattr(parent, name, Linear4bit.from_linear(getattr(parent, name), torch.float32))
    model = mp.wrap(base, mp.IA3Config(target=["k_proj", "down_proj"])).eval()
    randomise(model)
    want = logits(model, input_ids)
    model.merge()
    err = (logits(model, input_ids) - want).abs().max()
    assert err < 0.1 * want.abs().max(), err  # re-quantized: close, not exact
    model.unmerge()
    assert torch.equal(logits(model, input_ids), want)


def test_bad_feedforward_values_raise_naming_the_field():
    with pytest.raises(ValueError, match="feedforward"):
        mp.IA3Config(feedforward=3)
    with pytest.raises(ValueError, match="feedforward"):
        mp.IA3Config(feedforward="(")
    with pytest.raises(ValueError, match="feedforward.*not .*targets.*down_proj"):
        mp.wrap(tiny_llama(), mp.IA3Config(target=["k_proj", "v_proj"], feedforward=["down_proj"]))
    with pytest.raises(ValueError, match="feedforward.*matched no module"):
        mp.wrap(tiny_llama(), mp.IA3Config(feedforward=["fc2"]))


def test_unknown_architecture_needs_targets_and_feedforward():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="no default target"):
        mp.wrap(net, mp.IA3Config())
    with pytest.raises(ValueError, match="feedforward"):
        mp.wrap(net, mp.IA3Config(target=["0", "2"]))
    model = mp.wrap(net, mp.IA3Config(target=["0", "2"], feedforward=["2"]))
    assert model.trainable_summary()["trainable"] == 8 + 8


def test_default_bert_also_scales_the_attention_output_input_as_peft():
    model = mp.wrap(tiny_bert(), mp.IA3Config())
    flags = {p.split("encoder.layer.0.", 1)[-1]: ff for p, (_, ff) in ia3_vectors(model).items() if ".0." in p}
    assert flags == {"attention.self.key": False, "attention.self.value": False,
                     "attention.output.dense": True, "output.dense": True}
