"""The shared spine (targeting, PeftModel, adapter files), exercised through LoRA: properties that must hold
for any method, and bad input that must fail with a clear ValueError."""
import copy
import json

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file
from torch import nn

import minipeft as mp
from minipeft.quant import QLoRAConfig
from minipeft.reparam.lora import LoRALinear


def randomize_adapters(model, name=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.adapter_parameters(name or model.active_adapter):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def lora(**kw):
    kw.setdefault("target", ["q_proj", "v_proj"])
    return mp.LoRAConfig(**kw)


# ---- properties ------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_bert])
def test_zero_init_is_exact_identity(build, input_ids):
    model = mp.wrap(build(), mp.LoRAConfig(r=4, target="all-linear"))
    assert torch.equal(logits(model, input_ids), logits(build(), input_ids))


def test_merge_equals_unmerged_and_unmerge_restores(llama, input_ids):
    base_state = copy.deepcopy(llama.state_dict())
    model = mp.wrap(llama, lora(r=4, alpha=16, target="all-linear"))
    randomize_adapters(model)
    before = logits(model, input_ids)
    model.merge()
    assert all(layer.merged_adapters == ["default"] for _, layer in model.adapter_layers())
    torch.testing.assert_close(logits(model, input_ids), before, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="already merged"):
        model.merge()
    model.unmerge()
    for path, layer in model.adapter_layers():
        torch.testing.assert_close(layer.base_layer.weight, base_state[path + ".weight"], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, input_ids), before, atol=1e-5, rtol=1e-5)


def test_merge_and_unload_returns_plain_model(gpt2, input_ids):
    model = mp.wrap(gpt2, mp.LoRAConfig(r=4, target=["c_attn", "c_fc"]))
    randomize_adapters(model)
    before = logits(model, input_ids)
    plain = model.merge_and_unload()
    assert type(plain) is type(tiny_gpt2())
    assert not any(isinstance(m, mp.AdapterLayer) for m in plain.modules())
    assert set(plain.state_dict()) == set(tiny_gpt2().state_dict())
    torch.testing.assert_close(logits(plain, input_ids), before, atol=1e-5, rtol=1e-5)


def test_only_adapter_params_require_grad(bert):
    model = mp.wrap(bert, mp.LoRAConfig(r=2, target=["query", "value"], modules_to_save=["classifier"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n or ".classifier.copies.default." in n
                             for n in trainable)
    assert {n for n in trainable if "classifier" in n} == {"base_model.classifier.copies.default.weight",
                                                          "base_model.classifier.copies.default.bias"}
    # a training step moves only those
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model(input_ids=torch.randint(0, 64, (2, 8)), labels=torch.tensor([0, 2]))
    out.loss.backward()
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_save_load_round_trip_is_bit_exact(tmp_path, bert, input_ids):
    model = mp.wrap(bert, mp.LoRAConfig(r=2, alpha=5, target="all-linear", modules_to_save=["classifier"]))
    randomize_adapters(model)
    model.save_adapter(tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["config"]["method"] == "lora" and meta["base_model"]["model_type"] == "bert"
    saved = load_file(str(tmp_path / "adapter.safetensors"))
    assert "classifier.weight" in saved and not any("embeddings" in k for k in saved)  # adapter only, no base

    loaded = mp.load_adapter(tiny_bert(), tmp_path)
    state, state2 = model.adapter_state_dict(), loaded.adapter_state_dict()
    assert state.keys() == state2.keys() == saved.keys()
    assert all(torch.equal(state[k], state2[k]) for k in state)
    assert loaded.peft_config["default"] == model.peft_config["default"]
    assert torch.equal(logits(loaded, input_ids), logits(model, input_ids))
    assert not any(p.requires_grad for p in loaded.parameters())  # frozen unless is_trainable
    trainable = mp.load_adapter(tiny_bert(), tmp_path, is_trainable=True)
    assert trainable.trainable_summary()["trainable"] == model.trainable_summary()["trainable"]


def test_trainable_count_and_summary(llama):
    model = mp.wrap(llama, lora(r=4))
    shapes = [(tiny_llama().get_submodule(n).weight.shape) for n, _ in model.adapter_layers()]
    expected = sum(4 * (d_in + d_out) for d_out, d_in in shapes)
    s = model.trainable_summary()
    assert s["trainable"] == expected and s["total"] == sum(p.numel() for p in tiny_llama().parameters()) + expected
    assert f"trainable params: {expected:,}" in repr(s)


# ---- targeting -----------------------------------------------------------------------------------------
def wrapped(model):
    return sorted(n for n, _ in model.adapter_layers())


def test_target_forms(llama):
    names = [n for n, _ in tiny_llama().named_modules()]
    suffix = mp.wrap(tiny_llama(), lora(target=["q_proj", "mlp.up_proj"]))
    assert wrapped(suffix) == sorted(n for n in names if n.endswith(".q_proj") or n.endswith(".mlp.up_proj"))
    regex = mp.wrap(tiny_llama(), lora(target=r"model\.layers\.1\.self_attn\.(k|o)_proj"))
    assert wrapped(regex) == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.o_proj"]
    every = mp.wrap(tiny_llama(), lora(target="all-linear"))
    linear = sorted(n for n, m in tiny_llama().named_modules() if isinstance(m, nn.Linear))
    assert "lm_head" in linear and wrapped(every) == [n for n in linear if n != "lm_head"]
    default = mp.wrap(tiny_llama(), mp.LoRAConfig())  # LoRA paper's default: q and v
    assert wrapped(default) == sorted(n for n in names if n.endswith((".q_proj", ".v_proj")))


def test_all_linear_on_classifier_leaves_the_head_to_modules_to_save(bert):
    model = mp.wrap(bert, mp.LoRAConfig(target="all-linear", modules_to_save=["classifier"]))
    assert isinstance(model.base_model.classifier, mp.ModulesToSave)
    assert isinstance(model.base_model.classifier.base_layer, nn.Linear)
    assert all(isinstance(m, LoRALinear) for n, m in model.adapter_layers() if n != "classifier")


# ---- several adapters ------------------------------------------------------------------------------------
def test_named_adapters_add_switch_disable_delete(input_ids):
    base_logits = logits(tiny_llama(), input_ids)
    model = mp.wrap(tiny_llama(), lora(r=2), adapter_name="a")
    randomize_adapters(model, "a", seed=1)
    model.add_adapter("b", lora(r=4, target=["q_proj", "o_proj"]))
    randomize_adapters(model, "b", seed=2)
    assert model.active_adapter == "a"  # adding does not switch (as peft)
    model.set_adapter("b")
    assert all(p.requires_grad == (".b." in n or n.endswith(".b"))
               for n, p in model.named_parameters() if ".lora_" in n)

    # each adapter alone on a fresh base gives the reference outputs
    refs = {}
    for name in ("a", "b"):
        single = mp.wrap(tiny_llama(), model.peft_config[name])
        with torch.no_grad():
            for (n1, p1), (n2, p2) in zip(single.adapter_parameters("default"), model.adapter_parameters(name)):
                assert n1.replace(".default", f".{name}") == n2
                p1.copy_(p2)
        refs[name] = logits(single, input_ids)
    assert torch.equal(logits(model, input_ids), refs["b"])
    model.set_adapter("a")
    assert torch.equal(logits(model, input_ids), refs["a"])
    assert not torch.allclose(refs["a"], refs["b"])

    with model.disable_adapter():
        assert torch.equal(logits(model, input_ids), base_logits)
    assert torch.equal(logits(model, input_ids), refs["a"])

    model.delete_adapter("a")
    assert list(model.peft_config) == ["b"] and model.active_adapter == "b"
    assert torch.equal(logits(model, input_ids), refs["b"])
    v_proj = model.base_model.model.layers[0].self_attn.v_proj  # carried only "a"
    assert type(v_proj) is nn.Linear
    original_q = model.base_model.model.layers[0].self_attn.q_proj.base_layer
    model.delete_adapter("b")
    assert model.adapter_layers() == []
    assert model.base_model.model.layers[0].self_attn.q_proj is original_q
    assert torch.equal(logits(model, input_ids), base_logits)


# ---- bad input -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "qlora", "adapter", "prompt", "bitfit"])
def test_adapter_tensors_live_on_the_base_models_device(method):
    # the "meta" device stands in for a GPU: a tensor created without the base's device lands on the CPU
    make, config = {"lora": (tiny_llama, mp.LoRAConfig(r=2, target="all-linear")),
                    "qlora": (tiny_llama, QLoRAConfig(r=2)),  # 4-bit layers without bias: weights only in buffers
                    "adapter": (tiny_llama, mp.AdapterConfig(bottleneck=4, target=["o_proj"])),
                    "prompt": (tiny_llama, mp.PromptTuningConfig(num_virtual_tokens=3)),
                    "bitfit": (tiny_bert, mp.BitFitConfig())}[method]
    model = mp.wrap(make().to("meta"), config)
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}


def test_unknown_target_lists_existing_modules(llama):
    with pytest.raises(ValueError, match="matched no module") as e:
        mp.wrap(llama, lora(target=["qkv_proj"]))
    assert "q_proj" in str(e.value) and "down_proj" in str(e.value)
    with pytest.raises(ValueError, match=r"\['nope'\] matched no module"):
        mp.wrap(tiny_llama(), lora(target=["q_proj", "nope"]))
    with pytest.raises(ValueError, match="for a suffix pass a list"):
        mp.wrap(tiny_llama(), lora(target="q_proj"))
    with pytest.raises(ValueError, match="not a valid regex"):
        mp.wrap(tiny_llama(), lora(target="q_proj("))
    with pytest.raises(ValueError, match="can only wrap"):
        mp.wrap(tiny_llama(), lora(target=["norm"]))


def test_adapter_from_another_base_size(tmp_path):
    mp.wrap(tiny_llama(hidden=32), lora()).save_adapter(tmp_path)
    with pytest.raises(ValueError, match="does not fit this base model") as e:
        mp.load_adapter(tiny_llama(hidden=48), tmp_path)
    assert "model.layers.0.self_attn." in str(e.value) and "another base model" in str(e.value)


def test_adapter_from_another_model_type(tmp_path):
    mp.wrap(tiny_llama(), lora()).save_adapter(tmp_path)
    with pytest.raises(ValueError, match="trained on a 'llama' model; this base is 'gpt2'"):
        mp.load_adapter(tiny_gpt2(), tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_adapter_file_with_non_finite_values(tmp_path, bad):
    model = mp.wrap(tiny_llama(), lora())
    model.save_adapter(tmp_path)
    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    key = "model.layers.1.self_attn.v_proj.lora_A.weight"
    tensors[key][0, 0] = bad
    save_file(tensors, str(tmp_path / "adapter.safetensors"))
    with pytest.raises(ValueError, match="non-finite") as e:
        mp.load_adapter(tiny_llama(), tmp_path)
    assert key in str(e.value)


def test_loading_a_folder_that_is_not_an_adapter(tmp_path):
    tiny_llama().save_pretrained(tmp_path)  # a full model folder, not an adapter
    with pytest.raises(ValueError, match="is not a minipeft adapter folder"):
        mp.load_adapter(tiny_llama(), tmp_path)
    with pytest.raises(ValueError, match="is not a minipeft adapter folder"):
        mp.load_adapter(tiny_llama(), tmp_path / "missing")


def test_duplicate_and_unknown_adapter_names(llama):
    model = mp.wrap(llama, lora())
    with pytest.raises(ValueError, match="'default' already exists"):
        model.add_adapter("default", lora())
    with pytest.raises(ValueError, match="no adapter named 'x'; adapters: \\['default'\\]"):
        model.set_adapter("x")
    with pytest.raises(ValueError, match="identifier-like"):
        model.add_adapter("a.b", lora())
    with pytest.raises(ValueError, match="already wrapped"):
        mp.wrap(model, lora())
    # a failed add leaves the model as it was
    assert list(model.peft_config) == ["default"]


# ---- peft's documented behaviours that minipeft once got wrong (each test failed on the old spine) ------
def test_disable_after_merge_gives_the_base_model(bert, input_ids):
    base_logits = logits(tiny_bert(), input_ids)
    model = mp.wrap(bert, lora(r=2, target=["query", "value"], modules_to_save=["classifier"]))
    randomize_adapters(model)
    adapted = logits(model, input_ids)
    model.merge()
    with model.disable_adapter():
        assert torch.equal(logits(model, input_ids), base_logits)
    torch.testing.assert_close(logits(model, input_ids), adapted, atol=1e-5, rtol=0)  # merged again after


def test_loading_for_inference_gives_an_eval_mode_model(tmp_path, input_ids):
    model = mp.wrap(tiny_llama(), lora(dropout=0.5))
    randomize_adapters(model)
    model.save_adapter(tmp_path)
    loaded = mp.load_adapter(tiny_llama().train(), tmp_path)
    assert not loaded.training
    assert torch.equal(logits(loaded, input_ids), logits(loaded, input_ids))  # no dropout: deterministic
    assert mp.load_adapter(tiny_llama().train(), tmp_path, is_trainable=True).training


def test_adapters_with_different_modules_to_save_save_and_load(tmp_path, input_ids):
    model = mp.wrap(tiny_llama(), lora(modules_to_save=["lm_head"]))
    model.add_adapter("second", lora(target=["k_proj"]))
    randomize_adapters(model, "second")
    model.set_adapter("second")
    want = logits(model, input_ids)
    model.save_adapter(tmp_path, "second")
    assert not any("lm_head" in k for k in model.adapter_state_dict("second"))
    assert torch.equal(logits(mp.load_adapter(tiny_llama(), tmp_path), input_ids), want)


def test_wrapped_layers_expose_the_base_layers_attributes():
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                             num_heads=2, decoder_start_token_id=0)).eval()
    model = mp.wrap(t5, lora(target="all-linear"))  # T5's FFN reads self.wo.weight.dtype
    ids = torch.randint(0, 64, (1, 5))
    assert model(input_ids=ids, decoder_input_ids=ids).logits.shape == (1, 5, 64)
    layer = model.base_model.encoder.block[0].layer[1].DenseReluDense.wo
    assert layer.weight is layer.base_layer.weight and layer.in_features == 32


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer1 = nn.Linear(8, 8)
        self.layer3 = nn.Sequential()
        self.layer3.add_module("layer1", nn.Linear(8, 8))

    def forward(self, x):
        return self.layer3(self.layer1(x))


def test_targets_never_reach_inside_modules_to_save():
    model = mp.wrap(Nested(), lora(target=["layer1"], modules_to_save=["layer3"]))
    assert [p for p, layer in model.adapter_layers() if isinstance(layer, LoRALinear)] == ["layer1"]
    assert type(model.base_model.layer3.copies["default"].layer1) is nn.Linear


def test_targets_all_in_modules_to_save_and_container_modules_to_save_are_errors(bert):
    with pytest.raises(ValueError, match="matched no module once modules_to_save"):
        mp.wrap(bert, lora(target=["classifier"], modules_to_save=["classifier"]))
    with pytest.raises(ValueError, match="containers"):
        mp.wrap(tiny_bert(), lora(target=["query"], modules_to_save=["layer"]))  # bert.encoder.layer: ModuleList


def test_unload_gives_the_untouched_base(llama, input_ids):
    want = logits(tiny_llama(), input_ids)
    model = mp.wrap(llama, lora())
    randomize_adapters(model)
    model.merge()
    plain = model.unload()
    assert not any(isinstance(m, mp.AdapterLayer) for m in plain.modules())
    assert torch.equal(logits(plain, input_ids), want)


def test_safe_merge_refuses_non_finite_weights(llama, input_ids):
    model = mp.wrap(llama, lora())
    randomize_adapters(model)
    with torch.no_grad():
        model.base_model.model.layers[1].self_attn.v_proj.lora_B["default"].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite.*layers.1.self_attn.v_proj"):
        model.merge(safe_merge=True)
    assert not any(layer.merged_adapters for _, layer in model.adapter_layers())
    assert torch.equal(model.base_model.model.layers[1].self_attn.v_proj.base_layer.weight,
                       tiny_llama().model.layers[1].self_attn.v_proj.weight)


def test_exclude_leaves_modules_unwrapped(llama):
    model = mp.wrap(llama, lora(target="all-linear", exclude=["down_proj", "layers.0.self_attn.q_proj"]))
    paths = [p for p, _ in model.adapter_layers()]
    assert paths and not any(p.endswith("down_proj") for p in paths)
    assert "model.layers.0.self_attn.q_proj" not in paths and "model.layers.1.self_attn.q_proj" in paths
    assert all(layer.path == p for p, layer in model.adapter_layers())  # a layer knows where it is
    with pytest.raises(ValueError, match="exclude"):
        mp.wrap(tiny_llama(), lora(target=["q_proj"], exclude=["q_proj"]))


def test_trainer_adds_the_methods_extra_loss_and_runs_its_callbacks():
    from dataclasses import dataclass

    calls = []

    @dataclass
    class Tracked(mp.LoRAConfig):  # a method with a loss term and a schedule, as AdaLoRA has
        method = "tracked-test"  # not registered: the contract table lists registered methods only

        def extra_loss(self, model, name):
            return sum(p.pow(2).sum() for _, p in model.adapter_parameters(name)) * 0.0 + 1.0

        def training_callbacks(self, model, name):
            return [type("CB", (), {"on_optimizer_step": lambda self, trainer: calls.append(trainer.step)})()]

    model = mp.wrap(tiny_llama(), Tracked(target=["q_proj"]))
    data = [{"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([1, 2, 3])}] * 4
    collate = lambda b: {k: torch.stack([x[k] for x in b]) for k in b[0]}  # noqa: E731
    trainer = mp.Trainer(model, data, collate_fn=collate, max_steps=3, batch_size=2, progress=False, device="cpu")
    trainer.train()
    assert calls == [0, 1, 2]
    with torch.no_grad():
        plain = model(**collate(data[:2])).loss
    model.train()
    assert trainer.compute_loss(collate(data[:2])).item() == pytest.approx(plain.item() + 1.0, abs=1e-5)
    model.eval()
    assert model.extra_loss() is None  # only while training


def test_frozen_and_shared_adapter_tensors_stay_frozen_and_are_saved_once(tmp_path, input_ids):
    """A VeRA/LoRA-FA-like variant: one random A per model (a buffer in PeftModel.shared), B trained."""
    from dataclasses import dataclass

    class SharedA(LoRALinear):
        def add_adapter(self, name, config, shared=None):
            super().add_adapter(name, config)
            del self.lora_A[name].weight  # A is the shared, frozen matrix (sliced to this layer's width)
            self.lora_A[name].register_buffer("weight", shared.A[:, :self.in_features].clone())

    @dataclass
    class SharedAConfig(mp.LoRAConfig):
        method = "shared-a-test"  # not registered

        @property
        def layer_class(self):
            return SharedA

        def make_shared(self, model):
            shared = nn.Module()
            shared.register_buffer("A", torch.randn(self.r, 32, generator=torch.Generator().manual_seed(0)))
            return shared

    model = mp.wrap(tiny_llama(), SharedAConfig(r=2, target=["q_proj", "v_proj"]))
    model.add_adapter("other", SharedAConfig(r=2, target=["q_proj"]))
    for name in ("other", "default"):
        model.set_adapter(name)
    with model.disable_adapter():
        pass
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_B.default." in n for n in trainable)  # A never trains
    assert "shared.A" in model.adapter_state_dict("default")  # saved once, at the model level
    randomize_adapters(model, "default")
    model.save_adapter(tmp_path)
    state = load_file(str(tmp_path / "adapter.safetensors"))
    assert torch.equal(state["shared.A"], model.shared["default"].A)


def test_a_saved_config_with_an_unknown_field_is_refused():
    from minipeft.config import config_from_dict
    good = mp.LoRAConfig(r=4, target=["q_proj"]).to_dict()
    assert config_from_dict(good).to_dict() == good
    with pytest.raises(ValueError, match="unknown config field.*'rank'"):
        config_from_dict({**good, "rank": 4})  # a misspelt r would otherwise vanish and r stay 8
    with pytest.raises(ValueError, match="unknown PEFT method"):
        config_from_dict({**good, "method": "lorra"})
