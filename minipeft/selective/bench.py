"""Bench section `selective` (`python -m minipeft.bench --only selective`): which weights to train, compared.

tiny-bert fine-tuned on sentiment (a fresh 2-class head, trained in full by every method) for STEPS steps of
32, at two equal budgets of base-model entries: 0.5% of the eligible parameters (FISH's k) and BitFit's
count (every bias). Methods: FISH (empirical Fisher on 1024 training examples), PaFi (smallest |θ|), its
opposite (largest |θ|), a random mask, ID3 (exp 1, eps 1e-3), plus BitFit and full fine-tuning. Each
(budget, method) runs once per seed in a fresh process, at the learning rate picked for it on the
validation split (`--selective-pick-lr` reruns that pick, seed 0); scores are test accuracy.
Results go to minipeft/results/selective.json (shipped with the package; the chapter reads it); a result
already there with the same recipe is reused, so an interrupted bench resumes.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from ..harness import run_isolated

TASK, BASE, STEPS, BATCH = "sentiment", "tiny-bert", 300, 32
SEEDS = (0, 1, 2)
BUDGETS = ("0.5%", "BitFit count")
METHODS = {  # name: (config as mp.config_from_dict reads it, without the budget; None: full fine-tuning)
    "FISH": dict(method="fish", n_samples=1024, fisher="empirical"),
    "PaFi": dict(method="pafi"),
    "largest |θ|": dict(method="pafi", magnitude="largest"),
    "random": dict(method="random_mask"),
    "ID3": dict(method="id3", exp=1.0, eps=1e-3),
    "BitFit": dict(method="bitfit"),
    "full FT": None,
}
MASKED = ("FISH", "PaFi", "largest |θ|", "random", "ID3")
# picked from LR_GRID on the validation split (seed 0, 0.5%; a tie goes to the smaller lr); BitFit and full FT:
# the reference runs' learning rates (minipeft.runs)
LRS = {"FISH": 1e-2, "PaFi": 3e-2, "largest |θ|": 3e-2, "random": 3e-2, "ID3": 3e-3, "BitFit": 3e-2,
       "full FT": 3e-4}
LR_GRID = (3e-3, 1e-2, 3e-2)
RESULTS = Path(__file__).parent.parent / "results" / "selective.json"


def results() -> dict:
    """The committed results: {"meta": {...}, "runs": [one dict per run]}."""
    if not RESULTS.exists():
        raise FileNotFoundError(f"{RESULTS} is missing: run python -m minipeft.bench --only selective")
    return json.loads(RESULTS.read_text())


def bitfit_budget(model) -> int:
    """BitFit's trained base entries: every bias but the head's."""
    from .bitfit import count_bias_parameters
    return count_bias_parameters(model) - model.classifier.bias.numel()


def make_config(method: str, budget: str, seed: int, model, train, collate):
    """The method's config at the budget; FISH gets the training data its scores come from."""
    from ..config import config_from_dict
    spec = METHODS[method]
    if spec is None:
        return None
    spec = dict(spec, modules_to_save=["classifier"])
    if method in MASKED and budget == "0.5%":
        spec["density"] = 0.005
    elif method in MASKED:
        spec["budget"] = bitfit_budget(model)
    if method == "random":
        spec["seed"] = seed
    config = config_from_dict(spec)
    if getattr(config, "wants_data", False):
        config.examples, config.collate = train, collate
    return config


def variant(name: str, args) -> dict:
    """Train one ("budget/method/seed/lr/split") run in this process and score it."""
    import minipeft as mp
    from .id3 import ID3Grower
    from .sparse import selected_entries

    budget, method, seed, lr, split = name.split("/")
    seed, lr = int(seed), float(lr)
    model, tok = mp.zoo.load(BASE, num_labels=2, seed=seed)
    train, collate = mp.data.load(TASK, "train"), mp.data.collator(TASK, tok)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    config = make_config(method, budget, seed, model, train, collate)
    if config is not None:
        model = mp.wrap(model, config)
    select_s = time.perf_counter() - t0
    trainer = mp.Trainer(model, train, collate_fn=collate, lr=lr, max_steps=args.task_steps or STEPS,
                         batch_size=BATCH, seed=seed, device=args.device, progress=False)
    hist = trainer.train()
    out = {"budget": budget, "method": method, "seed": seed, "lr": lr, "split": split, "steps": trainer.max_steps,
           "score": mp.evaluate(model, tok, TASK, split)["accuracy"], "select_s": select_s,
           "train_s": hist["train_time"], "loss_first": hist["loss"][0], "loss_last": sum(hist["loss"][-20:]) / 20}
    if config is None:  # full fine-tuning: every base entry
        out["trained_base_entries"] = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("classifier"))
    else:  # the entries the adapter trains (an ID3 mask as it ended)
        out["trained_base_entries"] = sum(len(i) for i in selected_entries(model).values())
        grower = next((cb for cb in trainer.callbacks if isinstance(cb, ID3Grower)), None)
        if grower is not None:
            out["chosen_by_step"] = grower.history[::10] + grower.history[-1:]
    return out


def key(r: dict) -> str:
    return json.dumps([r["budget"], r["method"], r["seed"], r["lr"], r["split"], r["steps"],
                       METHODS[r["method"]]], sort_keys=True)


def section(args) -> None:
    out = Path(args.selective_out)
    steps = args.task_steps or STEPS
    if args.selective_pick_lr:  # the learning-rate pick: seed 0, validation split, the 0.5% budget
        plan = [("0.5%", m, 0, lr, "validation") for m in MASKED for lr in LR_GRID]
    else:
        plan = [(b, m, s, LRS[m], "test") for b in BUDGETS for m in MASKED for s in SEEDS]
        plan += [(BUDGETS[1], m, s, LRS[m], "test") for m in ("BitFit", "full FT") for s in SEEDS]
    old = json.loads(out.read_text())["runs"] if out.exists() else []
    done = {key(r): r for r in old}
    print(f"\n## Selective methods on {BASE}/{TASK} ({args.device}): {len(plan)} runs, results in {out}")
    for budget, method, seed, lr, split in plan:
        rec = dict(budget=budget, method=method, seed=seed, lr=lr, split=split, steps=steps)
        k = key(rec)
        if k not in done:
            done[k] = {**rec, **run_isolated("selective", f"{budget}/{method}/{seed}/{lr}/{split}", args)}
            save(out, done, args)
        r = done[k]
        print(f"{budget:<13} {method:<12} seed {seed} lr {lr:<7g} {split:<10} {r['trained_base_entries']:>8,} "
              f"entries  accuracy {r['score']:5.1f}  ({r['train_s']:.0f} s)", flush=True)


def save(out: Path, done: dict, args) -> None:
    import platform
    meta = dict(command="python -m minipeft.bench --only selective", torch=torch.__version__, device=args.device,
                threads=args.threads or torch.get_num_threads(), machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
                date=time.strftime("%Y-%m-%d"), task=TASK, base=BASE, batch=BATCH, seeds=list(SEEDS),
                methods=METHODS, lrs=LRS, lr_grid=LR_GRID)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "runs": list(done.values())}, indent=1, ensure_ascii=False) + "\n")


def add_args(p) -> None:
    p.add_argument("--selective-out", default=str(RESULTS), help="selective section: results file")
    p.add_argument("--selective-pick-lr", action="store_true",
                   help="selective section: run the learning-rate pick (validation split, seed 0) instead")
