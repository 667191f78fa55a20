"""One small Trainer for every chapter: AdamW, warmup + schedule, clipping, accumulation, eval.

The model is any ``nn.Module`` whose ``forward(**batch)`` returns an object with ``.loss`` (Hugging
Face models and minipeft's wrapped models both do). If the model has a callable ``extra_loss()``
that returns a tensor (a PeftModel returns its method's term, e.g. AdaLoRA's orthogonality penalty, or
None), it is added to the loss. A model's ``training_callbacks()`` (a PeftModel's method schedule, e.g.
AdaLoRA's rank budget) run after the callbacks passed in.

Callbacks are plain objects with any of these methods (all optional), each called with the trainer:
``on_train_begin``, ``on_before_optimizer_step`` (gradients are present), ``on_optimizer_step`` (after
the update, gradients still present: where peft calls AdaLoRA's ``update_and_allocate``), ``on_step_end``,
``on_evaluate(trainer, metrics)``, ``on_train_end``.
"""
from __future__ import annotations

import math
import random
import time

import numpy as np
import torch

_PRINTED_DEVICE = set()


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: cuda, then mps, then cpu (printed once per process)."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        d = torch.device("cuda")
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        d = torch.device("mps")
    else:
        d = torch.device("cpu")
    if d.type not in _PRINTED_DEVICE:
        _PRINTED_DEVICE.add(d.type)
        print(f"minipeft: using device {d.type}")
    return d


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_factor(step: int, total: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    Same convention as transformers' ``get_{linear,cosine,constant}_schedule_with_warmup``:
    linear warmup from 0, then linear decay to 0 / half a cosine to 0 / constant.
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown schedule {schedule!r}; use 'linear', 'cosine' or 'constant'")


class Trainer:
    def __init__(self, model, train_dataset, eval_dataset=None, *, collate_fn, lr: float = 1e-3,
                 max_steps: int | None = None, epochs: float | None = None, batch_size: int = 16,
                 grad_accum: int = 1, schedule: str = "linear", warmup: float = 0.06,
                 weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
                 eval_every: int | None = None, eval_fn=None, callbacks=(), seed: int = 0,
                 device="auto", bf16="auto", param_groups=None, progress: bool = True,
                 shuffle: bool = True):
        if (max_steps is None) == (epochs is None):
            raise ValueError("give exactly one of max_steps or epochs")
        if batch_size < 1 or grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be >= 1")
        if schedule not in ("linear", "cosine", "constant"):
            raise ValueError(f"unknown schedule {schedule!r}; use 'linear', 'cosine' or 'constant'")
        if not 0 <= warmup < 1 and not (isinstance(warmup, int) and warmup >= 1):
            raise ValueError("warmup is a fraction in [0, 1) or a number of steps (int >= 1)")
        if len(train_dataset) == 0:
            raise ValueError("train_dataset is empty")
        self.model, self.train_dataset, self.eval_dataset = model, train_dataset, eval_dataset
        self.collate_fn, self.batch_size, self.grad_accum = collate_fn, batch_size, grad_accum
        self.lr, self.schedule, self.weight_decay, self.max_grad_norm = lr, schedule, weight_decay, max_grad_norm
        method_callbacks = getattr(model, "training_callbacks", None)
        method_callbacks = method_callbacks() if callable(method_callbacks) else []
        self.eval_every, self.eval_fn, self.callbacks = eval_every, eval_fn, list(callbacks) + method_callbacks
        self.seed, self.progress, self.shuffle = seed, progress, shuffle
        steps_per_epoch = math.ceil(len(train_dataset) / (batch_size * grad_accum))
        self.max_steps = max_steps if max_steps is not None else max(1, round(epochs * steps_per_epoch))
        self.warmup_steps = warmup if isinstance(warmup, int) and warmup >= 1 else round(warmup * self.max_steps)
        self.device = pick_device(device)
        self.bf16 = (self.device.type == "cuda" and torch.cuda.is_bf16_supported()) if bf16 == "auto" else bool(bf16)
        if param_groups is None:
            params = [p for p in model.parameters() if p.requires_grad]
            if not params:
                raise ValueError("the model has no parameter with requires_grad=True")
            param_groups = [{"params": params}]
        self.param_groups = param_groups
        self.optimizer = None
        self.step = 0
        self.history = {"step": [], "loss": [], "lr": [], "step_time": [], "eval": []}

    # -- pieces -------------------------------------------------------------------------------
    def _batches(self):
        """Endless stream of collated micro-batches, reshuffled every epoch."""
        g = random.Random(self.seed)
        while True:
            idx = list(range(len(self.train_dataset)))
            if self.shuffle:
                g.shuffle(idx)
            for i in range(0, len(idx), self.batch_size):
                yield self.collate_fn([self.train_dataset[j] for j in idx[i:i + self.batch_size]])

    def _to_device(self, batch):
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def compute_loss(self, batch):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.model(**batch).loss
        extra = getattr(self.model, "extra_loss", None)
        extra = extra() if callable(extra) else None
        return loss if extra is None else loss + extra

    def _call(self, hook, *args):
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(self, *args)

    def evaluate(self) -> dict:
        """Mean loss on ``eval_dataset`` (if any) plus whatever ``eval_fn(model)`` returns."""
        metrics = {"step": self.step}
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            if self.eval_dataset is not None and len(self.eval_dataset):
                tot, n = 0.0, 0
                for i in range(0, len(self.eval_dataset), self.batch_size):
                    chunk = [self.eval_dataset[j] for j in range(i, min(i + self.batch_size, len(self.eval_dataset)))]
                    tot += self.compute_loss(self._to_device(self.collate_fn(chunk))).item() * len(chunk)
                    n += len(chunk)
                metrics["eval_loss"] = tot / n
        if self.eval_fn is not None:
            metrics.update(self.eval_fn(self.model))
        self.model.train(was_training)
        self.history["eval"].append(metrics)
        self._call("on_evaluate", metrics)
        return metrics

    # -- the loop -----------------------------------------------------------------------------
    def train(self) -> dict:
        set_seed(self.seed)
        self.model.to(self.device)
        self.model.train()
        if self.optimizer is None:
            groups = [dict(g) for g in self.param_groups]
            for g in groups:
                g.setdefault("lr", self.lr)
                g["base_lr"] = g["lr"]
            self.optimizer = torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        batches = self._batches()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=self.max_steps, desc="train", leave=False)
        self._call("on_train_begin")
        t_start = time.perf_counter()
        while self.step < self.max_steps:
            t0 = time.perf_counter()
            f = lr_factor(self.step, self.max_steps, self.warmup_steps, self.schedule)
            for g in self.optimizer.param_groups:
                g["lr"] = g["base_lr"] * f
            total = 0.0
            for _ in range(self.grad_accum):
                # mean over micro-batches: equal to one big batch when micro-batches have equal size
                loss = self.compute_loss(self._to_device(next(batches))) / self.grad_accum
                loss.backward()
                total += loss.item()
            if not math.isfinite(total):
                raise FloatingPointError(f"loss is {total} at step {self.step}")
            if self.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            self._call("on_before_optimizer_step")
            self.optimizer.step()
            self._call("on_optimizer_step")  # weights updated, gradients still present (AdaLoRA scores here)
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            h = self.history
            h["step"].append(self.step), h["loss"].append(total)
            h["lr"].append(self.optimizer.param_groups[0]["lr"]), h["step_time"].append(time.perf_counter() - t0)
            self._call("on_step_end")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total:.3f}")
            if self.eval_every and (self.step % self.eval_every == 0 or self.step == self.max_steps):
                self.evaluate()
        if bar is not None:
            bar.close()
        self.history["train_time"] = time.perf_counter() - t_start
        self.model.eval()
        self._call("on_train_end")
        return self.history
