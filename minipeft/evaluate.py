"""Score a model on a task: greedy generation for generation tasks, argmax for classification, and a
pooled head (`minipeft.heads.PooledModel`, bare or wrapped) by its own predictions in the task's metric."""
from __future__ import annotations

import torch

from .data import get_task, left_pad_prompts, load
from .heads import pooled_of, task_input, task_label, task_num_labels


def _device(model):
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 64) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), cut at the first newline."""
    dev, out = _device(model), []
    for i in range(0, len(prompts), batch_size):
        batch = {k: v.to(dev) for k, v in left_pad_prompts(tokenizer, prompts[i:i + batch_size]).items()}
        ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new = ids[:, batch["input_ids"].shape[1]:]  # generate returns prompt + continuation
        out += [t.split("\n")[0] for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return out


@torch.no_grad()
def classify(model, tokenizer, texts: list[str], batch_size: int = 128) -> list[int]:
    dev, out = _device(model), []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, return_tensors="pt")
        logits = model(input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev)).logits
        out += logits.argmax(-1).tolist()
    return out


@torch.no_grad()
def pooled_outputs(model, tokenizer, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """A pooled head's outputs: logits (N, C) of a classifier, or the predicted numbers (N,) of a regressor."""
    dev, out = _device(model), []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding=True, return_tensors="pt")
        out.append(model(input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev))
                   .logits.float().cpu())
    return torch.cat(out)


def pooled_predictions(model, tokenizer, task, examples: list[dict], batch_size: int = 64):
    """(predictions in the task's format, extra numbers). A classifier predicts its argmax class; a regressor
    its number rounded to the answer format: the nearest integer (arithmetic), or the nearest class id within
    0..C−1 (a label predicted as a number). Extra: the regressor's MAE and RMSE in the label's units."""
    head = pooled_of(model)
    out = pooled_outputs(model, tokenizer, [task_input(ex) for ex in examples], batch_size)
    if head.kind == "classification":
        ids, extra = out.argmax(-1), {}
    else:
        y = torch.tensor([task_label(ex) for ex in examples], dtype=torch.float32)
        err = out - y
        extra = {"mae": err.abs().mean().item(), "rmse": err.pow(2).mean().sqrt().item()}
        ids = out.round()
        if task.name != "arithmetic":  # a class id: the nearest one that exists
            ids = ids.clamp(0, task_num_labels(task) - 1)
        ids = ids.long()
    # the task's metric reads strings for a number to find (arithmetic), class ids otherwise
    if task.name == "arithmetic":
        preds = [str(i) for i in ids.tolist()]
    elif task.kind == "generation":  # sentiment_words: the label's word
        from .data.sentiment import WORDS
        preds = [WORDS[i] for i in ids.tolist()]
    else:
        preds = ids.tolist()
    return preds, extra


def evaluate(model, tokenizer, task, split: str = "test", n: int | None = None, batch_size: int = 64,
             max_new_tokens: int | None = None, return_predictions: bool = False) -> dict:
    """The task's metric on one split, e.g. ``{"exact_match": 83.3, "exact_match_addsub": ...}``.

    ``n`` evaluates only the first ``n`` examples; ``return_predictions`` adds the raw predictions.
    A pooled head (`mp.PooledModel`, wrapped or not) is scored in the same metric from its own predictions
    (a classifier's class, a regressor's rounded number), and a regressor also reports "mae" and "rmse".
    """
    task = get_task(task)
    examples = load(task.name, split, n=n)
    was_training = model.training
    model.eval()
    extra = {}
    try:
        if pooled_of(model) is not None:
            preds, extra = pooled_predictions(model, tokenizer, task, examples, batch_size)
        elif task.kind == "generation":
            preds = generate(model, tokenizer, [ex["prompt"] for ex in examples],
                             max_new_tokens or task.max_new_tokens, batch_size)
        else:
            preds = classify(model, tokenizer, [ex["text"] for ex in examples], batch_size)
    finally:
        model.train(was_training)
    result = {**task.metric(preds, examples), **extra}
    if return_predictions:
        result["predictions"] = preds
    return result


def interval(percent: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95% for z = 1.96) of an accuracy ``percent`` measured on ``n`` examples, in %.

    The spread a score would show on another test set of the same size: 80% on 500 examples is
    (76.3, 83.3); two methods whose intervals overlap a lot are not told apart by this test set."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    p = percent / 100
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return max(0.0, 100 * (centre - half)), min(100.0, 100 * (centre + half))
