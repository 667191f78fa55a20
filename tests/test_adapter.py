"""Houlsby bottleneck adapter: near-identity bound, parameter formula, save/load, several adapters."""
import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)

import minipeft as mp
from minipeft.additive import AdapterConfig, BottleneckAdapter, adapter_macs_per_token
from minipeft.config import config_from_dict


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


def bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64,
                                                    num_labels=3)).eval()


X = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
MODELS = [llama, gpt2, bert]


@pytest.mark.parametrize("make", MODELS)
def test_param_count_is_formula(make):
    m = 8
    model = mp.wrap(make(), AdapterConfig(bottleneck=m))
    layers = [layer for _, layer in model.adapter_layers()]
    assert len(layers) == 4  # two per block (attention output, FFN output), 2 blocks
    d = [layer.out_features for layer in layers]
    assert all(di == 32 for di in d)
    assert model.trainable_summary()["trainable"] == sum(2 * m * di + di + m for di in d)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adapter_down.default." in n or ".adapter_up.default." in n for n in trainable)
    assert adapter_macs_per_token(model)["adapter"] == sum(2 * m * di for di in d)


@pytest.mark.parametrize("make", MODELS)
def test_near_identity_bound(make):
    base = make()
    with torch.no_grad():
        expected = base(X).logits
    model = mp.wrap(base, AdapterConfig(bottleneck=8))
    sigma = model.peft_config["default"].init_std
    for _, layer in model.adapter_layers():
        W1, W2 = layer.adapter_down["default"].weight, layer.adapter_up["default"].weight
        assert W1.abs().max() <= 2 * sigma and W2.abs().max() <= 2 * sigma and W1.std() > sigma / 2
        # |W_up gelu(W_down h)|_∞ ≤ 2σ·‖gelu(W_down h)‖₁ ≤ 2σ·m·2σ‖h‖₁ (|gelu(z)| ≤ |z|, biases 0)
        y = torch.randn(5, 32)  # stands for h, the wrapped projection's output
        z = layer.act["default"](layer.adapter_down["default"](y))
        out = y + layer.adapter_up["default"](z)
        bound = 4 * sigma ** 2 * 8 * y.abs().sum(-1)
        assert ((out - y).abs().max(-1).values <= bound).all()
    with torch.no_grad():
        got = model(X).logits
    assert 0 < (got - expected).abs().max() < 1e-2 * expected.abs().max()
    with model.disable_adapter(), torch.no_grad():
        assert torch.equal(model(X).logits, expected)


def test_merge_raises_and_grads_flow():
    model = mp.wrap(gpt2(), AdapterConfig(bottleneck=4))
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge()
    model(X, labels=X).loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    layer = model.adapter_layers()[0][1]
    assert layer.adapter_down["default"].weight.grad.abs().sum() > 0


def test_save_load_bit_exact(tmp_path):
    model = mp.wrap(bert(), AdapterConfig(bottleneck=4, activation="relu"))
    with torch.no_grad():
        for _, p in model.adapter_parameters("default"):
            p.normal_()
        expected = model(X).logits
    model.save_adapter(tmp_path)
    loaded = mp.load_adapter(bert(), tmp_path)
    a, b = model.adapter_state_dict(), loaded.adapter_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(loaded(X).logits, expected)
    assert loaded.peft_config["default"].activation == "relu"


def test_two_adapters_switch_delete():
    base = llama()
    with torch.no_grad():
        plain = base(X).logits
    model = mp.wrap(base, AdapterConfig(bottleneck=4, init_std=0.1))
    model.add_adapter("big", AdapterConfig(bottleneck=16, init_std=0.1))
    assert model.active_adapter == "default"  # adding does not switch (as peft)
    model.set_adapter("big")
    with torch.no_grad():
        out_big = model(X).logits
        model.set_adapter("default")
        out_small = model(X).logits
    assert not torch.equal(out_big, out_small)
    assert model.trainable_summary()["trainable"] == 4 * (2 * 4 * 32 + 32 + 4)
    model.delete_adapter("default")
    with torch.no_grad():
        assert torch.equal(model(X).logits, out_big)
    model.delete_adapter("big")
    assert not model.adapter_layers()
    with torch.no_grad():
        assert torch.equal(model(X).logits, plain)


def test_layernorms_like_the_paper():
    model = mp.wrap(bert(), AdapterConfig(bottleneck=4, modules_to_save=["LayerNorm", "classifier"]))
    ln = 5 * 2 * 32  # embeddings + 2 per block, weight and bias
    head = 32 * 3 + 3
    assert model.trainable_summary()["trainable"] == 4 * (2 * 4 * 32 + 32 + 4) + ln + head


@pytest.mark.parametrize("kwargs", [dict(bottleneck=0), dict(bottleneck=-4), dict(bottleneck=2.5),
                                    dict(activation="swish2"), dict(init_std=0), dict(target=[])])
def test_invalid_configs(kwargs):
    with pytest.raises(ValueError):
        AdapterConfig(**kwargs)


def test_wraps_only_linear():
    with pytest.raises(ValueError):
        mp.wrap(bert(), AdapterConfig(target=["LayerNorm"]))
    assert isinstance(mp.wrap(gpt2(), AdapterConfig()).base_model.transformer.h[0].attn.c_proj, BottleneckAdapter)


# ---- He et al.'s design space: form (sequential / parallel), placement, scale, init ----------------------------
def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.adapter_parameters("default"):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _delta_ref(layer, u, s):
    """s·(W_up f(W_down u + b_down) + b_up) with plain tensor ops on copies of the layer's tensors."""
    Wd, bd = layer.adapter_down["default"].weight.detach(), layer.adapter_down["default"].bias.detach()
    Wu, bu = layer.adapter_up["default"].weight.detach(), layer.adapter_up["default"].bias.detach()
    return s * (torch.relu(u @ Wd.T + bd) @ Wu.T + bu)


# sublayer (in the plain model) -> where its input comes from, for the hand-made reference
SUBLAYERS = {"llama": (llama, ["self_attn", "mlp"]), "gpt2": (gpt2, ["attn", "mlp"])}


@pytest.mark.parametrize("arch", list(SUBLAYERS))
@pytest.mark.parametrize("placement", ["attention", "ffn", "both"])
def test_parallel_equation_against_hooks(arch, placement):
    """h ← sublayer(x) + s·Δ(x), checked by adding s·Δ(x) to the plain model's sublayer outputs (forward hooks)."""
    make, names = SUBLAYERS[arch]
    s = 4.0
    model = mp.wrap(make(), AdapterConfig(bottleneck=6, form="parallel", placement=placement, scale=s,
                                          activation="relu", init="lora"))
    _randomize(model)
    wanted = {"attention": names[:1], "ffn": names[1:], "both": names}[placement]
    layers = dict(model.adapter_layers())
    assert sorted({p.rsplit(".", 1)[-1] for p in layers}) == sorted(wanted)
    plain = make()
    for path, layer in layers.items():
        def hook(module, args, kwargs, out, layer=layer):
            x = args[0] if args else kwargs["hidden_states"]
            d = _delta_ref(layer, x, s)
            return (out[0] + d, *out[1:]) if isinstance(out, tuple) else out + d
        plain.get_submodule(path).register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        got, want = model(X).logits, plain(X).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(X).logits, make()(X).logits)


@pytest.mark.parametrize("placement", ["attention", "ffn", "both"])
def test_parallel_on_bert_adds_before_residual_and_layernorm(placement):
    """BERT: LayerNorm(dropout(dense(a)) + s·Δ(x) + x), x the sublayer's input (the output module's input_tensor)."""
    s = 2.0
    model = mp.wrap(bert(), AdapterConfig(bottleneck=6, form="parallel", placement=placement, scale=s,
                                          activation="relu"))
    _randomize(model, 1)
    layers = dict(model.adapter_layers())
    assert len(layers) == {"attention": 2, "ffn": 2, "both": 4}[placement]
    plain = bert()
    for path, layer in layers.items():
        seen = {}
        plain.get_submodule(path).register_forward_pre_hook(
            lambda mod, args, seen=seen: seen.update(x=args[1]))  # input_tensor: the sublayer's input
        plain.get_submodule(path + ".dropout").register_forward_hook(
            lambda mod, args, out, seen=seen, layer=layer: out + _delta_ref(layer, seen["x"], s))
    with torch.no_grad():
        got, want = model(X).logits, plain(X).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("make", MODELS)
def test_sequential_single_placement_and_scale(make):
    """Sequential form: h ← h + s·Δ(h) on the chosen sublayer's output projection only."""
    s = 3.0
    model = mp.wrap(make(), AdapterConfig(bottleneck=5, placement="ffn", scale=s, activation="relu"))
    _randomize(model, 2)
    plain = make()
    layers = dict(model.adapter_layers())
    assert len(layers) == 2 and all("attention" not in p and "attn" not in p for p in layers)
    for path, layer in layers.items():
        plain.get_submodule(path).register_forward_hook(lambda mod, args, out, layer=layer: out + _delta_ref(
            layer, out, s))
    with torch.no_grad():
        got, want = model(X).logits, plain(X).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_default_is_houlsby_and_old_configs_load():
    cfg = AdapterConfig()
    assert (cfg.form, cfg.placement, cfg.scale, cfg.init, cfg.activation) == ("sequential", "both", 1.0,
                                                                                "houlsby", "gelu")
    old = {"method": "adapter", "bottleneck": 8, "activation": "relu", "init_std": 0.01, "target": None,
           "exclude": None, "modules_to_save": None}  # an adapter_config.json written before these options
    assert config_from_dict(old) == AdapterConfig(bottleneck=8, activation="relu")
    model = mp.wrap(llama(), cfg)
    assert [p.rsplit(".", 1)[-1] for p, _ in model.adapter_layers()] == ["o_proj", "down_proj"] * 2


@pytest.mark.parametrize("make", MODELS)
def test_parallel_param_count_and_exact_start(make):
    m = 8
    base = make()
    with torch.no_grad():
        expected = base(X).logits
    model = mp.wrap(base, AdapterConfig.scaled_parallel(bottleneck=m, placement="both"))
    cfg = model.peft_config["default"]
    assert (cfg.form, cfg.scale, cfg.activation, cfg.init) == ("parallel", 4.0, "relu", "lora")
    layers = [layer for _, layer in model.adapter_layers()]
    assert len(layers) == 4 and all(layer.in_features == layer.out_features == 32 for layer in layers)
    assert model.trainable_summary()["trainable"] == 4 * (2 * m * 32 + 32 + m)
    for layer in layers:  # W_down kaiming-uniform: bound 1/sqrt(d) with a=√5; the rest zero
        Wd = layer.adapter_down["default"].weight
        assert 0 < Wd.abs().max() <= 32 ** -0.5 and Wd.std() > 0.3 * 32 ** -0.5
        assert not layer.adapter_up["default"].weight.any() and not layer.adapter_up["default"].bias.any()
        assert not layer.adapter_down["default"].bias.any()
    with torch.no_grad():
        assert torch.equal(model(X).logits, expected)
    assert adapter_macs_per_token(model)["adapter"] == 4 * 2 * m * 32
    assert adapter_macs_per_token(model)["base_linear"] == adapter_macs_per_token(
        mp.wrap(make(), AdapterConfig()))["base_linear"]


@pytest.mark.parametrize("make", [gpt2, bert])
def test_parallel_save_load_and_grads(make, tmp_path):
    model = mp.wrap(make(), AdapterConfig(bottleneck=4, form="parallel", scale=2.0, init="lora"))
    model.train()
    out = model(X, labels=X if make is gpt2 else torch.tensor([0, 2]))
    out.loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    assert any(layer.adapter_up["default"].weight.grad.abs().sum() > 0 for _, layer in model.adapter_layers())
    model.eval()
    _randomize(model, 3)
    with torch.no_grad():
        expected = model(X).logits
    model.save_adapter(tmp_path)
    loaded = mp.load_adapter(make(), tmp_path)
    assert loaded.peft_config["default"] == model.peft_config["default"]
    with torch.no_grad():
        assert torch.equal(loaded(X).logits, expected)


def test_parallel_with_identity_is_lora_as_peft():
    """A parallel adapter on one linear layer, f = identity, zero biases, s = α/r, is LoRA (He et al. §3)."""
    from peft import LoraConfig, get_peft_model
    r, alpha = 4, 8
    ours = mp.wrap(llama(), AdapterConfig(bottleneck=r, form="parallel", activation="identity", init="lora",
                                          scale=alpha / r, target=["q_proj", "v_proj"]))
    _randomize(ours, 4)
    ref = get_peft_model(llama(), LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"],
                                             lora_dropout=0.0))
    with torch.no_grad():
        for path, layer in ours.adapter_layers():
            layer.adapter_down["default"].bias.zero_()
            layer.adapter_up["default"].bias.zero_()
            peft_layer = ref.base_model.model.get_submodule(path)
            peft_layer.lora_A["default"].weight.copy_(layer.adapter_down["default"].weight)
            peft_layer.lora_B["default"].weight.copy_(layer.adapter_up["default"].weight)
        got, want = ours(X).logits, ref(X).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_parallel_cannot_nest_and_mixed_forms_coexist():
    model = mp.wrap(llama(), AdapterConfig())  # sequential on o_proj and down_proj
    with pytest.raises(ValueError, match="nested"):
        model.add_adapter("par", AdapterConfig(form="parallel", placement="ffn"))
    mixed = mp.wrap(llama(), AdapterConfig(placement="attention", init_std=0.1))
    mixed.add_adapter("par", AdapterConfig(form="parallel", placement="ffn", init_std=0.1))
    with torch.no_grad():
        a = mixed(X).logits
        mixed.set_adapter("par")
        b = mixed(X).logits
    assert not torch.equal(a, b)


@pytest.mark.parametrize("kwargs, field", [(dict(form="serial"), "form"), (dict(placement="mlp"), "placement"),
                                           (dict(scale=0), "scale"), (dict(scale=float("inf")), "scale"),
                                           (dict(init="xavier"), "init")])
def test_invalid_design_options(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AdapterConfig(**kwargs)


def test_parallel_needs_a_module_with_linear_layers():
    with pytest.raises(ValueError, match="cannot wrap"):
        mp.wrap(llama(), AdapterConfig(form="parallel", target=["input_layernorm"]))
