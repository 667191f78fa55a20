"""peft's adapter format, both ways, against peft itself (a reference nobody here wrote):

  ours → save_adapter(dir, format="peft") → peft.PeftModel.from_pretrained(base, dir): the same logits;
  peft (random adapter tensors, so B = 0 hides nothing) → save_pretrained(dir) → mp.load_adapter(base, dir):
  the same logits as peft's model.

Plus the refusals: methods and options one side cannot represent, unknown / missing keys, shape mismatches,
pickled weights. Run with -s to see the measured max |logit difference| per case.
"""
import json

import pytest
import torch
from conftest import VOCAB, tiny_bert, tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForSequenceClassification

import minipeft as mp

peft = pytest.importorskip("peft")

TOL = 1e-5
RANKS, ALPHAS = {"down_proj": 6, r"layers\.0\.self_attn\.q_proj": 2}, {"v_proj": 3}  # per-module r and alpha


def tiny_llama_cls(seed: int = 0):
    """A Llama classifier: its new head is `score` (peft's SEQ_CLS modules_to_save)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, num_labels=3,
                      pad_token_id=0)
    return LlamaForSequenceClassification(cfg).eval()


def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, VOCAB, (2, 7), generator=g)
    return {"input_ids": x, "attention_mask": torch.ones_like(x)}


def logits(model):
    with torch.no_grad():
        return model(**batch()).logits


def randomize(params, seed=0):
    """Random values for every given tensor: an adapter at its init (B = 0, l = 1) would hide mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.ndim == 1 else 0.0))


def max_diff(a, b) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def changes_the_base(adapted, make) -> bool:
    """The adapter changes the output (so the equality checks can fail); prompt tuning's logits also cover its
    virtual tokens: compare the input's positions."""
    base = logits(make())
    return max_diff(adapted[..., -base.shape[-2]:, :] if adapted.dim() == 3 else adapted, base) > 1e-2


# ---- ours → peft ----------------------------------------------------------------------------------------
OURS = {  # base builder, our config
    "lora": (tiny_llama, lambda: mp.LoRAConfig(r=4, alpha=8, target=["q_proj", "v_proj"])),
    "lora-rslora-patterns": (tiny_llama, lambda: mp.LoRAConfig(r=4, alpha=8, rslora=True, target="all-linear",
                                                               rank_pattern=RANKS, alpha_pattern=ALPHAS)),
    "lora-embedding": (tiny_llama, lambda: mp.LoRAConfig(r=2, alpha=4, target=["embed_tokens", "q_proj"])),
    "lora-gpt2-conv1d": (tiny_gpt2, lambda: mp.LoRAConfig(r=4, alpha=8, target=["c_attn", "c_proj", "c_fc"])),
    "lora-bert-cls": (tiny_bert, lambda: mp.LoRAConfig(r=2, alpha=4, target=["query", "value"],
                                                       modules_to_save=["classifier"])),
    "lora-llama-score": (tiny_llama_cls, lambda: mp.LoRAConfig(r=2, alpha=4, modules_to_save=["score"])),
    "dora": (tiny_llama, lambda: mp.DoRAConfig(r=4, alpha=8, target=["q_proj", "v_proj", "down_proj"])),
    "adalora": (tiny_llama, lambda: mp.AdaLoRAConfig(init_r=4, target_r=2, total_step=10, alpha=8,
                                                     target=["q_proj", "v_proj"])),
    "ia3": (tiny_llama, lambda: mp.IA3Config()),
    "ia3-gpt2": (tiny_gpt2, lambda: mp.IA3Config()),
    "vera": (tiny_llama, lambda: mp.VeRAConfig(r=4, target=["q_proj", "v_proj", "down_proj"])),
    "vera-seed-only": (tiny_llama, lambda: mp.VeRAConfig(r=4, save_projection=False)),
    "prompt_tuning": (tiny_llama, lambda: mp.PromptTuningConfig(num_virtual_tokens=3)),
    "prompt_tuning-bert-cls": (tiny_bert, lambda: mp.PromptTuningConfig(num_virtual_tokens=3,
                                                                        modules_to_save=["classifier"])),
    "prefix_tuning": (tiny_llama, lambda: mp.PrefixTuningConfig(num_virtual_tokens=3)),
    "prefix_tuning-mlp": (tiny_llama, lambda: mp.PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True)),
}


@pytest.mark.parametrize("case", list(OURS))
def test_ours_saved_as_peft_loads_in_peft_to_the_same_logits(case, tmp_path):
    make, config = OURS[case]
    ours = mp.wrap(make(), config()).eval()
    randomize(p for _, p in ours.adapter_parameters("default"))
    ours.save_adapter(tmp_path, format="peft")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    mine = logits(ours)
    assert changes_the_base(mine, make)
    diff = max_diff(mine, logits(theirs))
    print(f"\n[ours→peft] {case}: max |logit diff| = {diff:.2e}")
    assert diff <= TOL


# ---- peft → ours ----------------------------------------------------------------------------------------
PEFT = {  # base builder, peft's config, save_pretrained kwargs
    "lora": (tiny_llama, lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "lora-rslora-patterns": (tiny_llama, lambda: peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                                                 target_modules="all-linear", rank_pattern=RANKS,
                                                                 alpha_pattern=ALPHAS)),
    "lora-regex-exclude": (tiny_llama, lambda: peft.LoraConfig(r=2, target_modules=r".*\.(q|k|up)_proj",
                                                               exclude_modules=["layers.1.self_attn.k_proj"])),
    "lora-all-linear-exclude": (tiny_llama, lambda: peft.LoraConfig(r=2, target_modules="all-linear",
                                                                    exclude_modules=["down_proj"])),
    "lora-embedding": (tiny_llama, lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens",
                                                                                              "q_proj"])),
    "lora-gpt2-conv1d": (tiny_gpt2, lambda: peft.LoraConfig(r=4, lora_alpha=8, fan_in_fan_out=True,
                                                            target_modules=["c_attn", "c_proj", "c_fc"])),
    "lora-bert-cls": (tiny_bert, lambda: peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4,
                                                         target_modules=["query", "value"])),
    "lora-llama-score": (tiny_llama_cls, lambda: peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4,
                                                                 target_modules=["q_proj", "v_proj"])),
    "dora": (tiny_llama, lambda: peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                 target_modules=["q_proj", "v_proj", "down_proj"])),
    "adalora": (tiny_llama, lambda: peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, lora_alpha=8,
                                                       target_modules=["q_proj", "v_proj"])),
    "ia3": (tiny_llama, lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                               feedforward_modules=["down_proj"])),
    "vera": (tiny_llama, lambda: peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    "vera-seed-only": (tiny_llama, lambda: peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                           save_projection=False)),
    "prompt_tuning": (tiny_llama, lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    "prompt_tuning-bert-cls": (tiny_bert, lambda: peft.PromptTuningConfig(task_type="SEQ_CLS",
                                                                          num_virtual_tokens=3)),
    "p_tuning": (tiny_llama, lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    "prefix_tuning": (tiny_llama, lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    "prefix_tuning-mlp": (tiny_llama, lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                                      prefix_projection=True)),
}


def peft_saved(case, path, **save_kwargs):
    """peft's model for `case` with random adapter tensors, saved to `path`."""
    make, config = PEFT[case]
    theirs = peft.get_peft_model(make(), config())
    randomize(p for p in theirs.parameters() if p.requires_grad)
    theirs.save_pretrained(path, save_embedding_layers=False, **save_kwargs)
    return theirs.eval()


@pytest.mark.parametrize("case", list(PEFT))
def test_peft_saved_loads_here_to_the_same_logits(case, tmp_path):
    theirs = peft_saved(case, tmp_path)
    make = PEFT[case][0]
    ours = mp.load_adapter(make(), tmp_path)
    assert changes_the_base(logits(ours), make)
    diff = max_diff(logits(ours), logits(theirs))
    print(f"\n[peft→ours] {case}: max |logit diff| = {diff:.2e}")
    assert diff <= TOL
    # and back: our peft-format save of what we loaded is what peft saved (same keys, same tensors)
    if case not in ("p_tuning", "prefix_tuning-mlp"):  # those come back as prompt tuning / projection-free P
        ours.save_adapter(tmp_path / "again", format="peft")
        a, b = load_file(str(tmp_path / "adapter_model.safetensors")), load_file(
            str(tmp_path / "again" / "adapter_model.safetensors"))
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_model_load_adapter_adds_a_peft_adapter_beside_ours(tmp_path):
    theirs = peft_saved("lora", tmp_path)
    ours = mp.wrap(tiny_llama(), mp.IA3Config(target=["k_proj"], feedforward=[]))
    ours.load_adapter(tmp_path, "from_peft")
    ours.set_adapter("from_peft")
    assert max_diff(logits(ours.eval()), logits(theirs)) <= TOL
    assert set(ours.peft_config) == {"default", "from_peft"}


# AdaLoRA after pruning: peft saves only the kept triplets (rank_pattern says which); we keep r_init rows
MASKS = {"model.layers.0.self_attn.q_proj": [True, False, True, False],
         "model.layers.1.self_attn.v_proj": [False, False, False, True]}


def test_pruned_adalora_ours_to_peft(tmp_path):
    ours = mp.wrap(tiny_llama(), OURS["adalora"][1]()).eval()
    randomize(p for _, p in ours.adapter_parameters("default"))
    ours.peft_config["default"].rank_pattern = MASKS
    with torch.no_grad():  # what the rank allocator does: a pruned triplet has λ = 0
        for path, mask in MASKS.items():
            ours.base_model.get_submodule(path).lora_E["default"][~torch.tensor(mask)] = 0.0
    ours.save_adapter(tmp_path, format="peft")
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert saved["base_model.model.model.layers.1.self_attn.v_proj.lora_A"].shape == (1, 32)  # sliced
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    diff = max_diff(logits(ours), logits(theirs))
    print(f"\n[ours→peft] adalora pruned: max |logit diff| = {diff:.2e}")
    assert diff <= TOL


def test_pruned_adalora_peft_to_ours(tmp_path):
    make, config = PEFT["adalora"]
    theirs = peft.get_peft_model(make(), config())
    randomize(p for p in theirs.parameters() if p.requires_grad)
    theirs.peft_config["default"].rank_pattern = {f"{k}.lora_E.default": m for k, m in MASKS.items()}
    with torch.no_grad():
        for path, mask in MASKS.items():
            theirs.base_model.model.get_submodule(path).lora_E["default"][~torch.tensor(mask)] = 0.0
    theirs.save_pretrained(tmp_path)
    ours = mp.load_adapter(make(), tmp_path)
    assert ours.peft_config["default"].rank_pattern == MASKS
    diff = max_diff(logits(ours), logits(theirs.eval()))
    reloaded = max_diff(logits(ours), logits(peft.PeftModel.from_pretrained(make(), tmp_path).eval()))
    print(f"\n[peft→ours] adalora pruned: max |logit diff| = {diff:.2e} (vs peft reloaded {reloaded:.2e})")
    assert diff <= TOL and reloaded <= TOL


# ---- refusals -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config, words", [
    (lambda: mp.AdapterConfig(), "adapter cannot be saved in peft's format"),
    (lambda: mp.AdaLoRAConfig(target=["q_proj"]), "total_step=None"),
    (lambda: mp.LoRAFAConfig(target=["q_proj"]), "lora_fa"),
    (lambda: mp.MoSLoRAConfig(target=["q_proj"]), "moslora"),
    (lambda: mp.PTuningConfig(num_virtual_tokens=2), "p_tuning"),
    (lambda: mp.DoRAConfig(target=["q_proj"], detach_norm=False), "detach_norm"),
])
def test_methods_and_options_peft_cannot_store_are_refused(config, words, tmp_path):
    model = mp.wrap(tiny_llama(), config())
    with pytest.raises(ValueError, match=words):
        model.save_adapter(tmp_path, format="peft")
    assert not (tmp_path / "adapter_config.json").exists()


def test_unknown_format_is_refused(tmp_path):
    model = mp.wrap(tiny_llama(), mp.LoRAConfig(target=["q_proj"]))
    with pytest.raises(ValueError, match="format must be 'minipeft' or 'peft'.*'onnx'"):
        model.save_adapter(tmp_path, format="onnx")


def edit_config(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def edit_tensors(path, change):
    tensors = load_file(str(path / "adapter_model.safetensors"))
    change(tensors)
    save_file({k: v.clone() for k, v in tensors.items()}, str(path / "adapter_model.safetensors"))


KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize("changes, words", [
    (dict(bias="all"), "bias='all'"),
    (dict(layers_to_transform=[0]), "layers_to_transform"),
    (dict(init_lora_weights="pissa"), "init_lora_weights='pissa'"),
    (dict(megatron_config={"tensor_model_parallel_size": 2}), "megatron_config"),
    (dict(loftq_config={"loftq_bits": 4}), "loftq_config"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out=True"),
    (dict(some_new_option=3), "'some_new_option'=3 is unknown"),
    (dict(peft_type="LOHA"), "peft_type 'LOHA' is not supported"),
    (dict(r=2), "has shape"),
])
def test_peft_options_we_cannot_honour_are_refused(changes, words, tmp_path):
    peft_saved("lora", tmp_path)
    edit_config(tmp_path, **changes)
    base = tiny_llama()
    with pytest.raises(ValueError, match=words):
        mp.load_adapter(base, tmp_path)
    assert not any("lora" in n for n, _ in base.named_modules())  # nothing left behind on the base


def test_peft_defaults_that_change_nothing_are_accepted(tmp_path):
    theirs = peft_saved("lora", tmp_path)
    edit_config(tmp_path, some_new_option=None, megatron_core="other.core", qalora_group_size=64)
    assert max_diff(logits(mp.load_adapter(tiny_llama(), tmp_path)), logits(theirs)) <= TOL


def test_use_dora_on_an_embedding_is_refused(tmp_path):
    peft_saved("lora-embedding", tmp_path)
    edit_config(tmp_path, use_dora=True)
    with pytest.raises(ValueError, match="use_dora=True on an embedding"):
        mp.load_adapter(tiny_llama(), tmp_path)


@pytest.mark.parametrize("change, words", [
    (lambda t: t.pop(KEY), "missing.*q_proj.lora_A.weight"),
    (lambda t: t.update({KEY.replace("q_proj", "k_proj"): t[KEY]}), "modules it does not have.*k_proj"),
    (lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight": t[KEY]}), "lora_C"),
    (lambda t: t.update({"stray": t[KEY]}), "outside the model.*stray"),
    (lambda t: t.update({KEY: t[KEY][:, :-1]}), "has shape"),
])
def test_unknown_missing_or_misshapen_tensors_are_refused(change, words, tmp_path):
    peft_saved("lora", tmp_path)
    edit_tensors(tmp_path, change)
    with pytest.raises(ValueError, match=words):
        mp.load_adapter(tiny_llama(), tmp_path)


def test_a_saved_embedding_matrix_is_refused(tmp_path):
    make, config = PEFT["lora-embedding"]
    theirs = peft.get_peft_model(make(), config())
    theirs.save_pretrained(tmp_path, save_embedding_layers=True)  # peft's default when an embedding is targeted
    with pytest.raises(ValueError, match="whole embedding matrix.*save_embedding_layers"):
        mp.load_adapter(tiny_llama(), tmp_path)


def test_prompt_tensor_other_than_prompt_embeddings_is_refused(tmp_path):
    peft_saved("prompt_tuning", tmp_path)
    edit_tensors(tmp_path, lambda t: t.update({"extra": t["prompt_embeddings"]}))
    with pytest.raises(ValueError, match="exactly 'prompt_embeddings'.*extra"):
        mp.load_adapter(tiny_llama(), tmp_path)


def test_pickled_weights_are_never_read(tmp_path, monkeypatch):
    peft_saved("lora", tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists()
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(ValueError, match="adapter_model.bin, a pickle; minipeft never unpickles"):
        mp.load_adapter(tiny_llama(), tmp_path)


def test_our_own_format_is_unchanged(tmp_path):
    model = mp.wrap(tiny_llama(), mp.LoRAConfig(r=2, target=["q_proj"])).eval()
    randomize(p for _, p in model.adapter_parameters("default"))
    model.save_adapter(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    assert torch.equal(logits(mp.load_adapter(tiny_llama(), tmp_path)), logits(model))
