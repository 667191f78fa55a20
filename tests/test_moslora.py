"""MoSLoRA against references nobody here wrote: with the mixer M = I it is LoRA, so HF peft's LoRA with the
same A and B must give the same logits and the same gradients of A and B (and so must minipeft's LoRA);
with any M, autograd on the dense formula W0 + s·BMA."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import BUILDERS
from torch import nn

import minipeft as mp
from minipeft.reparam import MoSLoRALinear

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict  # noqa: E402

CASES = {  # arch, targets, peft's fan_in_fan_out (GPT-2's Conv1D stores W transposed)
    "llama": ("llama", ["q_proj", "v_proj", "down_proj"], False),
    "gpt2-conv1d": ("gpt2", ["c_attn", "c_fc"], True),
}


def moslora_with_identity_mixer(arch, targets, seed=0):
    model = mp.wrap(BUILDERS[arch](), mp.MoSLoRAConfig(r=4, alpha=8, target=targets)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for path, layer in model.adapter_layers():
            layer.lora_B["default"].weight.normal_(std=0.2, generator=g)
            layer.lora_AB["default"].weight.copy_(torch.eye(4))
    return model


def lora_state(ours, prefix=""):
    """A and B of every MoSLoRA layer, named as LoRA's; the mixer (= I) is left out."""
    return {prefix + k: v for k, v in ours.adapter_state_dict().items() if ".lora_AB." not in k}


def loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n.replace(".default", ""): p.grad.clone() for n, p in model.named_parameters()
             if p.requires_grad and ".lora_AB." not in n}
    return model(input_ids=ids).logits.detach(), grads


def strip(name):
    """A parameter name without peft's / our wrapper prefixes, so the two models' names compare."""
    while name.startswith(("base_model.", "model.")):
        name = name.split(".", 1)[1]
    return name


@pytest.mark.parametrize("case", list(CASES))
def test_identity_mixer_is_lora_same_logits_and_grads_as_peft(case, input_ids):
    arch, targets, fifo = CASES[case]
    ours = moslora_with_identity_mixer(arch, targets)
    theirs = get_peft_model(BUILDERS[arch](), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                         fan_in_fan_out=fifo)).eval()
    state = lora_state(ours, prefix="base_model.model.")
    assert not set_peft_model_state_dict(theirs, state).unexpected_keys
    got, g_ours = loss_and_grads(ours, input_ids)
    want, g_theirs = loss_and_grads(theirs, input_ids)
    assert (got - BUILDERS[arch]()(input_ids=input_ids).logits).abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    g_ours = {strip(k): v for k, v in g_ours.items()}
    g_theirs = {strip(k): v for k, v in g_theirs.items()}
    assert set(g_ours) == set(g_theirs) and len(g_ours) == 2 * len(ours.adapter_layers())
    for k in g_ours:
        torch.testing.assert_close(g_ours[k], g_theirs[k], atol=1e-5, rtol=1e-4, msg=k)


def test_identity_mixer_is_minipeft_lora(input_ids):
    ours = moslora_with_identity_mixer("llama", "all-linear")
    lora = mp.wrap(BUILDERS["llama"](), mp.LoRAConfig(r=4, alpha=8, target="all-linear")).eval()
    twins = dict(lora.adapter_layers())
    with torch.no_grad():
        for path, layer in ours.adapter_layers():
            for attr in ("lora_A", "lora_B"):
                getattr(twins[path], attr)["default"].weight.copy_(getattr(layer, attr)["default"].weight)
    got, g_ours = loss_and_grads(ours, input_ids)
    want, g_lora = loss_and_grads(lora, input_ids)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert set(g_ours) == set(g_lora)
    for k in g_ours:
        torch.testing.assert_close(g_ours[k], g_lora[k], atol=1e-6, rtol=1e-5, msg=k)


def test_any_mixer_matches_autograd_on_the_dense_formula():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    layer = MoSLoRALinear(base)
    layer.add_adapter("default", mp.MoSLoRAConfig(r=3, alpha=6))
    layer.active_adapter = "default"
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x, g_y = torch.randn(5, 12), torch.randn(5, 10)
    layer(x).backward(g_y)
    A, M, B = (t.weight.detach().clone().requires_grad_() for t in
               (layer.lora_A["default"], layer.lora_AB["default"], layer.lora_B["default"]))
    W = base.weight + 2.0 * B @ M @ A  # s = alpha / r = 2
    torch.testing.assert_close(layer.delta_weight("default"), (W - base.weight).detach(), atol=1e-6, rtol=0)
    F.linear(x, W, base.bias).backward(g_y)
    for ours, ref in ((layer.lora_A["default"], A), (layer.lora_AB["default"], M), (layer.lora_B["default"], B)):
        torch.testing.assert_close(ours.weight.grad, ref.grad, atol=1e-5, rtol=1e-5)


def test_init_and_param_count():
    torch.manual_seed(0)
    model = mp.wrap(BUILDERS["llama"](), mp.MoSLoRAConfig(r=4, target="all-linear"))
    want = sum(4 * (layer.in_features + layer.out_features) + 4 * 4 for _, layer in model.adapter_layers())
    assert model.trainable_summary()["trainable"] == want
    layer = model.base_model.model.layers[0].mlp.down_proj
    M, B = layer.lora_AB["default"].weight, layer.lora_B["default"].weight
    assert M.shape == (4, 4) and torch.count_nonzero(B) == 0
    assert M.abs().max() <= 1 / math.sqrt(4)  # kaiming-uniform (a=√5) with fan-in r: U(±1/√r)
    assert not torch.allclose(M, torch.eye(4))  # a random mixer, not the identity
