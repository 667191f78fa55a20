"""Reference runs: the long fine-tuning runs that chapters compare against, built once per machine.

A chapter has about a minute and a half of CPU; fine-tuning tiny-llama on arithmetic to convergence
takes longer. So the long runs are recipes, like the zoo's models: ``get(name)`` trains one on first use
and caches what it produced in ``$MINIPEFT_CACHE/runs/<name>-<hash>/``: the trained weights (an adapter as
safetensors + JSON, or the whole model for full fine-tuning), a checkpoint and a test score at each step
of ``checkpoints``, the loss curve and the final test score. The hash covers the recipe and the base
model's own zoo key, so changing either trains again. No number a chapter prints comes from anywhere else.

>>> run = get("arithmetic/lora")         # trains for a minute or two the first time, then instant
>>> run.metrics["exact_match"], run.scores[600]
>>> model, tok = run.load()               # the trained model, ready to evaluate or inspect
>>> model, tok = run.load(step=600)       # the checkpoint after 600 steps

``runs.build_all()`` builds every recipe (``scripts/test.sh`` does, before the notebooks execute).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import zoo

RUNS_VERSION = 1  # bump when the training code changes what a recipe produces

_ARITHMETIC = dict(base="tiny-llama", task="arithmetic", steps=1200, batch_size=16, checkpoints=(300, 600))
_SENTIMENT = dict(base="tiny-bert", task="sentiment", steps=600, batch_size=32, checkpoints=(150, 300))
_LORA = dict(r=8, alpha=32, target="all-linear")

RUNS = {
    # arithmetic word problems on tiny-llama, 1200 steps of 16 (6.4 epochs of the 3,000 training problems)
    "arithmetic/full": dict(_ARITHMETIC, method=None, lr=1e-3),
    "arithmetic/lora": dict(_ARITHMETIC, method=dict(method="lora", **_LORA), lr=3e-3),
    "arithmetic/dora": dict(_ARITHMETIC, method=dict(method="dora", **_LORA), lr=3e-3),
    "arithmetic/qlora": dict(_ARITHMETIC, method=dict(method="qlora", **_LORA, dropout=0.0), lr=3e-3),
    # AdaLoRA at LoRA's final budget: start at rank 12, prune to an average of 8 between steps 120 and 960. Its
    # update starts far smaller than LoRA's (P, Q ~ N(0, 0.02²), Λ = 0), and at LoRA's lr 3e-3 it reached 40.8%
    "arithmetic/adalora": dict(_ARITHMETIC, method=dict(method="adalora", init_r=12, target_r=8, alpha=32, tinit=120,
                                                        tfinal=240, deltaT=10, target="all-linear"), lr=1e-2),
    "arithmetic/prompt_tuning": dict(_ARITHMETIC, method=dict(method="prompt_tuning", num_virtual_tokens=20,
                                                              init="vocab"), lr=1e-1, steps=2400,
                                     checkpoints=(300, 600, 1200)),
    # sentiment on tiny-bert, 600 steps of 32 (9.6 epochs of the 2,000 training sentences); fresh head trained
    "sentiment/full": dict(_SENTIMENT, method=None, lr=3e-4),
    "sentiment/bitfit": dict(_SENTIMENT, method=dict(method="bitfit", modules_to_save=["classifier"]), lr=3e-2),
    "sentiment/lora": dict(_SENTIMENT, method=dict(method="lora", r=8, alpha=16, modules_to_save=["classifier"]),
                           lr=1e-2),
    "sentiment/adapter": dict(_SENTIMENT, method=dict(method="adapter", bottleneck=16,
                                                      modules_to_save=["classifier"]), lr=1e-2),
}

# Predicting through generation (book/prediction_heads.md): one backbone (tiny-llama), one budget, the answer
# generated as tokens ("generate") or read from the last token's pooled state by a linear head
# ("classification", "regression"; minipeft.heads). Each method keeps one lr for every head; two seeds each.
HEADS = ("generate", "classification", "regression")
HEAD_METHODS = {
    "full": (None, 1e-3),
    "lora": (dict(method="lora", **_LORA), 3e-3),
    "melora": (dict(method="melora", r=8, n=4, alpha=32, target="all-linear"), 3e-3),
    "rocoft": (dict(method="rocoft", k=3), 1e-2),
}
HEAD_SEEDS = (0, 1)
_HEAD_TASKS = {  # task: (recipe, heads)
    "arithmetic": (dict(base="tiny-llama", task="arithmetic", steps=600, batch_size=16, checkpoints=()), HEADS),
    "sentiment_words": (dict(base="tiny-llama", task="sentiment_words", steps=150, batch_size=16, checkpoints=()),
                        HEADS[:2]),
}
for _task, (_rec, _heads) in _HEAD_TASKS.items():
    for _m, (_cfg, _lr) in HEAD_METHODS.items():
        for _head in _heads:
            for _seed in HEAD_SEEDS:
                RUNS[f"heads/{_task}/{_m}/{_head}/{_seed}"] = dict(_rec, method=_cfg, lr=_lr, head=_head, seed=_seed)
# the strongest pooled head trained 4 times as long: is it just slower than the generator?
RUNS["heads-long/arithmetic/full/classification/0"] = dict(RUNS["heads/arithmetic/full/classification/0"], steps=2400,
                                                           checkpoints=(600, 1200))
DEFAULTS = dict(seed=0, schedule="linear", warmup=0.06)


def names() -> list[str]:
    return list(RUNS)


def recipe(name: str, **overrides) -> dict:
    if name not in RUNS:
        raise ValueError(f"unknown reference run {name!r}; choose from {names()}")
    bad = set(overrides) - set(RUNS[name]) - set(DEFAULTS)
    if bad:
        raise ValueError(f"unknown recipe keys {sorted(bad)} for {name}")
    rec = {**DEFAULTS, **RUNS[name], **overrides}
    if any(not 0 < c < rec["steps"] for c in rec["checkpoints"]):
        raise ValueError(f"checkpoints must lie strictly between 0 and steps={rec['steps']}, got {rec['checkpoints']}")
    return rec


def _key(name: str, rec: dict) -> str:
    base_key = zoo.key(rec["base"], zoo.recipe(rec["base"]))
    blob = json.dumps({"recipe": rec, "base": base_key, "runs": RUNS_VERSION}, sort_keys=True)
    return f"{name.replace('/', '--')}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


@dataclass
class Run:
    """What a reference run left behind (see the module docstring)."""
    name: str
    recipe: dict
    metrics: dict          # the task's metric on the whole test split, plus "n" (test examples)
    scores: dict           # step -> headline test score, at every checkpoint and at the end
    loss: list             # training loss at every step
    seconds: float         # training time on the machine that built it
    device: str
    path: Path

    @property
    def score(self) -> float:
        return self.scores[self.recipe["steps"]]

    def load(self, step: int | None = None):
        """``(model, tokenizer)`` as trained after ``step`` steps (default: the end), in eval mode."""
        step = self.recipe["steps"] if step is None else step
        if step not in self.scores:
            raise ValueError(f"{self.name} has checkpoints at steps {sorted(self.scores)}, not {step}")
        return _load_weights(self.recipe, self.path / f"step-{step}")


def runs_dir() -> Path:
    return zoo.cache_dir() / "runs"


def get(name: str, **overrides) -> Run:
    """The reference run ``name``, trained first if this machine has not cached it."""
    rec = recipe(name, **overrides)
    where = zoo.build_once(runs_dir() / _key(name, rec), lambda tmp: _train(name, rec, tmp))
    done = json.loads((where / "done.json").read_text())
    return Run(name=name, recipe=rec, metrics=done["metrics"], scores={int(k): v for k, v in done["scores"].items()},
               loss=done["loss"], seconds=done["seconds"], device=done["device"], path=where)


def _base(rec: dict):
    from .data import get_task

    task = get_task(rec["task"])
    if rec.get("head", "generate") != "generate":  # a pooled head on the LM's body, its init from the seed
        from .heads import PooledModel

        lm, tok = zoo.load(rec["base"])
        torch.manual_seed(rec["seed"])
        return PooledModel.for_task(lm, task, kind=rec["head"], pooling=rec.get("pooling", "last")), tok
    if task.kind == "classification":  # the fresh head's init comes from the run's seed
        return zoo.load(rec["base"], num_labels=task.num_labels, seed=rec["seed"])
    return zoo.load(rec["base"])


def _save_weights(model, out: Path) -> None:
    from .model import PeftModel

    if isinstance(model, PeftModel):
        model.save_adapter(out)
    elif not hasattr(model, "save_pretrained"):  # a fully fine-tuned PooledModel: body and head
        from safetensors.torch import save_model

        out.mkdir(parents=True, exist_ok=True)
        save_model(model, str(out / "model.safetensors"))
    else:
        with zoo.quiet_transformers(bars=False):
            model.save_pretrained(out)  # safetensors + config.json


def _load_weights(rec: dict, where: Path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from .model import load_adapter

    base, tok = _base(rec)
    if rec["method"] is not None:
        return load_adapter(base, where), tok
    if not hasattr(base, "save_pretrained"):  # a fully fine-tuned PooledModel
        from safetensors.torch import load_model

        load_model(base, str(where / "model.safetensors"))
        return base.eval(), tok
    cls = AutoModelForSequenceClassification if hasattr(base, "classifier") else AutoModelForCausalLM
    with zoo.quiet_transformers(bars=False):
        model = cls.from_pretrained(where)
    model.config._name_or_path = rec["base"]
    return model.eval(), tok


def _train(name: str, rec: dict, out: Path) -> None:
    from .config import config_from_dict
    from .data import collator, get_task, load
    from .evaluate import evaluate
    from .heads import PooledCollator
    from .model import wrap
    from .train import Trainer

    print(f"training reference run {name} ({rec['steps']} steps; cached after this once)...", flush=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(zoo.BUILD_THREADS)  # the same numbers on every CPU machine (see zoo.BUILD_THREADS)
    try:
        model, tok = _base(rec)
        pooled = rec.get("head", "generate") != "generate"
        if rec["method"] is not None:
            method = dict(rec["method"], modules_to_save=["score"]) if pooled else rec["method"]
            torch.manual_seed(rec["seed"])  # the adapter's init comes from the run's seed: a chapter can rebuild it
            model = wrap(model, config_from_dict(method))
        task = get_task(rec["task"])
        collate = PooledCollator(tok, rec["head"]) if pooled else collator(task.name, tok)
        scores = {}

        class Checkpoints:  # test score and weights at each checkpoint step
            def on_step_end(self, trainer):
                if trainer.step in rec["checkpoints"]:
                    scores[trainer.step] = evaluate(model, tok, task)[task.metric_name]
                    _save_weights(model, out / f"step-{trainer.step}")

        trainer = Trainer(model, load(task.name, "train"), collate_fn=collate, lr=rec["lr"],
                          max_steps=rec["steps"], batch_size=rec["batch_size"], schedule=rec["schedule"],
                          warmup=rec["warmup"], seed=rec["seed"], callbacks=[Checkpoints()], progress=False)
        t0 = time.perf_counter()
        hist = trainer.train()
        metrics = evaluate(model, tok, task)
        metrics["n"] = len(load(task.name, "test"))
        scores[rec["steps"]] = metrics[task.metric_name]
        _save_weights(model, out / f"step-{rec['steps']}")
        done = {"name": name, "recipe": rec, "metrics": metrics, "scores": scores, "loss": hist["loss"],
                "seconds": round(hist["train_time"], 1), "device": str(trainer.device), "torch": torch.__version__}
        (out / "done.json").write_text(json.dumps(done, indent=1))
        print(f"trained {name} in {time.perf_counter() - t0:.0f} s: test {task.metric_name} "
              f"{scores[rec['steps']]:.1f}", flush=True)
    finally:
        torch.set_num_threads(threads)


def build_all(which=None) -> None:
    """Train and cache every reference run (or those named), printing one line each."""
    for n in which or names():
        r = get(n)
        print(f"{n:28s} {r.score:6.1f}  ({r.seconds:.0f} s on {r.device})  {r.path}", flush=True)
