"""Zoo: models build offline into a recipe-hashed cache and load through transformers' Auto classes.

Uses tiny overrides of the recipes (a few steps) in a temporary cache, so it runs in seconds.
"""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from minipeft import zoo

SMALL = {
    "tiny-llama": dict(n_docs=150, steps=3, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64,
                       vocab_size=400, batch_size=4),
    "tiny-bert": dict(n_docs=150, steps=3, hidden=32, layers=1, heads=2, intermediate=64, vocab_size=400,
                      batch_size=4, tune_steps=2),
}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIPEFT_CACHE", str(tmp_path))
    return tmp_path


def test_llama_builds_and_loads_with_auto_classes(cache, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    p = zoo.path("tiny-llama", **SMALL["tiny-llama"])
    assert "pretraining tiny-llama" in capsys.readouterr().out
    assert p.parent == cache and p.name.startswith("tiny-llama-")
    assert (p / "model.safetensors").exists() and not list(p.glob("*.bin"))  # no pickles
    assert zoo.path("tiny-llama", **SMALL["tiny-llama"]) == p  # cached: no rebuild
    assert "pretraining" not in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(p)
    tok = AutoTokenizer.from_pretrained(p)
    assert isinstance(model, LlamaForCausalLM) and model.config.hidden_size == 32
    assert not any(n.endswith("bias") for n, _ in model.named_parameters())  # Llama: no biases
    text = "Tom has 12 apples . 7 + 5 = 12 ."
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text  # round trip
    assert tok.convert_ids_to_tokens(tok(" 12", add_special_tokens=False)["input_ids"]) == ["Ġ1", "2"]
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    # a recipe change is a different cache entry
    assert zoo.path("tiny-llama", **{**SMALL["tiny-llama"], "seed": 1}) != p


def test_bert_tokenizer_and_classification_head(cache):
    from transformers import AutoTokenizer, BertForMaskedLM, BertForSequenceClassification, BertTokenizerFast

    p = zoo.path("tiny-bert", **SMALL["tiny-bert"])
    tok = AutoTokenizer.from_pretrained(p)
    assert isinstance(tok, BertTokenizerFast)
    enc = tok("The food was not good .")
    assert enc["input_ids"][0] == tok.cls_token_id and enc["input_ids"][-1] == tok.sep_token_id
    assert tok.decode(enc["input_ids"], skip_special_tokens=True) == "the food was not good."
    mlm = BertForMaskedLM.from_pretrained(p)
    assert any(n.endswith("bias") for n, _ in mlm.named_parameters())
    c1 = BertForSequenceClassification.from_pretrained(p, num_labels=2)
    # the encoder weights are the pretrained ones
    torch.testing.assert_close(c1.bert.embeddings.word_embeddings.weight, mlm.bert.embeddings.word_embeddings.weight)
    # the pooler the head reads is the pretrained one (trained by the next-clause objective), not a fresh init
    from safetensors.torch import load_file
    saved = load_file(str(p / "model.safetensors"))
    torch.testing.assert_close(c1.bert.pooler.dense.weight, saved["bert.pooler.dense.weight"])
    assert json.loads((p / "zoo_build.json").read_text())["next_clause_loss"] > 0


def test_next_clause_targets_are_content_words(cache):
    import random

    from transformers import BertTokenizerFast

    from minipeft.data.corpus import opinion_pair

    first, second = opinion_pair(random.Random(3))
    assert first.endswith(" .") and second.endswith(" .")
    tok = BertTokenizerFast.from_pretrained(zoo.path("tiny-bert", **SMALL["tiny-bert"]))
    pairs = zoo._next_clause_pairs(tok, ["Tom has 3 pens . So he was happy ."], [], random.Random(0))
    words = tok.convert_ids_to_tokens(pairs[0]["next"])
    assert "happy" in words and not {"so", "he", "was", ".", "tom"} & set(words)
    assert pairs[0]["clause"][0] == tok.cls_token_id and pairs[0]["clause"][-1] == tok.sep_token_id


def test_load_uses_cache_and_fresh_head_is_seeded(cache, monkeypatch, capsys):
    monkeypatch.setitem(zoo.RECIPES, "tiny-bert", zoo.recipe("tiny-bert", **SMALL["tiny-bert"]))
    from transformers.utils import logging

    m1, tok = zoo.load("tiny-bert", num_labels=2, seed=0)
    capsys.readouterr()
    m2, _ = zoo.load("tiny-bert", num_labels=2, seed=0)
    assert "Loading weights" not in capsys.readouterr().err  # a local zoo model loads quietly...
    assert logging.is_progress_bar_enabled()  # ...and hub downloads keep their progress bars
    m3, _ = zoo.load("tiny-bert", num_labels=2, seed=1)
    torch.testing.assert_close(m1.classifier.weight, m2.classifier.weight)
    assert not torch.equal(m1.classifier.weight, m3.classifier.weight)
    assert m1.config.num_labels == 2 and tok.pad_token_id is not None
    with pytest.raises(ValueError):
        zoo.recipe("tiny-bert", hiddden=3)
    with pytest.raises(ValueError):
        zoo.path("tiny-gpt")
    # optional keys are accepted, and hashed only when a recipe sets them
    base = zoo.recipe("tiny-llama")
    assert "copy_share" not in base
    assert zoo.key("tiny-llama", zoo.recipe("tiny-llama", copy_share=0.3)) != zoo.key("tiny-llama", base)
    assert zoo.names() == ["tiny-llama", "tiny-bert"]


def test_parallel_builds_do_not_collide(cache):
    """Two processes ask for the same model at once: one builds, the other waits for it."""
    code = textwrap.dedent(f"""
        from minipeft import zoo
        print(zoo.path("tiny-llama", **{SMALL['tiny-llama']!r}))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**__import__("os").environ, "MINIPEFT_CACHE": str(cache)}) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum("pretraining" in o for o in outs) == 1  # built once
    assert outs[0].splitlines()[-1] == outs[1].splitlines()[-1]
    entries = [q for q in cache.iterdir() if not q.name.startswith(".")]
    assert len(entries) == 1  # no half-built temporaries left behind
    assert not [q for q in cache.iterdir() if q.is_dir() and q.name.startswith(".")]


@pytest.mark.parametrize("name", list(SMALL))
def test_build_gives_the_same_weights_whatever_the_thread_count(name, tmp_path):
    """Float sums depend on how work is split between threads; the build pins its own thread count, so a
    laptop, CI and Colab get the same weights (the full-size model, a few steps: enough to differ)."""
    from safetensors.torch import load_file
    before = torch.get_num_threads()
    weights = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            zoo.build(name, tmp_path / str(threads), n_docs=300, steps=5)
            assert torch.get_num_threads() == threads  # restored after the build
            weights.append(load_file(str(tmp_path / str(threads) / "model.safetensors")))
    finally:
        torch.set_num_threads(before)
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_killed_build_leaves_no_temporary_folder_behind(cache):
    stale = cache / f".{zoo.key('tiny-llama', zoo.recipe('tiny-llama', **SMALL['tiny-llama']))}.abc123"
    stale.mkdir()
    zoo.path("tiny-llama", **SMALL["tiny-llama"])
    assert not stale.exists()
