"""VeRA against a reference nobody here wrote: HF peft's `VeraConfig` (same projection seed gives the same
shared A, B; same tensors in, same logits and merged weights out), plus the properties that make VeRA what it
is: A and B stored once per model and never trained, d_out + r parameters per layer, save/load of the shared
tensors (saved, or rebuilt from the seed)."""
import pytest
import torch
from conftest import BUILDERS, tiny_llama
from safetensors.torch import load_file

import minipeft as mp
from minipeft.reparam import VeRALinear

TARGETS = ["q_proj", "v_proj", "down_proj"]  # three shapes (32→32, 32→16, 72→32): the slicing matters
CASES = {"llama": ("llama", TARGETS, False), "gpt2-conv1d": ("gpt2", ["c_attn", "c_fc"], True)}


def perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.adapter_parameters("default"):
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("case", list(CASES))
def test_same_seed_same_shared_tensors_and_same_logits_as_peft(case, input_ids):
    peft = pytest.importorskip("peft")
    arch, targets, fifo = CASES[case]
    ours = mp.wrap(BUILDERS[arch](), mp.VeRAConfig(r=8, projection_prng_key=3, target=targets)).eval()
    perturb(ours)
    theirs = peft.get_peft_model(BUILDERS[arch](), peft.VeraConfig(r=8, projection_prng_key=3, target_modules=targets,
                                                                   fan_in_fan_out=fifo)).eval()
    shared = ours.shared["default"]
    # the same seed draws the same shared A, B (largest shapes over the targets, A first, kaiming-uniform)
    assert torch.equal(shared.vera_A, theirs.base_model.vera_A["default"])
    assert torch.equal(shared.vera_B, theirs.base_model.vera_B["default"])
    modules = dict(theirs.named_modules())
    with torch.no_grad():
        for path, layer in ours.adapter_layers():
            twin = modules["base_model.model." + path]
            twin.vera_lambda_b["default"].copy_(layer.vera_lambda_b["default"])
            twin.vera_lambda_d["default"].copy_(layer.vera_lambda_d["default"])
    got = logits(ours, input_ids)
    assert (got - logits(BUILDERS[arch](), input_ids)).abs().max() > 1e-2
    torch.testing.assert_close(got, logits(theirs, input_ids), atol=1e-5, rtol=0)
    assert ours.trainable_summary()["trainable"] == theirs.get_nb_trainable_parameters()[0]
    mine, ref = ours.merge_and_unload().state_dict(), theirs.merge_and_unload().state_dict()
    assert set(mine) == set(ref)
    for k in mine:
        torch.testing.assert_close(mine[k], ref[k], atol=1e-6, rtol=0, msg=k)


def test_init_and_parameter_count(llama):
    model = mp.wrap(llama, mp.VeRAConfig(r=16, target="all-linear"))
    layers = model.adapter_layers()
    for _, layer in layers:
        assert torch.equal(layer.vera_lambda_b["default"], torch.zeros(layer.out_features))
        assert torch.equal(layer.vera_lambda_d["default"], torch.full((16,), 0.1))
    # d_out + r per adapted layer (METHODS.md)
    assert model.trainable_summary()["trainable"] == sum(layer.out_features + 16 for _, layer in layers)
    shared = model.shared["default"]
    d_in = max(layer.in_features for _, layer in layers)
    d_out = max(layer.out_features for _, layer in layers)
    assert shared.vera_A.shape == (16, d_in) and shared.vera_B.shape == (d_out, 16)


def test_shared_matrices_stored_once_and_never_trained(input_ids, tmp_path):
    model = mp.wrap(tiny_llama(), mp.VeRAConfig(r=8, target="all-linear"))
    shared = model.shared["default"]
    layers = model.adapter_layers()
    assert all(layer.shared_basis["default"] is shared for _, layer in layers)  # one module, referenced
    assert not list(shared.parameters())  # buffers: nothing can make them train
    assert not any("vera_A" in n or "vera_B" in n for n, _ in model.named_parameters())
    assert [k for k in model.state_dict() if "vera_A" in k] == ["shared.default.vera_A"]
    A0, B0 = shared.vera_A.clone(), shared.vera_B.clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(shared.vera_A, A0) and torch.equal(shared.vera_B, B0)
    assert any(layer.vera_lambda_b["default"].abs().sum() > 0 for _, layer in layers)  # the vectors did train
    model.save_adapter(tmp_path)
    keys = list(load_file(tmp_path / "adapter.safetensors"))
    assert [k for k in keys if "vera_A" in k] == ["shared.vera_A"]
    assert [k for k in keys if "vera_B" in k] == ["shared.vera_B"]
    assert len(keys) == 2 + 2 * len(layers)  # A, B once; b and d per layer


def test_save_load_round_trips_the_saved_shared_tensors(input_ids, tmp_path):
    model = mp.wrap(tiny_llama(), mp.VeRAConfig(r=8, target=TARGETS)).eval()
    perturb(model)
    with torch.no_grad():  # shared tensors no seed could give: loading must read them from the file
        model.shared["default"].vera_A.mul_(-1.5)
    want = logits(model, input_ids)
    model.save_adapter(tmp_path)
    loaded = mp.load_adapter(tiny_llama(), tmp_path)
    assert torch.equal(loaded.shared["default"].vera_A, model.shared["default"].vera_A)
    assert torch.equal(logits(loaded, input_ids), want)


def test_save_projection_false_rebuilds_the_shared_tensors_from_the_seed(input_ids, tmp_path):
    model = mp.wrap(tiny_llama(), mp.VeRAConfig(r=8, projection_prng_key=7, save_projection=False,
                                                target=TARGETS)).eval()
    perturb(model)
    want = logits(model, input_ids)
    model.save_adapter(tmp_path)
    assert not any("vera" in k and "lambda" not in k for k in load_file(tmp_path / "adapter.safetensors"))
    loaded = mp.load_adapter(tiny_llama(), tmp_path)
    assert torch.equal(loaded.shared["default"].vera_B, model.shared["default"].vera_B)
    assert torch.equal(logits(loaded, input_ids), want)


def test_delta_weight_is_lambda_b_B_lambda_d_A(llama):
    model = mp.wrap(llama, mp.VeRAConfig(r=6, target=["down_proj"]))
    perturb(model)
    layer = model.base_model.model.layers[1].mlp.down_proj
    assert isinstance(layer, VeRALinear)
    A = model.shared["default"].vera_A[:, :layer.in_features]
    B = model.shared["default"].vera_B[:layer.out_features]
    b, d = layer.vera_lambda_b["default"], layer.vera_lambda_d["default"]
    want = torch.diag(b) @ B @ torch.diag(d) @ A
    torch.testing.assert_close(layer.delta_weight("default"), want, atol=1e-6, rtol=0)
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ want.T, atol=1e-5, rtol=0)
