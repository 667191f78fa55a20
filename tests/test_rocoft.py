"""RoCoFT against a reference nobody here wrote: full fine-tuning of the same model with PyTorch's AdamW and
the gradient masked (by a hook) to the chosen rows or columns; plus the saved file's shapes, exact merge and
the parameter count k·d_in (rows) / k·d_out (columns)."""
import pytest
import torch
from conftest import BUILDERS, tiny_llama, train_losses
from safetensors.torch import load_file
from torch import nn

import minipeft as mp
from minipeft.selective import RoCoFTLinear, weight_change
from minipeft.weights import Conv1D, base_weight


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def layers(model):
    return {path: layer for path, layer in model.adapter_layers() if isinstance(layer, RoCoFTLinear)}


def masked_full_finetune(model, masks, ids, steps, lr):
    """Reference: AdamW on the whole targeted weights, gradients outside `masks` zeroed by a hook."""
    params = []
    for path, mask in masks.items():
        w = model.get_submodule(path).weight
        w.requires_grad_(True)
        w.register_hook(lambda g, m=mask: g * m)
        params.append(w)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


def rocoft_finetune(model, ids, steps, lr):
    train_losses(model, ids, steps, lr, weight_decay=0.0)
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("mode,select", [("rows", "first"), ("columns", "first"), ("rows", "random")])
def test_equals_full_finetuning_with_the_gradient_masked_to_the_chosen_slice(arch, mode, select, input_ids):
    # float64, so that rounding (W0x + (R - W0_S)x against Wx) cannot flip Adam's tiny normalised updates
    build = lambda: BUILDERS[arch]().double()  # noqa: E731
    ours = mp.wrap(build(), mp.RoCoFTConfig(k=3, mode=mode, select=select, target="all-linear"))
    masks = {}
    for path, layer in layers(ours).items():
        W0 = base_weight(layer.base_layer)
        mask = torch.zeros_like(W0)
        idx = layer.rocoft_index["default"].index
        if mode == "rows":
            mask[idx, :] = 1
        else:
            mask[:, idx] = 1
        masks[path] = mask.T if isinstance(layer.base_layer, Conv1D) else mask  # the hook sees the stored layout
    if select == "random":
        assert any(not torch.equal(lay.rocoft_index["default"].index, torch.arange(3)) for lay in layers(ours).values())
    ref = build()
    ref.train()
    ref.requires_grad_(False)
    masked_full_finetune(ref, masks, input_ids, steps=5, lr=1e-2)
    rocoft_finetune(ours, input_ids, steps=5, lr=1e-2)
    mine = ours.merge_and_unload().state_dict()
    want, start = ref.state_dict(), build().state_dict()
    assert set(mine) == set(want)
    worst = max((mine[k] - want[k]).abs().max().item() for k in want)
    assert worst < 1e-7, worst  # seen: ~4e-9 after 5 steps of lr 1e-2 (Adam normalises tiny gradients)
    moved = [k for k in want if not torch.equal(want[k], start[k])]
    assert moved and all(k.rsplit(".", 1)[0] in masks for k in moved)  # only the targeted weights moved


def test_only_the_chosen_rows_move_and_merge_is_an_exact_copy(llama, input_ids):
    W0s = {n: m.weight.detach().clone() for n, m in llama.named_modules() if isinstance(m, nn.Linear)}
    model = mp.wrap(llama, mp.RoCoFTConfig(k=2, target=["q_proj", "up_proj"], select="random", seed=3))
    rocoft_finetune(model, input_ids, steps=3, lr=1e-2)
    model.eval()
    want = logits(model, input_ids)
    trained = {p: (lay.rocoft_index["default"].index.clone(), lay.rocoft_weight["default"].detach().clone())
               for p, lay in layers(model).items()}
    for path, lay in layers(model).items():
        change = weight_change(lay)
        idx = trained[path][0]
        others = torch.ones(change.shape[0], dtype=torch.bool)
        others[idx] = False
        assert change[others].abs().max() == 0 and change[idx].abs().max() > 0
    model.merge()
    torch.testing.assert_close(logits(model, input_ids), want, atol=1e-5, rtol=0)
    for path, (idx, R) in trained.items():
        W, W0 = model.base_model.get_submodule(path).base_layer.weight, W0s[path]
        assert torch.equal(W[idx], R)
        keep = torch.ones(W.shape[0], dtype=torch.bool)
        keep[idx] = False
        assert torch.equal(W[keep], W0[keep])


@pytest.mark.parametrize("mode", ["rows", "columns"])
def test_the_saved_adapter_holds_only_the_chosen_slice(mode, tmp_path):
    model = mp.wrap(tiny_llama(), mp.RoCoFTConfig(k=3, mode=mode, target="all-linear"))
    model.save_adapter(tmp_path)
    tensors = load_file(str(next(tmp_path.glob("*.safetensors"))))
    lays = layers(model)
    assert len(tensors) == 2 * len(lays)
    for path, lay in lays.items():
        d_out, d_in = lay.base_layer.weight.shape
        assert tuple(tensors[f"{path}.rocoft_weight"].shape) == ((3, d_in) if mode == "rows" else (d_out, 3))
        assert torch.equal(tensors[f"{path}.rocoft_index.index"], torch.arange(3))


@pytest.mark.parametrize("arch,bias", [("llama", False), ("gpt2", False), ("gpt2", True), ("bert", True)])
@pytest.mark.parametrize("mode", ["rows", "columns"])
def test_parameter_count_is_k_d_in_or_k_d_out(arch, bias, mode):
    base = BUILDERS[arch]()
    model = mp.wrap(base, mp.RoCoFTConfig(k=2, mode=mode, bias=bias, target="all-linear"))
    want = 0
    for _, lay in layers(model).items():
        d_out, d_in = base_weight(lay.base_layer).shape
        want += 2 * (d_in if mode == "rows" else d_out)
        if bias and getattr(lay.base_layer, "bias", None) is not None:
            want += d_out
    assert model.trainable_summary()["trainable"] == want


def test_trained_bias_moves_and_merges(input_ids):
    model = mp.wrap(BUILDERS["gpt2"](), mp.RoCoFTConfig(k=1, bias=True, target=["c_fc"]))
    with torch.no_grad():
        for lay in layers(model).values():
            lay.rocoft_bias["default"].add_(0.3)
    want = logits(model, input_ids)
    assert not torch.allclose(want, logits(BUILDERS["gpt2"](), input_ids))
    model.merge()
    torch.testing.assert_close(logits(model, input_ids), want, atol=1e-5, rtol=0)


def test_random_selection_is_seeded_per_matrix_and_k_is_clipped():
    cfg = mp.RoCoFTConfig(k=4, select="random", seed=1)
    a, b = cfg.indices("model.layers.0.self_attn.q_proj", 32), cfg.indices("model.layers.1.self_attn.q_proj", 32)
    assert torch.equal(a, cfg.indices("model.layers.0.self_attn.q_proj", 32))  # reproducible
    assert not torch.equal(a, b) and a.unique().numel() == 4 and torch.equal(a, a.sort().values)
    assert not torch.equal(a, mp.RoCoFTConfig(k=4, select="random", seed=2).indices("model.layers.0.self_attn.q_proj",
                                                                                   32))
    assert torch.equal(mp.RoCoFTConfig(k=50).indices("x", 7), torch.arange(7))


@pytest.mark.parametrize("bad,field", [({"k": 0}, "k"), ({"mode": "diag"}, "mode"), ({"select": "max"}, "select"),
                                       ({"seed": 1.5}, "seed"), ({"bias": "yes"}, "bias")])
def test_invalid_values_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        mp.RoCoFTConfig(**bad)


def test_rocoft_on_a_4bit_base_runs_and_trains(input_ids):
    from minipeft.quant import quantize_base
    base = tiny_llama()
    quantize_base(base)
    model = mp.wrap(base, mp.RoCoFTConfig(k=2, target="all-linear"))
    with model.disable_adapter():
        start = logits(model, input_ids)
    assert torch.equal(logits(model, input_ids), start)
    losses = train_losses(model, input_ids, steps=20, lr=5e-2)
    assert losses[-1] < losses[0] - 0.15  # 2 rows per matrix: it learns, slowly (seen: 4.15 -> 3.90)
