"""Benchmarks: `python -m minipeft.bench` (add `--help` for the flags).

Section `lora`: one training step (forward, backward, AdamW step) of LoRA and of DoRA (r=8, alpha=16, every
linear layer but lm_head) on a randomly initialised Llama-shaped model, with minipeft and with HF peft side by
side, plus full fine-tuning of the same model as the baseline. Same seed, so every variant starts from the same base
weights and sees the same batch (LoRA's B = 0, so both LoRA variants also start at the same loss; the table
prints it as a check). peft is a reference here, not a dependency: without it, only ours and full FT run.

What the numbers mean
- step ms: the median over `--steps` timed steps, after `--warmup` untimed ones (over all `--repeats`
  processes). Wall-clock time: on a machine shared with other jobs it is noisy; use --repeats.
- train MB: the peak memory of the training steps above the memory held once the model is built, i.e.
  what training adds (gradients, optimizer state, activations); the weights are the same for all variants.
  Measured in a separate short run (1 warmup + 1 step: the AdamW state exists from the first step on).
  CUDA: torch.cuda.max_memory_allocated() minus memory_allocated() before the first step (tensor memory only).
  CPU: the peak resident set size (RSS) of the process minus its RSS before the first step. The peak is the
  kernel's own high-water mark (VmHWM in /proc/self/status), reset just before training by writing "5" to
  /proc/self/clear_refs, so no short peak is missed. Where that is not allowed, a thread samples VmRSS every
  millisecond (it can miss peaks shorter than that). RSS counts pages, not tensor bytes: the memory run fixes
  glibc's mmap threshold so that freed tensors leave the RSS (see run_isolated); even so CPU numbers are a
  little coarser than CUDA's (a few MB of Python and allocator bookkeeping).
- Each variant runs in a fresh Python process: memory freed by one variant but kept by the allocator would
  otherwise hide the next variant's peak, and one variant's warm caches would flatter the next one's time.

Sections `dequant` and `qlora` (NF4 dequantization throughput; QLoRA vs LoRA step time and memory) live in
minipeft/quant/bench.py; section `selective` (which weights to train) in minipeft/selective/bench.py.
Every section is a function in SECTIONS; `--only lora qlora` picks some.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from .harness import PeakMemory, llama_base, run_isolated, time_training
from .quant import bench as quant_bench
from .selective import bench as selective_bench

def lora_variant(variant: str, args) -> dict:
    """minipeft | peft | dora | peft-dora | full: one training run in this process."""
    device = torch.device(args.device)
    model = llama_base(args, device)
    dora = variant.endswith("dora")
    if variant in ("minipeft", "dora"):
        import minipeft as mp
        config = mp.DoRAConfig if dora else mp.LoRAConfig
        model = mp.wrap(model, config(r=args.r, alpha=2 * args.r, target="all-linear"))
    elif variant in ("peft", "peft-dora"):
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear",
                                                 use_dora=dora))
    elif variant != "full":
        raise ValueError(f"unknown lora variant {variant!r}")
    return time_training(model, args, device)


# ---- section methods: every method of the course on the course's tasks ------------------------------------
# (task, zoo model, training steps, batch size) and each method's config and learning rate per task (or
# (learning rate, steps) where a method needs more steps). The learning rates were picked by hand on the
# validation split; the numbers reported are on the test split.
# e2e reuses arithmetic's learning rates (not tuned for it).
METHOD_TASKS = {"arithmetic": ("tiny-llama", 1200, 16), "e2e": ("tiny-llama", 600, 16),
                "sentiment": ("tiny-bert", 300, 32)}
METHODS = {
    "full FT": (None, {"arithmetic": 1e-3, "e2e": 1e-3, "sentiment": 3e-4}),
    # alpha = 4r: with alpha = 2r the same runs reached 90.0% (lr 3e-3) on arithmetic
    "LoRA r=8 all-linear": (lambda: __import__("minipeft").LoRAConfig(r=8, alpha=32, target="all-linear"),
                            {"arithmetic": 3e-3, "e2e": 3e-3, "sentiment": 1e-3}),
    # adapters start near the identity and need more steps on tiny-bert (at 300 they are at chance)
    "Houlsby m=16": (lambda: __import__("minipeft").AdapterConfig(bottleneck=16),
                     {"arithmetic": 1e-2, "e2e": 1e-2, "sentiment": (3e-3, 1000)}),
    "prompt tuning 20": (lambda: __import__("minipeft").PromptTuningConfig(num_virtual_tokens=20, init="vocab"),
                         {"arithmetic": 3e-2, "e2e": 3e-2, "sentiment": 3e-2}),
    "BitFit": (lambda: __import__("minipeft").BitFitConfig(), {"sentiment": 3e-3}),
}


def methods_variant(variant: str, args) -> dict:
    """Train one method on one task ("task/method") and score it on the test split."""
    import minipeft as mp
    task, method = variant.split("/", 1)
    model_name, steps, batch = METHOD_TASKS[task]
    make_config, lrs = METHODS[method]
    if task not in lrs:
        return {"task": task, "method": method, "skipped": "not applicable (the model has no bias terms)"}
    kind = mp.data.get_task(task).kind
    model, tok = mp.zoo.load(model_name, **({"num_labels": 2} if kind == "classification" else {}))
    if make_config is not None:
        config = make_config()
        if kind == "classification":
            config.modules_to_save = ["classifier"]  # the new head is trained in full by every method
        model = mp.wrap(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    lr, steps = lrs[task] if isinstance(lrs[task], tuple) else (lrs[task], steps)
    steps = args.task_steps or steps
    mp.Trainer(model, mp.data.load(task, "train"), collate_fn=mp.data.collator(task, tok), lr=lr,
               max_steps=steps, batch_size=batch, seed=args.seed, device=args.device,
               progress=False).train()
    train_s = time.perf_counter() - t0
    score = mp.evaluate(model, tok, task, "test")
    metric = mp.data.get_task(task).metric_name
    return {"task": task, "method": method, "trainable": trainable, "percent": 100 * trainable / total,
            "score": score[metric], "metric": metric, "train_s": train_s, "steps": steps}


def section_methods(args) -> None:
    print(f"\n## Methods on the course tasks (zoo models, test split; {args.device}, "
          f"{args.threads or torch.get_num_threads()} threads)")
    tasks = args.tasks or list(METHOD_TASKS)
    variants = [f"{t}/zero-shot" for t in tasks] + [f"{t}/{m}" for t in tasks for m in METHODS]
    print(f"{'task':<11} {'method':<22} {'trainable':>11} {'%':>8} {'steps':>6} {'score':>7} {'train s':>8}")
    for variant in variants:  # each row printed as soon as its run ends
        r = run_isolated("methods", variant, args)
        if "skipped" in r:
            print(f"{r['task']:<11} {r['method']:<22} {r['skipped']}")
        else:
            print(f"{r['task']:<11} {r['method']:<22} {r['trainable']:>11,} {r['percent']:>8.3f} "
                  f"{r['steps']:>6} {r['score']:>7.1f} {r['train_s']:>8.1f}")


def zero_shot_variant(task: str, args) -> dict:
    """The base model before any training (a fresh random head for classification)."""
    import minipeft as mp
    model_name = METHOD_TASKS[task][0]
    kind = mp.data.get_task(task).kind
    model, tok = mp.zoo.load(model_name, **({"num_labels": 2} if kind == "classification" else {}))
    metric = mp.data.get_task(task).metric_name
    return {"task": task, "method": "base, no training", "trainable": 0, "percent": 0.0,
            "score": mp.evaluate(model, tok, task, "test")[metric], "train_s": 0.0, "steps": 0}


def _methods_worker(variant: str, args) -> dict:
    task, method = variant.split("/", 1)
    return zero_shot_variant(task, args) if method == "zero-shot" else methods_variant(variant, args)



# ---- section family: the LoRA family side by side -------------------------------------------------------------
# Every method trains tiny-llama for the same number of steps (batch 16, linear schedule, 6% warmup, the Trainer's
# AdamW) on each task, once per seed, and is scored on the test split. Each method keeps its own learning rate,
# found by its chapter's author on arithmetic (it is part of the recipe, printed in the table).
FAMILY_TASKS = {"arithmetic": 300, "e2e": 300}  # task: training steps
FAMILY_SEEDS = (0, 1, 2)
FAMILY_TIMED_STEPS = 20  # step time: the median of this many steps after 5 warmup steps
_ALL = dict(target="all-linear")
FAMILY = {  # name: (config as mp.config_from_dict reads it, learning rate)
    "LoRA": (dict(method="lora", r=8, alpha=32, **_ALL), 3e-3),
    "LoRA-FA": (dict(method="lora_fa", r=8, alpha=32, **_ALL), 1e-2),
    "VeRA": (dict(method="vera", r=256, **_ALL), 1e-1),  # its scaling vectors need a far larger lr than LoRA
    "MELoRA": (dict(method="melora", r=8, n=4, alpha=32, **_ALL), 3e-3),
    "MoSLoRA": (dict(method="moslora", r=8, alpha=32, **_ALL), 1e-2),
    "RoCoFT": (dict(method="rocoft", k=3, mode="rows", **_ALL), 1e-2),
    "Propulsion": (dict(method="propulsion", k=5, **_ALL), 1e-2),
    "MonteCLoRA": (dict(method="monteclora", r=8, alpha=32, num_samples=8, sample_scaler=1e-4, kl_loss_weight=1e-5,
                        dirichlet_prior=0.1, **_ALL), 3e-3),
}
FAMILY_RESULTS = Path(__file__).parent / "results" / "lora_family.json"  # shipped with the package (chapters read it)
# MonteCLoRA's claim (a smaller spread across learning rates and seeds than LoRA): both on arithmetic over this grid
FAMILY_GRID = dict(task="arithmetic", methods=("LoRA", "MonteCLoRA"), lrs=(1e-3, 3e-3, 1e-2))


def family_results() -> dict:
    """The family bench's results as committed with the package: {"meta": {...}, "runs": [one dict per run]}."""
    if not FAMILY_RESULTS.exists():
        raise FileNotFoundError(f"{FAMILY_RESULTS} is missing: run python -m minipeft.bench --only family")
    return json.loads(FAMILY_RESULTS.read_text())


def family_variant(variant: str, args) -> dict:
    """Train one family member on one task with one seed ("task/method/seed/lr"); or, in a memory run, 2 steps."""
    import minipeft as mp
    from .config import config_from_dict

    task, method, seed, lr, *timing = variant.split("/")
    seed, lr = int(seed), float(lr)
    steps = 2 if args.memory_run else FAMILY_TIMED_STEPS + 5 if timing else (args.task_steps or FAMILY_TASKS[task])
    device = torch.device(args.device)
    model, tok = mp.zoo.load("tiny-llama")
    torch.manual_seed(seed)  # the adapter's init
    model = mp.wrap(model.to(device), config_from_dict(FAMILY[method][0]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ends = []

    class StepEnds:  # when each step ended, for the timing run
        def on_step_end(self, trainer):
            if device.type == "cuda":
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    trainer = mp.Trainer(model, mp.data.load(task, "train"), collate_fn=mp.data.collator(task, tok), lr=lr,
                         max_steps=steps, batch_size=16, seed=seed, device=args.device, progress=False,
                         callbacks=[StepEnds()])
    if args.memory_run:
        with PeakMemory(device) as mem:
            trainer.train()
        return {"train_mb": mem.peak_mb, "memory": mem.how}
    if timing:  # the median of the last FAMILY_TIMED_STEPS steps (5 warmup steps first)
        trainer.train()
        return {"timed_step_ms": 1000 * statistics.median(b - a for a, b in zip(ends[4:], ends[5:]))}
    hist = trainer.train()
    metric = mp.data.get_task(task).metric_name
    score = mp.evaluate(model, tok, task, "test")[metric]
    return {"task": task, "method": method, "seed": seed, "lr": lr, "steps": steps, "trainable": trainable,
            "score": score, "metric": metric, "step_ms": 1000 * hist["train_time"] / steps,
            "n_test": len(mp.data.load(task, "test"))}


def section_family(args) -> None:
    """Runs every (task, method, seed) of the family table and the MonteCLoRA grid, each in a fresh process, and
    keeps the results in --family-out (JSON). A result already there with the same recipe is reused, so an
    interrupted bench resumes and a changed recipe reruns only its rows."""
    out = Path(args.family_out)
    plan = [(t, m, s, FAMILY[m][1]) for t in FAMILY_TASKS for m in FAMILY for s in FAMILY_SEEDS]
    plan += [(FAMILY_GRID["task"], m, s, lr) for m in FAMILY_GRID["methods"] if m in FAMILY
             for lr in FAMILY_GRID["lrs"] for s in FAMILY_SEEDS if lr != FAMILY[m][1]]
    recipes = {p: dict(task=p[0], method=p[1], seed=p[2], lr=p[3], steps=args.task_steps or FAMILY_TASKS[p[0]],
                       config=FAMILY[p[1]][0]) for p in plan}
    old = json.loads(out.read_text())["runs"] if out.exists() else []
    keys = {_family_key(r) for r in recipes.values()}
    done = {_family_key(r): r for r in old if _family_key(r) in keys}  # results of recipes no longer run are dropped
    todo = [p for p in plan if p[1] in (args.family_methods or FAMILY)]
    print(f"\n## The LoRA family on tiny-llama ({args.device}, {args.threads or torch.get_num_threads()} threads): "
          f"{len(todo)} runs, results in {out}")
    for task, method, seed, lr in todo:
        recipe = recipes[task, method, seed, lr]
        key = _family_key(recipe)
        if key not in done:
            r = run_isolated("family", f"{task}/{method}/{seed}/{lr}", args)
            if seed == FAMILY_SEEDS[0] and lr == FAMILY[method][1]:  # memory depends on neither seed nor lr
                r.update(run_isolated("family", f"{task}/{method}/{seed}/{lr}", args, memory=True))
            done[key] = {**recipe, **r}
            _family_save(out, done, args)
        r = done[key]
        print(f"{task:<11} {method:<12} seed {seed} lr {lr:<7g} {r['trainable']:>9,} params  "
              f"{r['metric']} {r['score']:6.1f}  {r['step_ms']:6.1f} ms/step"
              + (f"  {r['train_mb']:.0f} MB" if "train_mb" in r else ""), flush=True)
    # Step time: the runs above measure it too, but while the machine may be busy with anything else; so each
    # (task, method) is timed again at the end, one after another, in a fresh process each.
    for task, method, seed, lr in todo:
        r = done[_family_key(recipes[task, method, seed, lr])]
        if "train_mb" in r and "timed_step_ms" not in r:
            r.update(run_isolated("family", f"{task}/{method}/{seed}/{lr}/timing", args))
            _family_save(out, done, args)
            print(f"{task:<11} {method:<12} {r['timed_step_ms']:6.1f} ms/step (median of {FAMILY_TIMED_STEPS})",
                  flush=True)


def _family_key(r: dict) -> str:
    return json.dumps([r["task"], r["method"], r["seed"], r["lr"], r["steps"], r["config"]], sort_keys=True)


def _family_save(out: Path, done: dict, args) -> None:
    import platform
    meta = dict(command="python -m minipeft.bench --only family", torch=torch.__version__, device=args.device,
                threads=args.threads or torch.get_num_threads(), machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
                date=time.strftime("%Y-%m-%d"), tasks=FAMILY_TASKS, seeds=list(FAMILY_SEEDS), grid=FAMILY_GRID,
                methods={m: {"config": c, "lr": lr} for m, (c, lr) in FAMILY.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "runs": list(done.values())}, indent=1) + "\n")


# ---- sections --------------------------------------------------------------------------------------------
def section_lora(args) -> None:
    have_peft = importlib.util.find_spec("peft") is not None
    print(f"\n## LoRA training step: Llama-shaped, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
          f"intermediate {args.intermediate}, batch {args.batch}x{args.seq}, LoRA r={args.r} on all linear "
          f"layers; {args.device}, {args.threads or torch.get_num_threads()} threads, {args.warmup} warmup + "
          f"{args.steps} timed steps, each variant in its own process")
    if not have_peft:
        print("peft is not installed (pip install peft): running minipeft and full fine-tuning only.")
    variants = ["minipeft"] + (["peft"] if have_peft else []) + ["dora"] + (["peft-dora"] if have_peft else []) \
        + ["full"]
    runs = {v: [] for v in variants}
    for rep in range(args.repeats):  # round robin, so a slow spell of a shared machine hits every variant
        for v in variants:
            print(f"  timing {rep + 1}/{args.repeats}: {v} ...", flush=True)
            runs[v].append(run_isolated("lora", v, args))
    res = {v: {**rs[0], "step_ms": statistics.median(t for r in rs for t in r["step_ms"])} for v, rs in runs.items()}
    for v in variants:
        print(f"  memory: {v} ...", flush=True)
        mem = run_isolated("lora", v, args, memory=True)
        res[v].update(train_mb=mem["train_mb"], memory=mem["memory"])
    print(f"\n{'variant':<10} {'trainable':>12} {'step ms':>9} {'train MB':>9} {'first loss':>11} {'last loss':>10}")
    for v, r in res.items():
        print(f"{v:<10} {r['trainable']:>12,} {r['step_ms']:>9.1f} {r['train_mb']:>9.1f} "
              f"{r['first_loss']:>11.4f} {r['last_loss']:>10.4f}")
    print(f"(train MB: peak above the built model, from {res['minipeft']['memory']})")
    ours = res["minipeft"]
    if have_peft:
        print(f"ours / peft:      time {ours['step_ms'] / res['peft']['step_ms']:.3f}   "
              f"memory {ours['train_mb'] / res['peft']['train_mb']:.3f}   (goal: <= 1.0)")
    print(f"LoRA / full FT:   time {ours['step_ms'] / res['full']['step_ms']:.3f}   "
          f"memory {ours['train_mb'] / res['full']['train_mb']:.3f}")
    dora = res["dora"]
    print(f"DoRA / LoRA:      time {dora['step_ms'] / ours['step_ms']:.3f}   "
          f"memory {dora['train_mb'] / ours['train_mb']:.3f}   (goal: time <= 1.10)")
    if have_peft:
        print(f"DoRA ours / peft: time {dora['step_ms'] / res['peft-dora']['step_ms']:.3f}   "
              f"memory {dora['train_mb'] / res['peft-dora']['train_mb']:.3f}   (goal: <= 1.0); "
              f"peft DoRA / peft LoRA time {res['peft-dora']['step_ms'] / res['peft']['step_ms']:.3f}")


SECTIONS = {"lora": section_lora, "dequant": quant_bench.section_dequant, "qlora": quant_bench.section_qlora,
            "methods": section_methods, "family": section_family, "selective": selective_bench.section}
# section -> function(variant, args) -> dict, run in a fresh process by run_isolated
WORKERS = {"lora": lora_variant, "qlora": quant_bench.qlora_variant, "methods": _methods_worker, "family": family_variant,
           "selective": selective_bench.variant}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m minipeft.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--only", nargs="+", choices=sorted(SECTIONS), default=["lora", "dequant", "qlora"],
                   help="sections to run (`methods` trains every method on the course tasks: minutes)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=None, help="FFN width (default: about 2.7 x hidden)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--r", type=int, default=8, help="LoRA rank")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=1, help="fresh processes per variant, run round robin")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", nargs="+", choices=sorted(METHOD_TASKS), default=None,
                   help="methods section: which tasks (default: all)")
    p.add_argument("--task-steps", type=int, default=0, help="methods section: training steps (0: per task default)")
    p.add_argument("--family-out", default=str(FAMILY_RESULTS), help="family section: results file")
    p.add_argument("--family-methods", nargs="+", default=None, help="family section: only these methods")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    quant_bench.add_args(p)
    selective_bench.add_args(p)
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: "section:variant" in a fresh process
    p.add_argument("--memory-run", action="store_true", help=argparse.SUPPRESS)  # internal: see run_isolated
    args = p.parse_args(argv)
    if args.intermediate is None:
        args.intermediate = 32 * round(8 * args.hidden / 3 / 32)  # Llama: 8/3 x hidden, a multiple of 32
    for name in ("hidden", "layers", "heads", "intermediate", "vocab", "batch", "seq", "r", "steps", "repeats"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive")
    if args.warmup < 0 or args.hidden % args.heads:
        p.error("--warmup must be >= 0 and --hidden a multiple of --heads")
    raw = list(sys.argv[1:] if argv is None else argv)
    args.argv = [a for i, a in enumerate(raw) if a != "--worker" and (i == 0 or raw[i - 1] != "--worker")]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        section, variant = args.worker.split(":")
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.memory_run:
            args.warmup, args.steps = 1, 1
        print(json.dumps(WORKERS[section](variant, args)))
        return
    print(f"minipeft bench: torch {torch.__version__}, device {args.device}, pid {os.getpid()}")
    for name in args.only:
        SECTIONS[name](args)


if __name__ == "__main__":
    main()
