"""One contract for every registered method: a new method is checked by adding one row to CASES.

For each method: it starts at the base model (or its stated near-identity), only its own tensors train,
save → load is bit-exact (and the loaded model is frozen and in eval mode), adapters can be added,
switched, disabled and deleted, merged ≡ unmerged with an exact unmerge where it merges (disabled while
merged gives the base), and an invalid value raises a ValueError that names the field.
"""
import copy

import pytest
import torch
from conftest import tiny_bert, tiny_llama

import minipeft as mp
from minipeft.selective import SparseConfig

QUERY_W = "bert.encoder.layer.0.attention.self.query.weight"

# a few labelled examples for FISH's Fisher scores (tiny_bert: vocab 64, 3 labels)
FISH_EXAMPLES = [{"input_ids": [(7 * i + j) % 64 for j in range(6)], "label": i % 3} for i in range(4)]


def fish_collate(examples):
    return {"input_ids": torch.tensor([e["input_ids"] for e in examples]),
            "labels": torch.tensor([e["label"] for e in examples])}


# method: (base builder, config factory(seed) for a first and a second adapter, start, merge atol, bad value)
# start: "exact" (adapter output == base output), "near" (close to it), None (changes the input: no claim)
CASES = {
    "lora": (tiny_llama, lambda i: mp.LoRAConfig(r=2 + i, target=["q_proj", "v_proj"]), "exact", 1e-5,
             ({"r": 0}, "r")),
    "dora": (tiny_llama, lambda i: mp.DoRAConfig(r=2 + i, target=["q_proj", "down_proj"]), "exact", 1e-5,
             ({"detach_norm": "yes"}, "detach_norm")),
    "adalora": (tiny_llama, lambda i: mp.AdaLoRAConfig(init_r=4 + i, target_r=2, target=["q_proj", "down_proj"]),
                "exact", 1e-5, ({"target_r": 13}, "target_r")),
    "melora": (tiny_llama, lambda i: mp.MELoRAConfig(r=2 + i, n=4 - 2 * i, target=["q_proj", "down_proj"]),
               "exact", 1e-5, ({"n": 0}, "n")),
    "moslora": (tiny_llama, lambda i: mp.MoSLoRAConfig(r=2 + i, target=["q_proj", "down_proj"]), "exact", 1e-5,
                ({"r": -1}, "r")),
    "monteclora": (tiny_llama, lambda i: mp.MonteCLoRAConfig(r=2 + i, num_samples=4 + i,
                                                            target=["q_proj", "down_proj"]), "exact", 1e-5,
                   ({"num_samples": 0}, "num_samples")),
    "lora_fa": (tiny_llama, lambda i: mp.LoRAFAConfig(r=2 + i, target=["q_proj", "down_proj"]), "exact", 1e-5,
                ({"r": 0}, "r")),
    "vera": (tiny_llama, lambda i: mp.VeRAConfig(r=4 + i, projection_prng_key=i, target=["q_proj", "down_proj"]),
             "exact", 1e-5, ({"d_initial": float("nan")}, "d_initial")),
    "rocoft": (tiny_llama, lambda i: mp.RoCoFTConfig(k=1 + i, mode=("rows", "columns")[i],
                                                     select=("first", "random")[i], target=["q_proj", "down_proj"]),
               "exact", 1e-5, ({"k": 0}, "k")),
    "propulsion": (tiny_llama, lambda i: mp.PropulsionConfig(k=5 + i, target=["q_proj", "down_proj", "embed_tokens"]),
                   "exact", 1e-5, ({"k": 0}, "k")),
    "qlora": (tiny_llama, lambda i: mp.QLoRAConfig(r=2 + i, dropout=0.0), "exact", None,
              ({"blocksize": 3}, "blocksize")),
    # i=0: Houlsby (sequential) on attention; i=1: He et al.'s scaled parallel adapter on the FFN
    "adapter": (tiny_llama, lambda i: mp.AdapterConfig(bottleneck=4 + i, placement=("attention", "ffn")[i],
                                                       form=("sequential", "parallel")[i], scale=1.0 + 3 * i),
                "near", None, ({"bottleneck": -1}, "bottleneck")),
    "ia3": (tiny_llama, lambda i: mp.IA3Config(target=["k_proj", "v_proj", "down_proj"],
                                               feedforward=[["down_proj"], []][i]),
            "exact", 1e-5, ({"feedforward": 3}, "feedforward")),
    "prompt_tuning": (tiny_llama, lambda i: mp.PromptTuningConfig(num_virtual_tokens=3 + i), None, None,
                      ({"num_virtual_tokens": 0}, "num_virtual_tokens")),
    # the second adapter trains through the MLP; the first is the saved form (P itself): tests/test_prefix_tuning.py
    "prefix_tuning": (tiny_llama, lambda i: mp.PrefixTuningConfig(num_virtual_tokens=3 + i, prefix_projection=i == 1),
                      None, None, ({"num_virtual_tokens": 0}, "num_virtual_tokens")),
    "p_tuning": (tiny_llama, lambda i: mp.PTuningConfig(num_virtual_tokens=3 + i, encoder_type=("mlp", "lstm")[i],
                                                      encoder_hidden_size=8), None, None,
                 ({"encoder_type": "gru"}, "encoder_type")),
    "bitfit": (tiny_bert, lambda i: mp.BitFitConfig(target=None if i == 0 else ["query"],
                                                    modules_to_save=["classifier"]), "exact", 1e-5,
               ({"target": 3}, "target")),
    "sparse": (tiny_bert, lambda i: SparseConfig(selection={QUERY_W: [0, 5, 7 + i]}), "exact", 1e-5,
               ({"selection": {}}, "selection")),
    "fish": (tiny_bert, lambda i: mp.FISHConfig(density=0.01 + 0.01 * i, n_samples=4, examples=FISH_EXAMPLES,
                                                collate=fish_collate, modules_to_save=["classifier"]), "exact", 1e-5,
             ({"density": 0.01, "fisher": "x"}, "fisher")),
    "pafi": (tiny_bert, lambda i: mp.PaFiConfig(density=0.01, magnitude=("smallest", "largest")[i],
                                                modules_to_save=["classifier"]), "exact", 1e-5,
             ({"density": 0.01, "magnitude": "x"}, "magnitude")),
    # a fresh ID3 adapter has an empty mask (it grows while training: tests/test_id3.py); this is the saved form
    "id3": (tiny_bert, lambda i: mp.ID3Config(selection={QUERY_W: 3 + i}), "exact", 1e-5,
            ({"budget": 3, "eps": 0}, "eps")),
    "random_mask": (tiny_bert, lambda i: mp.RandomMaskConfig(density=0.01, seed=i, modules_to_save=["classifier"]),
                    "exact", 1e-5, ({"density": 0}, "density")),
}


def test_every_registered_method_is_in_the_contract():
    assert set(CASES) == set(mp.REGISTRY)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def perturb(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.adapter_parameters(name):
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture
def ids():
    return torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", list(CASES))
def test_starts_at_the_base(method, ids):
    build, config, start, _, _ = CASES[method]
    model = mp.wrap(build(), config(0))
    with model.disable_adapter():
        base = logits(model, ids)
    if start == "exact":
        assert torch.equal(logits(model, ids), base)
    elif start == "near":
        torch.testing.assert_close(logits(model, ids), base, atol=0.05, rtol=0)


@pytest.mark.parametrize("method", list(CASES))
def test_only_adapter_tensors_train(method, ids):
    build, config, *_ = CASES[method]
    model = mp.wrap(build(), config(0))
    mine = {f"base_model.{n}" if not n.startswith(("input_adapters.", "shared.")) else n
            for n, _ in model.adapter_parameters("default")}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable == mine
    frozen = {n: t.clone() for n, t in model.state_dict().items() if n not in mine}
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model(input_ids=ids, labels=ids if build is tiny_llama else torch.tensor([0, 2]))
    out.loss.backward()
    opt.step()
    assert all(torch.equal(frozen[n], t) for n, t in model.state_dict().items() if n in frozen)


@pytest.mark.parametrize("method", list(CASES))
def test_save_load_is_bit_exact_frozen_and_in_eval_mode(method, ids, tmp_path):
    build, config, *_ = CASES[method]
    model = mp.wrap(build(), config(0))
    perturb(model, "default", 0)
    want = logits(model.eval(), ids)
    model.save_adapter(tmp_path)
    loaded = mp.load_adapter(build(), tmp_path)
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(logits(loaded, ids), want)
    assert loaded.peft_config["default"].to_dict() == model.peft_config["default"].to_dict()
    trainable = mp.load_adapter(build(), tmp_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", list(CASES))
def test_add_switch_disable_delete(method, ids):
    build, config, *_ = CASES[method]
    base = build()
    plain, original_keys = logits(base, ids), set(base.state_dict())
    model = mp.wrap(base, config(0))
    with model.disable_adapter():
        prepared = logits(model, ids)  # the base as the method left it (QLoRA: quantized)
    perturb(model, "default", 0)
    first = logits(model, ids)
    model.add_adapter("second", config(1))  # the active adapter stays active (as peft)
    assert model.active_adapter == "default" and torch.equal(logits(model, ids), first)
    perturb(model, "second", 1)
    assert not any(p.requires_grad for _, p in model.adapter_parameters("second"))
    model.set_adapter("second")
    assert all(p.requires_grad for _, p in model.adapter_parameters("second"))
    assert not any(p.requires_grad for _, p in model.adapter_parameters("default"))
    assert not torch.equal(logits(model, ids), first)
    with model.disable_adapter():
        assert torch.equal(logits(model, ids), prepared)
    model.delete_adapter("second")
    assert model.active_adapter == "default" and torch.equal(logits(model, ids), first)
    model.delete_adapter("default")
    assert model.adapter_layers() == [] and torch.equal(logits(model, ids), prepared)
    if method != "qlora":  # every other method leaves the base as it found it
        assert set(model.base_model.state_dict()) == original_keys and torch.equal(prepared, plain)


@pytest.mark.parametrize("method", [m for m in CASES if CASES[m][3] is not None or m == "qlora"])
def test_merge_is_the_same_function_and_unmerge_is_exact(method, ids):
    build, config, _, atol, _ = CASES[method]
    model = mp.wrap(build(), config(0))
    perturb(model, "default", 0)
    with model.disable_adapter():
        base = logits(model, ids)
    before_state = copy.deepcopy(model.base_model.state_dict())
    want = logits(model, ids)
    model.merge()
    if atol is not None:  # QLoRA re-quantizes: lossy, measured in test_qlora
        torch.testing.assert_close(logits(model, ids), want, atol=atol, rtol=0)
    with model.disable_adapter():  # disabling a merged adapter gives the base model
        assert torch.equal(logits(model, ids), base)
    model.unmerge()
    after_state = model.base_model.state_dict()
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state)
    assert torch.equal(logits(model, ids), want)


@pytest.mark.parametrize("method", [m for m in CASES if CASES[m][3] is None and m != "qlora"])
def test_methods_that_cannot_merge_say_so(method):
    build, config, *_ = CASES[method]
    with pytest.raises(ValueError, match="cannot be merged|nothing to merge"):
        mp.wrap(build(), config(0)).merge()


@pytest.mark.parametrize("method", list(CASES))
def test_invalid_config_value_names_the_field(method):
    _, _, _, _, (bad, field) = CASES[method]
    with pytest.raises(ValueError, match=field):
        mp.REGISTRY[method](**bad)
