"""MELoRA against references written apart from minipeft's batched code: an explicit block-diagonal ΔW built
with torch.block_diag, a loop of n separate mini-LoRAs on slices of x (the official code's structure,
ChasonShi/MELoRA), and autograd on the dense formula W0 + s·blockdiag(B_1A_1, …, B_nA_n)."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import BUILDERS, tiny_llama, train_losses
from torch import nn

import minipeft as mp
from minipeft.reparam import MELoRALinear


def layer_with_minis(d_in=12, d_out=8, r=2, n=4, alpha=6.0, seed=0, bias=True):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=bias)
    layer = MELoRALinear(base)
    layer.add_adapter("default", mp.MELoRAConfig(r=r, n=n, alpha=alpha))
    layer.active_adapter = "default"
    with torch.no_grad():
        layer.lora_B["default"].normal_()  # B = 0 at init would make every check trivial
    return base, layer


def block_diagonal(layer, name="default"):
    """s · blockdiag(B_1 A_1, …, B_n A_n), built mini by mini."""
    A, B = layer.lora_A[name].detach(), layer.lora_B[name].detach()
    return layer.scaling[name] * torch.block_diag(*[B[i] @ A[i] for i in range(A.shape[0])])


def loop_of_minis(layer, x, name="default"):
    """The official code's forward: n pairs of nn.Linear, mini i on slice i of x, outputs concatenated."""
    A, B, s = layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
    n, k = A.shape[0], A.shape[2]
    outs = [F.linear(F.linear(x[..., i * k:(i + 1) * k], A[i]), B[i]) * s for i in range(n)]
    return layer.base_layer(x) + torch.cat(outs, dim=-1)


@pytest.mark.parametrize("r, n", [(1, 4), (2, 2), (3, 1)])
def test_delta_weight_is_the_explicit_block_diagonal(r, n):
    base, layer = layer_with_minis(r=r, n=n)
    want = block_diagonal(layer)
    torch.testing.assert_close(layer.delta_weight("default"), want, atol=1e-6, rtol=0)
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(layer(x), F.linear(x, base.weight + want, base.bias), atol=1e-5, rtol=0)
    torch.testing.assert_close(layer(x), loop_of_minis(layer, x), atol=1e-5, rtol=0)
    off = want.clone()
    for i in range(n):  # everything outside the diagonal blocks is exactly zero
        off[i * 8 // n:(i + 1) * 8 // n, i * 12 // n:(i + 1) * 12 // n] = 0
    assert torch.count_nonzero(off) == 0


@pytest.mark.parametrize("r, n", [(1, 8), (2, 4), (4, 2)])
def test_rank_is_n_times_r(r, n):
    torch.manual_seed(0)
    base = nn.Linear(64, 32)
    layer = MELoRALinear(base)
    layer.add_adapter("default", mp.MELoRAConfig(r=r, n=n))
    assert torch.linalg.matrix_rank(layer.delta_weight("default")) == 0  # B = 0: starts at zero
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    assert torch.linalg.matrix_rank(layer.delta_weight("default")) == n * r
    # a LoRA with the same number of parameters has rank r only
    lora = mp.wrap(nn.Sequential(nn.Linear(64, 32)), mp.LoRAConfig(r=r, target=["0"]))
    assert sum(p.numel() for p in lora.parameters() if p.requires_grad) == \
        sum(p.numel() for p in layer.parameters() if p.requires_grad) == r * (64 + 32)


def test_gradients_match_autograd_on_the_dense_formula():
    base, layer = layer_with_minis(r=2, n=4)
    x, g_y = torch.randn(6, 12), torch.randn(6, 8)
    layer(x).backward(g_y)
    A, B = (t.detach().clone().requires_grad_() for t in (layer.lora_A["default"], layer.lora_B["default"]))
    dW = layer.scaling["default"] * torch.block_diag(*[B[i] @ A[i] for i in range(4)])
    F.linear(x, base.weight + dW, base.bias).backward(g_y)
    torch.testing.assert_close(layer.lora_A["default"].grad, A.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.lora_B["default"].grad, B.grad, atol=1e-5, rtol=1e-5)
    assert base.weight.grad is None


def test_init_as_the_official_minis_scaling_alpha_over_r():
    torch.manual_seed(0)
    layer = MELoRALinear(nn.Linear(512, 256))
    layer.add_adapter("default", mp.MELoRAConfig(r=4, n=8, alpha=16))
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    assert A.shape == (8, 4, 64) and B.shape == (8, 32, 4)
    assert torch.count_nonzero(B) == 0
    bound = 1 / math.sqrt(512 / 8)  # nn.Linear(d_in/n, r)'s kaiming-uniform (a=√5) bound, per mini
    assert A.abs().max() <= bound and A.abs().max() > 0.95 * bound
    assert layer.scaling["default"] == 16 / 4


@pytest.mark.parametrize("arch, targets", [("llama", "all-linear"), ("gpt2", ["c_attn", "c_fc", "c_proj"])])
def test_param_count_and_merge_on_models(arch, targets, input_ids):
    model = mp.wrap(BUILDERS[arch](), mp.MELoRAConfig(r=2, n=4, target=targets)).eval()
    want = sum(2 * (layer.in_features + layer.out_features) for _, layer in model.adapter_layers())
    assert model.trainable_summary()["trainable"] == want
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in model.adapter_parameters("default"):
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
        before = model(input_ids=input_ids).logits
        model.merge()
        after = model(input_ids=input_ids).logits
    assert (before - BUILDERS[arch]()(input_ids=input_ids).logits).abs().max() > 1e-2
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


def test_n_must_divide_both_sides_named_in_the_error():
    with pytest.raises(ValueError, match=r"n=5.*in_features \(32\).*q_proj"):
        mp.wrap(tiny_llama(), mp.MELoRAConfig(r=2, n=5, target=["q_proj"]))
    with pytest.raises(ValueError, match=r"n=3.*out_features \(32\)"):
        mp.wrap(nn.Sequential(nn.Linear(48, 32)), mp.MELoRAConfig(r=2, n=3, target=["0"]))
    for bad, field in [({"n": 0}, "n"), ({"n": 2.0}, "n"), ({"r": 0}, "r"), ({"alpha": -1}, "alpha")]:
        with pytest.raises(ValueError, match=field):
            mp.MELoRAConfig(**bad)


def test_melora_on_a_4bit_base_starts_at_the_base_and_trains(input_ids):
    from minipeft.quant import quantize_base
    base = tiny_llama()
    quantize_base(base)
    model = mp.wrap(base, mp.MELoRAConfig(r=2, n=4, target="all-linear"))
    with model.disable_adapter(), torch.no_grad():
        start = model(input_ids=input_ids).logits
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids).logits, start)
    losses = train_losses(model, input_ids, steps=15, lr=1e-2)
    assert losses[-1] < losses[0] - 0.3
