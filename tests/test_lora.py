"""LoRA against references nobody here wrote: HF peft (same adapter weights in, same logits and merged
weights out) and torch autograd (the hand-derived gradients). Plus LoRA's own properties."""
import math

import pytest
import torch
from conftest import BUILDERS, tiny_llama
from torch import nn

import minipeft as mp
from minipeft.reparam.lora import LoRALinear

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402

PREFIX = "base_model.model."


def randomize_adapters(model, seed=0):
    """Give every adapter tensor (B included, so the update is not zero) random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.adapter_layers():
            for name in layer.adapter_names():
                for p in layer.adapter_parameters(name):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def as_peft_state(ours, adapter_name=None):
    return {PREFIX + k: v for k, v in ours.adapter_state_dict(adapter_name).items()}


def peft_twin(ours, arch, **lora_kwargs):
    """A peft model on a fresh copy of the same base, holding our adapter's tensors."""
    theirs = get_peft_model(BUILDERS[arch](), LoraConfig(**lora_kwargs)).eval()
    state = as_peft_state(ours)
    # our saved keys are peft's adapter keys without the "base_model.model." prefix
    assert set(state) == set(get_peft_model_state_dict(theirs))
    result = set_peft_model_state_dict(theirs, state)
    assert not result.unexpected_keys
    return theirs


RANKS, ALPHAS = {"down_proj": 6, r"layers\.0\.self_attn\.q_proj": 2}, {"v_proj": 3}  # per-module r and alpha
CASES = {  # arch, our config, peft's config
    "llama-qv": ("llama", dict(r=4, alpha=8, target=["q_proj", "v_proj"]),
                 dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama-all": ("llama", dict(r=4, alpha=16, target="all-linear"),
                  dict(r=4, lora_alpha=16, target_modules="all-linear")),
    "gpt2-conv1d": ("gpt2", dict(r=4, alpha=8, target=["c_attn", "c_proj", "c_fc"]),
                    dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    "bert-cls": ("bert", dict(r=2, alpha=4, target=["query", "value"], modules_to_save=["classifier"]),
                 dict(r=2, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS")),
    "llama-patterns": ("llama", dict(r=4, alpha=8, target="all-linear", rank_pattern=RANKS, alpha_pattern=ALPHAS),
                       dict(r=4, lora_alpha=8, target_modules="all-linear", rank_pattern=RANKS,
                            alpha_pattern=ALPHAS)),
    "bert-all": ("bert", dict(r=2, alpha=4, target="all-linear", modules_to_save=["classifier"]),
                 dict(r=2, lora_alpha=4, target_modules="all-linear", task_type="SEQ_CLS")),
    "llama-rslora": ("llama", dict(r=16, alpha=8, rslora=True, target=["q_proj", "down_proj"]),
                     dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "down_proj"])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_weights_same_logits_as_peft(case, input_ids):
    arch, ours_kw, peft_kw = CASES[case]
    ours = mp.wrap(BUILDERS[arch](), mp.LoRAConfig(**ours_kw)).eval()
    randomize_adapters(ours)
    theirs = peft_twin(ours, arch, **peft_kw)
    assert sorted(theirs.targeted_module_names) == sorted(n for n, m in ours.adapter_layers()
                                                          if isinstance(m, LoRALinear))
    for name, layer in ours.adapter_layers():
        if isinstance(layer, LoRALinear):
            assert layer.scaling["default"] == pytest.approx(theirs.get_submodule(PREFIX + name).scaling["default"])
    base = logits(BUILDERS[arch](), input_ids)
    got, want = logits(ours, input_ids), logits(theirs, input_ids)
    assert (got - base).abs().max() > 1e-3  # the adapters do change the output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert ours.trainable_summary()["trainable"] == theirs.get_nb_trainable_parameters()[0]

    # merged weights equal peft's merged weights, in the plain base model
    mine, ref = ours.merge_and_unload().state_dict(), theirs.merge_and_unload().state_dict()
    assert set(mine) == set(ref)
    for k in mine:
        torch.testing.assert_close(mine[k], ref[k], atol=1e-6, rtol=0, msg=k)


def test_rslora_scaling_is_alpha_over_sqrt_r():
    cfg = mp.LoRAConfig(r=16, alpha=8, rslora=True)
    assert cfg.scaling == 8 / 4
    assert mp.LoRAConfig(r=16, alpha=8).scaling == 8 / 16


def test_dropout_active_in_train_and_off_in_eval(input_ids):
    kw = dict(r=4, alpha=8, dropout=0.5, target=["q_proj", "v_proj"])
    ours = mp.wrap(tiny_llama(), mp.LoRAConfig(**kw)).eval()
    randomize_adapters(ours)
    theirs = peft_twin(ours, "llama", r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj"])
    torch.testing.assert_close(logits(ours, input_ids), logits(theirs, input_ids), atol=1e-5, rtol=0)
    ours.train()
    torch.manual_seed(0)
    assert not torch.equal(logits(ours, input_ids), logits(ours, input_ids))  # two dropout masks


def test_init_zero_B_and_A_distribution():
    layer = LoRALinear(nn.Linear(400, 300))
    layer.add_adapter("k", mp.LoRAConfig(r=64))
    layer.add_adapter("g", mp.LoRAConfig(r=64, init="gaussian"))
    for name in ("k", "g"):
        assert torch.count_nonzero(layer.lora_B[name].weight) == 0
    A = layer.lora_A["k"].weight  # kaiming_uniform(a=√5): U(-1/√d_in, 1/√d_in)
    bound = 1 / math.sqrt(400)
    assert A.abs().max() <= bound and A.abs().max() > 0.99 * bound
    assert layer.lora_A["g"].weight.std().item() == pytest.approx(1 / 64, rel=0.02)  # N(0, 1/r²)


@pytest.mark.parametrize("conv1d", [False, True])
def test_gradients_match_autograd(conv1d):
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    d_in, d_out, r, alpha = 6, 5, 3, 7.0
    base = Conv1D(d_out, d_in) if conv1d else nn.Linear(d_in, d_out)
    nn.init.normal_(base.weight)
    layer = LoRALinear(base)
    layer.add_adapter("default", mp.LoRAConfig(r=r, alpha=alpha))
    layer.active_adapter = "default"
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x, g_y = torch.randn(2, 4, d_in), torch.randn(2, 4, d_out)
    (layer(x) * g_y).sum().backward()  # dL/dy = g_y

    s = alpha / r
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    g_dW = g_y.reshape(-1, d_out).T @ x.reshape(-1, d_in)  # Σ_tokens g_y xᵀ, (d_out, d_in)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, s * g_dW @ A.T)
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, s * B.T @ g_dW)
    assert base.weight.grad is None  # frozen


def test_loraplus_param_groups_match_peft():
    from peft.optimizers import create_loraplus_optimizer
    arch, ours_kw, peft_kw = CASES["bert-cls"]
    ours = mp.wrap(BUILDERS[arch](), mp.LoRAConfig(**ours_kw))
    theirs = get_peft_model(BUILDERS[arch](), LoraConfig(**peft_kw))
    groups = mp.loraplus_param_groups(ours, lr=1e-3, ratio=16)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    a = [p for n, p in ours.named_parameters() if ".lora_A." in n]
    b = [p for n, p in ours.named_parameters() if ".lora_B." in n]
    assert a and b and {lr_of[id(p)] for p in a} == {1e-3} and {lr_of[id(p)] for p in b} == {16e-3}
    assert len(lr_of) == sum(p.requires_grad for p in ours.parameters())

    opt = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    peft_lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    # same learning rate per parameter, matched by name ("classifier.copies.default" ~ "modules_to_save.default")
    ours_by_name = {n.removeprefix("base_model.").replace(".copies.default", "").replace(".default", ""): lr_of[id(p)]
                    for n, p in ours.named_parameters() if p.requires_grad}
    peft_by_name = {n.removeprefix(PREFIX).replace(".modules_to_save.default", "").replace(".default", ""):
                    peft_lr[id(p)] for n, p in theirs.named_parameters() if p.requires_grad}
    assert ours_by_name.keys() == peft_by_name.keys()
    for n in ours_by_name:
        assert ours_by_name[n] == pytest.approx(peft_by_name[n]), n


def test_loraplus_bad_input():
    with pytest.raises(ValueError, match="ratio"):
        mp.loraplus_param_groups(mp.wrap(tiny_llama(), mp.LoRAConfig()), lr=1e-3, ratio=0)
    with pytest.raises(ValueError, match="no trainable LoRA parameters"):
        mp.loraplus_param_groups(tiny_llama().requires_grad_(False), lr=1e-3)


@pytest.mark.parametrize("kwargs, field", [
    (dict(r=0), "r"), (dict(r=-2), "r"), (dict(r=2.5), "r"), (dict(alpha=-1), "alpha"), (dict(alpha=0), "alpha"),
    (dict(dropout=1.0), "dropout"), (dict(dropout=-0.1), "dropout"), (dict(init="xavier"), "init"),
    (dict(target=[]), "target"), (dict(target=3), "target"),
])
def test_invalid_config_values(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field} must"):
        mp.LoRAConfig(**kwargs)


def test_parameter_count_is_r_times_din_plus_dout():
    r = 3
    model = mp.wrap(BUILDERS["gpt2"](), mp.LoRAConfig(r=r, target="all-linear"))
    base = BUILDERS["gpt2"]()
    expected = 0
    for name, _ in model.adapter_layers():  # shapes from the untouched base modules (Conv1D: (d_in, d_out))
        d_in, d_out = base.get_submodule(name).weight.shape
        expected += r * (d_in + d_out)
    assert model.trainable_summary()["trainable"] == expected
    assert model.trainable_summary()["total"] == sum(p.numel() for p in base.parameters()) + expected


def test_lora_on_an_embedding_matches_peft(input_ids):
    ours = mp.wrap(tiny_llama(), mp.LoRAConfig(r=4, alpha=8, target=["embed_tokens", "q_proj"])).eval()
    randomize_adapters(ours)
    theirs = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]))
    emb = ours.base_model.model.embed_tokens
    assert isinstance(emb, mp.reparam.LoRAEmbedding)
    state = {}
    for k, v in as_peft_state(ours).items():  # peft names an embedding's A and B lora_embedding_A/B
        if ".embed_tokens." in k:
            k = k.replace("lora_A.weight", "lora_embedding_A.default")
            k = k.replace("lora_B.weight", "lora_embedding_B.default")
        state[k] = v
    assert not set_peft_model_state_dict(theirs, state).unexpected_keys
    got, want = logits(ours, input_ids), logits(theirs.eval(), input_ids)
    assert (got - logits(tiny_llama(), input_ids)).abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    mine, ref = ours.merge_and_unload().state_dict(), theirs.merge_and_unload().state_dict()
    key = "model.embed_tokens.weight"
    torch.testing.assert_close(mine[key], ref[key], atol=1e-6, rtol=0)
