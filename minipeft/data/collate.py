"""Turn task examples into model batches.

Causal LM: ``input_ids = prompt + target + eos`` with the prompt positions set to -100 in
``labels`` (the loss only sees the target), right-padded for training. Generation prompts are
left-padded so every row's last token sits at the same position. Classification: the tokenizer's
own [CLS] ... [SEP] encoding plus ``labels``.
"""
from __future__ import annotations

import torch

IGNORE = -100  # label value that torch's cross-entropy ignores


def _pad_id(tokenizer):
    pid = tokenizer.pad_token_id
    return pid if pid is not None else tokenizer.eos_token_id


def encode_causal(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids and labels for one (prompt, target) pair; prompt positions are masked."""
    p = tokenizer(prompt)["input_ids"]  # bos + prompt (if the tokenizer adds bos)
    t = tokenizer(target, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        t = t + [tokenizer.eos_token_id]
    return p + t, [IGNORE] * len(p) + t


class CausalLMCollator:
    """``collate_fn`` for training a causal LM on examples with ``prompt`` and ``target``."""

    def __init__(self, tokenizer, max_length: int | None = None):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, examples: list[dict]) -> dict:
        pairs = [encode_causal(self.tokenizer, ex["prompt"], ex["target"]) for ex in examples]
        if self.max_length:
            pairs = [(i[: self.max_length], l[: self.max_length]) for i, l in pairs]
        T, pad = max(len(i) for i, _ in pairs), _pad_id(self.tokenizer)
        ids = torch.full((len(pairs), T), pad, dtype=torch.long)
        labels = torch.full((len(pairs), T), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(pairs), T), dtype=torch.long)
        for b, (i, l) in enumerate(pairs):  # right padding
            ids[b, : len(i)], labels[b, : len(l)], mask[b, : len(i)] = torch.tensor(i), torch.tensor(l), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def left_pad_prompts(tokenizer, prompts: list[str]) -> dict:
    """Left-padded ``input_ids``/``attention_mask`` for batched generation."""
    enc = [tokenizer(p)["input_ids"] for p in prompts]
    T, pad = max(len(e) for e in enc), _pad_id(tokenizer)
    ids = torch.full((len(enc), T), pad, dtype=torch.long)
    mask = torch.zeros((len(enc), T), dtype=torch.long)
    for b, e in enumerate(enc):
        ids[b, T - len(e):], mask[b, T - len(e):] = torch.tensor(e), 1
    return {"input_ids": ids, "attention_mask": mask}


class ClassificationCollator:
    """``collate_fn`` for sequence classification on examples with ``text`` and ``label``."""

    def __init__(self, tokenizer, max_length: int = 128):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, examples: list[dict]) -> dict:
        enc = self.tokenizer([ex["text"] for ex in examples], padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if "label" in examples[0]:
            batch["labels"] = torch.tensor([ex["label"] for ex in examples], dtype=torch.long)
        return batch
