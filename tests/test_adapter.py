"""Houlsby bottleneck adapter: near-identity bound, parameter formula, save/load, several adapters."""
import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)

import minipeft as mp
from minipeft.additive import AdapterConfig, BottleneckAdapter, adapter_macs_per_token


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
