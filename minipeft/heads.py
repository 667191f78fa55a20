r"""Prediction heads: read one vector out of the hidden states, then a linear map to the answer.

A causal LM predicts a label by *generating* it as tokens. The other way, on the same backbone, is a
*pooled head*: the last layer's hidden states H = (h_1, …, h_T) ∈ R^{T×d} are summed into one vector

    z = Σ_t w_t h_t,      w ∈ R^T,  Σ_t w_t = 1,  w_t = 0 on padding (m_t = 0),

with the pooling's weights (m = attention mask):

    "last"  : w = one-hot(t*),   t* = max{t : m_t = 1}   (the last real token; right or left padding)
    "mean"  : w_t = m_t / Σ_s m_s                        (the mean over real tokens)
    "first" : w = one-hot(t₀),   t₀ = min{t : m_t = 1}   (the first real token: BERT's [CLS])

and a linear head reads z:

    classification:  logits = W z + b ∈ R^C,   loss = cross-entropy(logits, y),   y ∈ {0, …, C−1}
    regression:      ŷ = μ + σ (w·z + b) ∈ R,   loss = mean((w·z + b − (y − μ)/σ)²)

The regression head predicts the standardised target (y − μ)/σ (μ, σ: the training labels' mean and
standard deviation, `PooledModel.for_task`), so its loss is MSE/σ²: the same minimiser as the MSE in the
label's own units, with gradients of the size a fresh linear head expects. μ = 0, σ = 1 is the plain MSE.

In a causal LM position t only sees tokens ≤ t, so "last" is the one position that has read the whole
input, "mean" averages over prefixes, and "first" has read only the first token (bos): it carries no
information about the input and is here as the BERT-style baseline, not as a sensible choice.

`PooledModel(lm, num_labels=2)` keeps the LM's transformer body (`lm.base_model`: a Llama's `model`,
GPT-2's `transformer`, BERT's `bert`; the LM's own output layer is not used) and puts a head named
`score` on it (transformers' name for the head of `LlamaForSequenceClassification`). Every PEFT method then
applies unchanged: wrap the pooled model and train the head in full with `modules_to_save`,

    pooled = mp.PooledModel.for_task(lm, "sentiment", kind="classification")
    model = mp.wrap(pooled, mp.LoRAConfig(r=8, target=["q_proj", "v_proj"], modules_to_save=["score"]))

so `mp.Trainer` trains it (the output has `.loss`) and `save_adapter` / `load_adapter` save and restore
the head with the adapter (to load, build the same `PooledModel` first, as for any base). The pooled model
shares the body's modules with `lm` (wrapping changes them in place, as for any base): load the LM again
for a second model, e.g. the generating one it is compared with. An input method
(prompt tuning) prepends its virtual tokens to the mask too: "last" and "mean" then see them as real
positions, and "first" reads the first virtual token (as peft's prompt tuning does with a BERT pooler).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

POOLINGS = ("last", "mean", "first")
KINDS = ("classification", "regression")


def pooling_weights(attention_mask: torch.Tensor, how: str = "last") -> torch.Tensor:
    """The weights w (B, T) of a pooling: each row sums to 1 and is zero on padding (see the module docstring)."""
    if how not in POOLINGS:
        raise ValueError(f"unknown pooling {how!r}; choose from {POOLINGS}")
    m = attention_mask.to(torch.float32)
    real = m.sum(-1, keepdim=True)
    if (real == 0).any():
        raise ValueError("a row of attention_mask has no real token (all zeros): nothing to pool")
    if how == "mean":
        return m / real
    T = m.shape[-1]
    t = torch.arange(T, device=m.device, dtype=torch.float32)
    # last real token: the largest index with m = 1; first: the smallest (works for left and right padding)
    idx = (m * t).argmax(-1) if how == "last" else (m * (T - t)).argmax(-1)
    return F.one_hot(idx, T).to(torch.float32)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, how: str = "last") -> torch.Tensor:
    """z = Σ_t w_t h_t: hidden (..., B, T, d) and attention_mask (B, T) → (..., B, d).

    Leading dimensions (e.g. every layer's hidden states, (L+1, B, T, d)) share the mask."""
    if attention_mask is None:
        attention_mask = torch.ones(hidden.shape[-3:-1], dtype=torch.long, device=hidden.device)
    if attention_mask.shape != hidden.shape[-3:-1]:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; the hidden states need "
                         f"{tuple(hidden.shape[-3:-1])} (batch, positions)")
    w = pooling_weights(attention_mask, how).to(hidden.dtype)
    return (w.unsqueeze(-1) * hidden).sum(-2)  # a one-hot w copies h_t exactly (x·1 + 0 + … = x)


@dataclass
class PooledOutput:
    """What `PooledModel.forward` returns. `logits`: (B, C) for classification, the predicted numbers ŷ (B,)
    in the label's units for regression. `pooled`: z (B, d). `hidden_states`: every layer's, if asked for."""
    loss: torch.Tensor | None
    logits: torch.Tensor
    pooled: torch.Tensor
    hidden_states: tuple | None = None


class PooledModel(nn.Module):
    """A transformer body + pooling + a linear head `score` (classification: C logits; regression: one number).

    model: a Hugging Face model; its body (`model.base_model`) is kept. kind: "classification" (needs
    num_labels ≥ 2; labels are class ids, int64 (B,)) or "regression" (one output; labels are floats (B,)).
    pooling: "last" | "mean" | "first". target_mean / target_std: μ, σ of the regression target."""

    def __init__(self, model: nn.Module, num_labels: int | None = None, kind: str = "classification",
                 pooling: str = "last", target_mean: float = 0.0, target_std: float = 1.0, bias: bool = True):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; choose from {KINDS}")
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose from {POOLINGS}")
        if hasattr(model, "peft_config"):
            raise ValueError("build the PooledModel on the plain model, then mp.wrap it (modules_to_save=['score'])")
        if kind == "classification" and (not isinstance(num_labels, int) or num_labels < 2):
            raise ValueError(f"a classification head needs num_labels >= 2, got {num_labels!r}")
        if kind == "regression" and num_labels not in (None, 1):
            raise ValueError(f"a regression head predicts one number: num_labels must be None or 1, got {num_labels}")
        if not target_std > 0:
            raise ValueError(f"target_std must be > 0, got {target_std}")
        self.backbone = getattr(model, "base_model", model)  # the transformer body (LlamaModel, GPT2Model, ...)
        self.config = self.backbone.config  # model_type etc. for targeting and adapter files
        self.kind, self.pooling = kind, pooling
        self.num_labels = num_labels if kind == "classification" else 1
        self.target_mean, self.target_std = float(target_mean), float(target_std)
        d = self.config.hidden_size
        self.score = nn.Linear(d, self.num_labels, bias=bias)
        nn.init.normal_(self.score.weight, std=getattr(self.config, "initializer_range", 0.02))
        if bias:
            nn.init.zeros_(self.score.bias)
        p = next(self.backbone.parameters())
        self.score.to(device=p.device, dtype=p.dtype)

    @classmethod
    def for_task(cls, model: nn.Module, task, kind: str = "classification", pooling: str = "last",
                 **kw) -> "PooledModel":
        """A head sized for a task: C = `task_num_labels(task)` classes, or a regressor whose μ, σ are the
        training split's label mean and standard deviation. Same call, same head shape and constants."""
        from .data import get_task, load
        task = get_task(task)
        if kind == "classification":
            return cls(model, num_labels=task_num_labels(task), kind=kind, pooling=pooling, **kw)
        y = torch.tensor([task_label(ex) for ex in load(task.name, "train")], dtype=torch.float64)
        return cls(model, kind=kind, pooling=pooling, target_mean=y.mean().item(), target_std=y.std().item(), **kw)

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    @property
    def base_model(self):
        """The transformer body, under transformers' name for it (prefix tuning checks that it takes a cache)."""
        return self.backbone

    def check_labels(self, labels: torch.Tensor, batch: int) -> None:
        if labels.shape != (batch,):
            raise ValueError(f"labels must have shape ({batch},) (one per example), got {tuple(labels.shape)}")
        if self.kind == "classification":
            if labels.is_floating_point():
                raise ValueError("a classification head takes class ids (int64); float labels are for "
                                 "kind='regression'")
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_labels):
                raise ValueError(f"class ids must lie in 0..{self.num_labels - 1}, got "
                                 f"{labels.min().item()}..{labels.max().item()}")
        elif not labels.is_floating_point():
            raise ValueError("a regression head takes float labels (labels.float()); integer labels are class ids "
                             "for kind='classification'")

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                output_hidden_states: bool = False, **kw) -> PooledOutput:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                            output_hidden_states=output_hidden_states, **kw)
        h = out.last_hidden_state  # (B, T, d)
        B, T = h.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=h.device)
        # prefix tuning's mask also covers the cached prefix, which has no hidden state here
        z = pool(h, attention_mask[:, -T:], self.pooling)
        s = self.score(z)
        logits = s if self.kind == "classification" else self.target_mean + self.target_std * s.squeeze(-1)
        loss = None
        if labels is not None:
            self.check_labels(labels, B)
            if self.kind == "classification":
                loss = F.cross_entropy(s.float(), labels)
            else:
                loss = F.mse_loss(s.squeeze(-1).float(), (labels.float() - self.target_mean) / self.target_std)
        return PooledOutput(loss, logits, z, out.hidden_states if output_hidden_states else None)


def pooled_of(model) -> PooledModel | None:
    """The PooledModel in `model` (itself, or the base of a PeftModel), else None."""
    if isinstance(model, PooledModel):
        return model
    inner = model.__dict__.get("_modules", {}).get("base_model")  # a PeftModel's base, without HF's property
    return inner if isinstance(inner, PooledModel) else None


# ---- tasks as (text, label) pairs -------------------------------------------------------------------
def task_input(example: dict) -> str:
    """What a pooled head reads: the generation prompt when the task has one (the same text a generating
    model reads), else the sentence."""
    return example["prompt"] if "prompt" in example else example["text"]


def task_label(example: dict) -> int:
    """The numeric label: arithmetic's answer (stored as a string, e.g. "17"), or a class id."""
    if "answer" in example:
        return int(example["answer"])
    if "label" in example:
        return int(example["label"])
    raise ValueError(f"example has no 'answer' or 'label' to predict: keys {sorted(example)}")


def task_num_labels(task) -> int:
    """Classes of a pooled classifier: the task's labels, or arithmetic's answers 0..MAX_NUM as classes."""
    from .data import get_task
    from .data.corpus import MAX_NUM
    task = get_task(task)
    if task.num_labels:
        return task.num_labels
    if task.name == "arithmetic":
        return MAX_NUM + 1  # every answer and intermediate result lies in 0..MAX_NUM
    raise ValueError(f"task {task.name!r} has no label to predict with a pooled head")


class PooledCollator:
    """``collate_fn`` for a pooled head: the tokenizer's batch of `task_input` texts (its own padding side)
    plus ``labels``: class ids (int64) for kind="classification", floats for kind="regression"."""

    def __init__(self, tokenizer, kind: str = "classification", max_length: int | None = None):
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; choose from {KINDS}")
        self.tokenizer, self.kind, self.max_length = tokenizer, kind, max_length

    def __call__(self, examples: list[dict]) -> dict:
        enc = self.tokenizer([task_input(ex) for ex in examples], padding=True, return_tensors="pt",
                             truncation=self.max_length is not None, max_length=self.max_length)
        dtype = torch.long if self.kind == "classification" else torch.float32
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": torch.tensor([task_label(ex) for ex in examples], dtype=dtype)}
