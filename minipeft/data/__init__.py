"""Downstream tasks the zoo models were not pretrained on, with their metrics.

>>> train = load("arithmetic", "train")          # list of dicts
>>> task = get_task("arithmetic")                 # kind, metric, collate helpers
>>> task.metric(predictions, load("arithmetic", "test"))

Every task is generated deterministically from a fixed seed: one pool of distinct examples is
drawn and cut into train / validation / test, so no prompt appears in two splits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import arithmetic, e2e, sentiment
from .collate import IGNORE, CausalLMCollator, ClassificationCollator, encode_causal, left_pad_prompts
from .corpus import generate_corpus

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Task:
    name: str
    kind: str                  # "generation" (causal LM, greedy decoding) or "classification"
    generate: Callable         # generate(n, seed) -> list of distinct examples
    metric: Callable           # metric(predictions, examples) -> dict of numbers (in %, or BLEU)
    metric_name: str           # the headline key of metric's dict
    sizes: tuple[int, int, int]  # train, validation, test
    max_new_tokens: int = 0    # generation budget for evaluate()
    num_labels: int = 0
    seed: int = 1234


TASKS = {
    "arithmetic": Task("arithmetic", "generation", arithmetic.generate, arithmetic.exact_match,
                       "exact_match", (3000, 200, 500), max_new_tokens=32),
    "sentiment": Task("sentiment", "classification", sentiment.generate, sentiment.accuracy,
                      "accuracy", (2000, 200, 500), num_labels=2),
    # the same sentences, the label generated as a word (" good" / " bad") by a causal LM
    "sentiment_words": Task("sentiment_words", "generation", sentiment.generate_words, sentiment.word_accuracy,
                            "accuracy", (2000, 200, 500), max_new_tokens=8, num_labels=2),
    "e2e": Task("e2e", "generation", e2e.generate, e2e.bleu, "bleu", (1500, 100, 200),
                max_new_tokens=80),
}


def names() -> list[str]:
    return list(TASKS)


def get_task(name: str) -> Task:
    if isinstance(name, Task):
        return name
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {names()}")
    return TASKS[name]


def load(name: str, split: str = "train", n: int | None = None) -> list[dict]:
    """The examples of one split (the first ``n`` of them if given). Same call, same list."""
    task = get_task(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    pool = task.generate(sum(task.sizes), task.seed)
    i = SPLITS.index(split)
    start = sum(task.sizes[:i])
    out = pool[start:start + task.sizes[i]]
    return out[:n] if n is not None else out


def collator(name: str, tokenizer, **kw):
    """The training ``collate_fn`` that fits the task's kind."""
    task = get_task(name)
    return CausalLMCollator(tokenizer, **kw) if task.kind == "generation" else ClassificationCollator(tokenizer, **kw)


__all__ = ["Task", "TASKS", "SPLITS", "names", "get_task", "load", "collator", "CausalLMCollator",
           "ClassificationCollator", "encode_causal", "left_pad_prompts", "generate_corpus", "IGNORE"]
