"""DoRA against references nobody here wrote: HF peft's `use_dora=True` (same tensors in, same logits and
merged weights out) and autograd on the dense formula W' = m ⊙ (W0 + sBA)/‖W0 + sBA‖_c."""
import copy

import pytest
import torch
from conftest import BUILDERS, tiny_llama, train_losses
from torch import nn

import minipeft as mp
from minipeft.reparam import DoRALinear, magnitude_direction_change

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict  # noqa: E402

CASES = {  # arch, targets, peft's fan_in_fan_out (GPT-2's Conv1D stores W transposed)
    "llama": ("llama", ["q_proj", "v_proj", "down_proj"], False),
    "gpt2-conv1d": ("gpt2", ["c_attn", "c_fc"], True),
}


def perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.adapter_parameters("default"):
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def peft_twin(ours, arch, targets, fan_in_fan_out):
    theirs = get_peft_model(BUILDERS[arch](), LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True,
                                                         fan_in_fan_out=fan_in_fan_out)).eval()
    state = {}
    for k, v in ours.adapter_state_dict().items():  # peft keeps m in a module: "...lora_magnitude_vector.weight"
        k = "base_model.model." + k
        state[k + ".weight" if k.endswith("lora_magnitude_vector") else k] = v
    assert not set_peft_model_state_dict(theirs, state).unexpected_keys
    return theirs


@pytest.mark.parametrize("case", list(CASES))
def test_same_tensors_same_logits_and_merged_weights_as_peft(case, input_ids):
    arch, targets, fifo = CASES[case]
    ours = mp.wrap(BUILDERS[arch](), mp.DoRAConfig(r=4, alpha=8, target=targets)).eval()
    perturb(ours)
    theirs = peft_twin(ours, arch, targets, fifo)
    got, want = logits(ours, input_ids), logits(theirs, input_ids)
    assert (got - logits(BUILDERS[arch](), input_ids)).abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert ours.trainable_summary()["trainable"] == theirs.get_nb_trainable_parameters()[0]
    mine, ref = ours.merge_and_unload().state_dict(), theirs.merge_and_unload().state_dict()
    assert set(mine) == set(ref)
    for k in mine:
        torch.testing.assert_close(mine[k], ref[k], atol=1e-6, rtol=0, msg=k)


def test_starts_at_the_base_with_m_the_row_norms(llama, input_ids):
    model = mp.wrap(llama, mp.DoRAConfig(r=4, target=["q_proj"]))
    layer = model.base_model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer.lora_magnitude_vector["default"], layer.base_layer.weight.norm(dim=1),
                               atol=0, rtol=1e-6)
    assert torch.equal(logits(model, input_ids), logits(tiny_llama(), input_ids))


def test_merge_then_unmerge_gives_the_base_weights_bit_for_bit(llama):
    before = copy.deepcopy(llama.state_dict())
    model = mp.wrap(llama, mp.DoRAConfig(r=4, target="all-linear"))
    perturb(model)
    model.merge()
    assert not torch.equal(model.base_model.model.layers[0].mlp.up_proj.base_layer.weight,
                           before["model.layers.0.mlp.up_proj.weight"])
    model.unmerge()
    after = model.unload().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("detach_norm", [True, False])
def test_gradients_match_autograd_on_the_dense_formula(detach_norm):
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    layer = DoRALinear(base)
    layer.add_adapter("default", mp.DoRAConfig(r=3, alpha=6, detach_norm=detach_norm))
    layer.active_adapter = "default"
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(std=0.3)
        layer.lora_magnitude_vector["default"].mul_(1.5)
    x, g_y = torch.randn(5, 12), torch.randn(5, 10)
    layer(x).backward(g_y)
    A, B, m = (t.detach().clone().requires_grad_() for t in
               (layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_magnitude_vector["default"]))
    V = base.weight + 2.0 * B @ A  # s = alpha / r = 2
    n = V.norm(dim=1)
    W = (m / (n.detach() if detach_norm else n))[:, None] * V  # paper §4.3: the norm as a constant
    (x @ W.T + base.bias).backward(g_y)
    for ours, ref in ((layer.lora_A["default"].weight, A), (layer.lora_B["default"].weight, B),
                      (layer.lora_magnitude_vector["default"], m)):
        torch.testing.assert_close(ours.grad, ref.grad, atol=1e-5, rtol=1e-5)


def test_dora_on_a_4bit_base_runs_and_trains(input_ids):
    from minipeft.quant import Linear4bit, quantize_base
    base = tiny_llama()
    quantize_base(base)  # the QLoRA base, then DoRA on it: no extra class
    model = mp.wrap(base, mp.DoRAConfig(r=4, target="all-linear"))
    layer = model.base_model.model.layers[0].mlp.down_proj
    assert isinstance(layer, DoRALinear) and isinstance(layer.base_layer, Linear4bit)
    with model.disable_adapter():
        start = logits(model, input_ids)
    torch.testing.assert_close(logits(model, input_ids), start, atol=1e-5, rtol=0)
    losses = train_losses(model, input_ids, steps=20, lr=1e-2)
    assert losses[-1] < losses[0] - 0.5


def test_magnitude_direction_change_formulas():
    W0 = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    W = torch.tensor([[6.0, 8.0], [0.0, 2.0]])  # row 0: same direction, twice the norm; row 1: turned 90°
    dM, dD = magnitude_direction_change(W0, W)
    assert dM == pytest.approx((5 + 1) / 2) and dD == pytest.approx((0 + 1) / 2)
