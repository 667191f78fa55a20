"""LoRA-FA against references nobody here wrote: autograd on LoRA with A frozen (same logits, same gradient of
B), HF peft's LoRA reading a LoRA-FA adapter (same tensor names, same logits), and what autograd itself
saves for the backward pass (torch.autograd.graph.saved_tensors_hooks)."""
import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from torch import nn

import minipeft as mp
from minipeft.reparam import LoRAFALinear, saved_activation_bytes


def perturb_B(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.adapter_parameters("default"):
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def test_A_is_a_frozen_buffer_and_only_B_trains(llama):
    model = mp.wrap(llama, mp.LoRAFAConfig(r=4, target="all-linear"))
    layer = model.base_model.model.layers[0].mlp.up_proj
    assert isinstance(layer, LoRAFALinear)
    assert "weight" in dict(layer.lora_A["default"].named_buffers())
    assert not list(layer.lora_A["default"].parameters())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_B." in n for n in trainable)
    # r·d_out per adapted layer (METHODS.md)
    want = sum(4 * layer.out_features for _, layer in model.adapter_layers())
    assert model.trainable_summary()["trainable"] == want


def test_same_logits_and_B_gradient_as_lora_with_A_frozen(input_ids):
    fa = mp.wrap(tiny_llama(), mp.LoRAFAConfig(r=4, alpha=8, target="all-linear"))
    lora = mp.wrap(tiny_llama(), mp.LoRAConfig(r=4, alpha=8, target="all-linear"))
    perturb_B(fa)
    with torch.no_grad():  # same A and B in plain LoRA, then freeze its A by hand
        for (path, mine), (_, ref) in zip(fa.adapter_layers(), lora.adapter_layers()):
            ref.lora_A["default"].weight.copy_(mine.lora_A["default"].weight)
            ref.lora_B["default"].weight.copy_(mine.lora_B["default"].weight)
            ref.lora_A["default"].weight.requires_grad_(False)
    for model in (fa, lora):
        model.train()
        model(input_ids=input_ids, labels=input_ids).loss.backward()
    got, want = fa(input_ids=input_ids).logits, lora(input_ids=input_ids).logits
    assert torch.equal(got, want)
    for (path, mine), (_, ref) in zip(fa.adapter_layers(), lora.adapter_layers()):
        assert ref.lora_A["default"].weight.grad is None
        torch.testing.assert_close(mine.lora_B["default"].weight.grad, ref.lora_B["default"].weight.grad,
                                   atol=0, rtol=0, msg=path)


def test_B_gradient_is_s_gy_times_Ax():
    torch.manual_seed(0)
    layer = LoRAFALinear(nn.Linear(12, 10))
    layer.add_adapter("default", mp.LoRAFAConfig(r=3, alpha=6))
    layer.active_adapter = "default"
    x, g_y = torch.randn(5, 12), torch.randn(5, 10)
    layer(x).backward(g_y)
    A = layer.lora_A["default"].weight
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, 2.0 * g_y.T @ (x @ A.T), atol=1e-6, rtol=0)


def saved_storages(fn):
    """Storages autograd saves while fn() runs: {data_ptr: shape of one tensor on it}."""
    saved = {}

    def pack(t):
        saved.setdefault(t.untyped_storage().data_ptr(), tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


@pytest.mark.parametrize("config, keeps_x", [(mp.LoRAConfig(r=3), True), (mp.LoRAFAConfig(r=3), False)])
def test_autograd_keeps_x_for_lora_but_only_Ax_for_lora_fa(config, keeps_x):
    torch.manual_seed(0)
    layer = config.layer_class(nn.Linear(16, 8, bias=False))
    layer.add_adapter("default", config)
    layer.active_adapter = "default"
    x = torch.randn(4, 16, requires_grad=True)  # an activation: earlier layers train
    saved, out = saved_storages(lambda: layer(x))
    own = {t.untyped_storage().data_ptr() for t in [*layer.parameters(), *layer.buffers()]}
    activations = {ptr: shape for ptr, shape in saved.items() if ptr not in own}
    assert (x.untyped_storage().data_ptr() in activations) is keeps_x
    if not keeps_x:
        assert list(activations.values()) == [(4, 3)]  # A x: r numbers per token, nothing else


def test_saved_activation_bytes_lora_fa_below_lora_below_full(input_ids):
    def measure(model):
        return saved_activation_bytes(model.train(), input_ids=input_ids, labels=input_ids)

    full = tiny_llama().requires_grad_(True)
    lora = mp.wrap(tiny_llama(), mp.LoRAConfig(r=4, target="all-linear"))
    fa = mp.wrap(tiny_llama(), mp.LoRAFAConfig(r=4, target="all-linear"))
    assert measure(fa) < measure(lora) <= measure(full)
    # a fully frozen model keeps nothing: no gradient to compute
    assert saved_activation_bytes(tiny_llama().requires_grad_(False), input_ids=input_ids) == 0


def test_peft_lora_reads_a_lora_fa_adapter(input_ids, tmp_path):
    peft = pytest.importorskip("peft")
    fa = mp.wrap(tiny_llama(), mp.LoRAFAConfig(r=4, alpha=8, target=["q_proj", "v_proj", "down_proj"])).eval()
    perturb_B(fa)
    ref = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8,
                                                            target_modules=["q_proj", "v_proj", "down_proj"])).eval()
    state = {"base_model.model." + k: v for k, v in fa.adapter_state_dict().items()}
    assert all(".lora_A." in k or ".lora_B." in k for k in state)
    result = peft.set_peft_model_state_dict(ref, state)
    assert not result.unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(fa(input_ids=input_ids).logits, ref(input_ids=input_ids).logits, atol=1e-6,
                                   rtol=0)


def test_gpt2_conv1d_and_merge(input_ids):
    model = mp.wrap(tiny_gpt2(), mp.LoRAFAConfig(r=4, target=["c_attn", "c_fc"]))
    perturb_B(model)
    with torch.no_grad():
        want = model(input_ids=input_ids).logits
        model.merge()
        torch.testing.assert_close(model(input_ids=input_ids).logits, want, atol=1e-5, rtol=0)
