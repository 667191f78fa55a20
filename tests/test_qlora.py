"""QLoRA: LoRA on the 4-bit base. References nobody here wrote: peft's trainable/total counts on the same
fp32 model, torch autograd for the memory-lean 4-bit matmul, the NF4 code table's half-gap error bound, and
(with CUDA + bitsandbytes only) peft + bitsandbytes QLoRA logits."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, tiny_gpt2, tiny_llama
from safetensors.torch import load_file
from torch import nn

import minipeft as mp
from minipeft.config import config_from_dict
from minipeft.quant import (CODES, Linear4bit, QLoRAConfig, dequantize_4bit, dequantize_and_merge,
                            linear_4bit, merge_error, quantize_base)

CUDA = torch.cuda.is_available()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomize_adapters(model, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.adapter_layers():
            for p in layer.adapter_parameters(model.active_adapter):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def qlora(r=4, **kw):
    return mp.wrap(tiny_llama(), QLoRAConfig(r=r, **kw)).eval()


def test_quantizes_all_linear_but_head_and_zero_init_identity(input_ids):
    model = qlora()
    inner = model.base_model
    assert type(inner.lm_head) is nn.Linear and type(inner.model.embed_tokens) is nn.Embedding
    layers = [m for _, m in model.adapter_layers()]
    assert len(layers) == 2 * 7 and all(isinstance(m.base_layer, Linear4bit) for m in layers)
    assert all(m.base_layer.double_quant and m.base_layer.quant_type == "nf4" for m in layers)
    ref = tiny_llama()
    quantize_base(ref, skip={"lm_head"})
    assert torch.equal(logits(model, input_ids), logits(ref, input_ids))  # B = 0: exactly the 4-bit base
    full = logits(tiny_llama(), input_ids)
    assert not torch.equal(logits(model, input_ids), full)  # ... which is not the fp32 base


def test_trainable_count_is_lora_formula_and_total_matches_peft():
    from peft import LoraConfig, get_peft_model
    r = 4
    model = qlora(r=r)
    fp32 = tiny_llama()
    want = sum(r * (m.in_features + m.out_features) for n, m in fp32.named_modules()
               if isinstance(m, nn.Linear) and n != "lm_head")
    summary = model.trainable_summary()
    assert summary["trainable"] == want
    assert summary["total"] == sum(p.numel() for p in fp32.parameters()) + want  # 4-bit weights counted
    theirs = get_peft_model(tiny_llama(), LoraConfig(r=r, lora_alpha=16, target_modules="all-linear"))
    assert (summary["trainable"], summary["total"]) == theirs.get_nb_trainable_parameters()


def test_config_json_roundtrip_and_bad_values():
    cfg = QLoRAConfig(r=2, compute_dtype="bfloat16", double_quant=False)
    again = config_from_dict(cfg.to_dict())
    assert type(again) is QLoRAConfig and again == cfg and cfg.to_dict()["method"] == "qlora"
    assert QLoRAConfig().target == "all-linear"
    for bad in (dict(compute_dtype=torch.bfloat16), dict(compute_dtype="fp8"), dict(quant_type="nf3"),
                dict(double_quant="yes"), dict(blocksize=63), dict(r=0)):
        with pytest.raises(ValueError):
            QLoRAConfig(**bad)


def test_save_load_bit_exact_and_file_holds_only_lora(tmp_path, input_ids):
    model = qlora()
    randomize_adapters(model)
    model.save_adapter(tmp_path)
    tensors = load_file(tmp_path / "adapter.safetensors")
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in tensors)
    assert sum(v.numel() for v in tensors.values()) == model.trainable_summary()["trainable"]
    loaded = mp.load_adapter(tiny_llama(), tmp_path).eval()  # quantizes the fresh fp32 base the same way
    assert all(isinstance(m.base_layer, Linear4bit) for _, m in loaded.adapter_layers())
    assert torch.equal(logits(loaded, input_ids), logits(model, input_ids))


def test_gradient_only_to_lora_and_matches_autograd(input_ids):
    model = qlora()
    randomize_adapters(model)
    model.train()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_A." in n or ".lora_B." in n for n in with_grad)
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    # the memory-lean matmul gives autograd's input gradient
    layer = Linear4bit.from_linear(nn.Linear(70, 30), torch.float32)
    x = torch.randn(3, 70, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    g = torch.randn(3, 30)
    linear_4bit(x, layer).backward(g)
    F.linear(x2, layer.dequantize(), layer.bias).backward(g)
    torch.testing.assert_close(x.grad, x2.grad)


def test_linear_4bit_keeps_no_dequantized_weight():
    layer = Linear4bit.from_linear(nn.Linear(256, 128, bias=False), torch.float32)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    x = torch.randn(2, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer.plain_forward(x).sum()  # plain F.linear: autograd keeps the (128, 256) weight for backward
        plain, saved[:] = list(saved), []
        layer(x).sum()  # Linear4bit.forward while training: dequantizes again in backward instead
        lean, saved[:] = list(saved), []
        linear_4bit(x, layer).sum()
    assert 128 * 256 not in lean
    assert 128 * 256 in plain and 128 * 256 not in saved


def nf4_bound(W_intended, layer):
    """Per-element bound on |Q(W) − W|: half the largest code gap × the block's true absmax, plus the
    (double-quantized) absmax's own error."""
    n = W_intended.numel()
    blocks = F.pad(W_intended.reshape(-1), (0, (-n) % 64)).view(-1, 64)
    c = blocks.abs().amax(1)
    c_hat = layer.quant_state.absmax_fp32()
    per_block = CODES["nf4"].diff().max() / 2 * c + (c_hat - c).abs() + 1e-6
    return per_block.repeat_interleave(64)[:n].view_as(W_intended)


def test_lossy_merge_error_is_nonzero_bounded_and_unmerge_exact(input_ids):
    model = qlora()
    randomize_adapters(model)
    layers = [m for _, m in model.adapter_layers()]
    before = [{k: v.clone() for k, v in m.base_layer.state_dict().items()} for m in layers]
    intended = [dequantize_4bit(m.base_layer.quant_state, torch.float32) + m.delta_weight("default") for m in layers]
    unmerged = logits(model, input_ids)
    model.merge()
    worst = 0.0
    for m, W in zip(layers, intended):
        err = (m.base_layer.dequantize() - W).abs()
        assert torch.all(err <= nf4_bound(W, m.base_layer))
        worst = max(worst, err.max().item())
    assert worst > 1e-3  # re-quantizing W0 + sBA is lossy
    merged = logits(model, input_ids)
    assert (merged - unmerged).abs().max() > 1e-4
    model.unmerge()
    for m, b in zip(layers, before):
        assert all(torch.equal(m.base_layer.state_dict()[k], v) for k, v in b.items())
    assert torch.equal(logits(model, input_ids), unmerged)
    # the helper reports the same logit change and leaves the model as it was
    rep = merge_error(model, input_ids)
    assert rep["logit_max_abs"] == pytest.approx((merged - unmerged).abs().max().item())
    assert 0 < rep["weight_rel_error"] < 0.15 and rep["update_rel_error"] > 0
    assert torch.equal(logits(model, input_ids), unmerged)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_merge_is_dequant_plus_sBA_exactly(dtype, input_ids):
    model = qlora()
    randomize_adapters(model)
    unmerged = logits(model, input_ids)
    want = {n: (dequantize_4bit(m.base_layer.quant_state, torch.float32) + m.delta_weight("default")).to(dtype)
            for n, m in model.adapter_layers()}
    plain = dequantize_and_merge(model, dtype)
    assert not any(isinstance(m, (Linear4bit, mp.LoRALinear)) for m in plain.modules())
    for n, W in want.items():
        lin = plain.get_submodule(n)
        assert type(lin) is nn.Linear and lin.weight.dtype == dtype and torch.equal(lin.weight, W)
    if dtype == torch.float32:
        torch.testing.assert_close(logits(plain, input_ids), unmerged, atol=1e-5, rtol=0)


def test_prepare_is_idempotent_and_gpt2_conv1d(input_ids):
    base = tiny_llama()
    quantize_base(base, skip={"lm_head"})
    codes = {k: v.clone() for k, v in base.state_dict().items()}
    model = mp.wrap(base, QLoRAConfig(r=2, compute_dtype="bfloat16"))
    assert all(torch.equal(model.base_model.state_dict()[k.replace("proj.", "proj.base_layer.")]
                           if "proj." in k else model.base_model.state_dict()[k], v) for k, v in codes.items())
    assert all(m.base_layer.compute_dtype == torch.bfloat16 for _, m in model.adapter_layers())
    model.add_adapter("second", QLoRAConfig(r=2))  # prepare_model runs again: nothing re-quantized
    assert len(model.adapter_layers()) == 14
    gpt = mp.wrap(tiny_gpt2(), QLoRAConfig(r=2)).eval()
    assert sum(isinstance(m, Linear4bit) for m in gpt.modules()) == 8 and type(gpt.base_model.lm_head) is nn.Linear
    randomize_adapters(gpt)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    y = logits(gpt, ids)
    torch.testing.assert_close(logits(dequantize_and_merge(gpt, torch.float32), ids), y, atol=1e-5, rtol=0)


def test_refuses_lora_on_unquantized_layers():
    model = mp.wrap(tiny_llama(), mp.LoRAConfig(r=2, target=["q_proj"]))
    with pytest.raises(ValueError, match="add the QLoRA adapter first"):
        model.add_adapter("q", QLoRAConfig(r=2))


@pytest.mark.skipif(not (CUDA and importlib.util.find_spec("bitsandbytes")), reason="needs CUDA and bitsandbytes")
@pytest.mark.parametrize("double_quant", [False, True])
def test_same_logits_as_peft_bitsandbytes(double_quant, input_ids):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    ours = mp.wrap(tiny_llama().cuda(), QLoRAConfig(r=4, dropout=0.0, double_quant=double_quant)).eval()
    randomize_adapters(ours)
    theirs = tiny_llama()
    for name, lin in [(n, m) for n, m in theirs.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]:
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=torch.float32, compress_statistics=double_quant, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=double_quant,
                                     quant_type="nf4", blocksize=64)
        parent, _, child = name.rpartition(".")
        setattr(theirs.get_submodule(parent), child, q)
    theirs = get_peft_model(theirs.cuda(), LoraConfig(r=4, lora_alpha=16, target_modules="all-linear")).eval()
    set_peft_model_state_dict(theirs, {"base_model.model." + k: v for k, v in ours.adapter_state_dict().items()})
    ids = input_ids.cuda()
    got, want = logits(ours, ids), logits(theirs, ids)
    lora_effect = (got - logits(tiny_llama().cuda(), ids)).norm()
    # no double quant: identical codes and scales (up to rare midpoint ties); with it, bitsandbytes stores the
    # scales in its nonlinear 8-bit map and we in linear int8, so the two 4-bit bases differ slightly
    assert (got - want).norm() < (1e-4 if not double_quant else 0.05) * max(lora_effect.item(), 1.0) + 1e-3
