"""Tasks: deterministic, disjoint splits, correct answers, metrics that agree with references."""
import random
import re

import pytest

from minipeft import data
from minipeft.data import arithmetic, corpus


@pytest.mark.parametrize("name", data.names())
def test_splits_deterministic_and_disjoint(name):
    key = "text" if data.get_task(name).kind == "classification" else "prompt"
    splits = {s: data.load(name, s) for s in data.SPLITS}
    assert splits["train"] == data.load(name, "train")  # same call, same list
    sets = {s: {ex[key] for ex in v} for s, v in splits.items()}
    for s, v in splits.items():
        assert len(sets[s]) == len(v) == data.get_task(name).sizes[data.SPLITS.index(s)]
    assert not sets["train"] & sets["test"]
    assert not sets["train"] & sets["validation"]
    assert not sets["validation"] & sets["test"]


def test_arithmetic_targets_are_correct():
    exs = data.load("arithmetic", "test")
    assert {ex["style"] for ex in exs} == set(arithmetic.STYLES)
    for ex in exs:
        assert ex["prompt"].startswith("Question: ") and ex["prompt"].endswith(" Answer:")
        value = None
        for step in ex["target"].split(","):  # evaluate each stated equation with Python
            lhs, rhs = step.split("=")
            assert eval(lhs.replace("/", "//")) == int(rhs)  # noqa: S307 (digits and + - * // only)
            assert re.fullmatch(r"[\d\s+\-*/]+", lhs)
            value = int(rhs)
        assert str(value) == ex["answer"] and 0 <= value <= corpus.MAX_NUM
        nums = [int(x) for x in re.findall(r"\d+", ex["prompt"])]
        assert all(0 <= x <= corpus.MAX_NUM for x in nums)


def test_arithmetic_metric():
    exs = data.load("arithmetic", "test", n=3)
    preds = [ex["target"] for ex in exs]
    assert data.get_task("arithmetic").metric(preds, exs)["exact_match"] == 100.0
    assert arithmetic.final_number(" 3 * 4 = 12 , 12 + 5 = 17 Question: 9") == "17"
    assert arithmetic.final_number("no number") is None
    with pytest.raises(ValueError):
        data.get_task("arithmetic").metric(preds[:2], exs)


def test_corpus_has_no_task_formats():
    text = "\n".join(corpus.generate_corpus(500))
    assert "Question" not in text and "Answer" not in text and "[" not in text
    assert "7 + 5 = 12 ." in corpus.arithmetic_facts()
    assert corpus.generate_corpus(20, seed=3) == corpus.generate_corpus(20, seed=3)
    assert corpus.generate_corpus(20, seed=3) != corpus.generate_corpus(20, seed=4)


def test_corpus_shares():
    rng = random.Random(0)
    for _ in range(200):  # a copy sentence repeats one of its numbers
        nums = re.findall(r"\d+", corpus._sentence(rng, copy_share=1.0))
        assert len(nums) > len(set(nums))
    assert corpus.generate_corpus(20) == corpus.generate_corpus(20, copy_share=0.0)
    facts = corpus.generate_corpus(50, fact_share=1.0)
    assert all(re.fullmatch(r"(\d+ [-+*/] \d+ = \d+ \.( |$))+", d + " ") for d in facts)
    with pytest.raises(ValueError):
        corpus.generate_corpus(5, fact_share=1.5)
    with pytest.raises(ValueError):
        corpus.generate_corpus(5, copy_share=-0.1)


def test_sentiment_balanced_with_negations():
    exs = data.load("sentiment", "train")
    pos = sum(ex["label"] for ex in exs) / len(exs)
    assert 0.4 < pos < 0.6
    assert any(" not " in ex["text"] and ex["label"] == 1 for ex in exs)
    acc = data.get_task("sentiment").metric([ex["label"] for ex in exs], exs)
    assert acc["accuracy"] == 100.0


def test_e2e_bleu_matches_sacrebleu():
    import sacrebleu

    exs = data.load("e2e", "test", n=20)
    assert all(re.match(r"name\[[^\]]+\] eatType\[", ex["prompt"]) for ex in exs)
    preds = [ex["references"][0] for ex in exs]
    assert data.get_task("e2e").metric(preds, exs)["bleu"] == pytest.approx(100.0)
    rng = random.Random(0)
    noisy = [" ".join(rng.sample(p.split(), len(p.split()))) for p in preds]
    refs = [[ex["references"][i] for ex in exs] for i in range(3)]
    assert data.get_task("e2e").metric(noisy, exs)["bleu"] == pytest.approx(sacrebleu.corpus_bleu(noisy, refs).score)


class _CharTok:
    """A stand-in tokenizer (one id per character) to test collation without the zoo."""

    pad_token_id, eos_token_id, bos_token_id = 0, 1, 2

    def __call__(self, text, add_special_tokens=True):
        ids = [3 + ord(c) % 50 for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


def test_causal_collate_masks_prompt_and_pads():
    tok = _CharTok()
    exs = [{"prompt": "ab", "target": "c"}, {"prompt": "abcd", "target": "efg"}]
    b = data.CausalLMCollator(tok)(exs)
    assert b["input_ids"].shape == (2, 9)
    assert b["labels"][0].tolist() == [-100, -100, -100, tok("c", False)["input_ids"][0], 1] + [-100] * 4
    assert b["attention_mask"][0].tolist() == [1] * 5 + [0] * 4  # right padding
    assert (b["labels"] != -100).sum().item() == 2 + 4  # targets + eos only
    g = data.left_pad_prompts(tok, ["ab", "abcd"])
    assert g["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1] * 5]  # left padding
    assert g["input_ids"][0, -1].item() == g["input_ids"][1, -3].item()


def test_bad_input():
    with pytest.raises(ValueError):
        data.load("glue")
    with pytest.raises(ValueError):
        data.load("arithmetic", "dev")
