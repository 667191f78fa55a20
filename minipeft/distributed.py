r"""Training on many processes: DDP and FSDP for a PEFT model, as the Trainer uses them.

Launch any script that builds an ``mp.Trainer`` with torchrun; the Trainer does the rest (``strategy="auto"``
is DDP under torchrun; it joins the process group: gloo on CPU, nccl on CUDA with one GPU per LOCAL_RANK):

    torchrun --standalone --nproc_per_node=2 -m minipeft.distributed --strategy ddp  --steps 20 --out runs/ddp
    torchrun --standalone --nproc_per_node=2 -m minipeft.distributed --strategy fsdp --steps 20 --out runs/fsdp
    python -m minipeft.distributed --strategy none --steps 20 --out runs/none     # one process, the reference

(on a machine with N GPUs: ``--nproc_per_node=N``; the same commands run on the CPU with gloo.)

What each of the N ranks holds (P_base frozen parameters, P_ad adapter parameters, P_ad ≪ P_base):

    DDP  : the whole base P_base, the adapter P_ad, its gradient P_ad and AdamW's two moments 2 P_ad.
           After backward the gradients are averaged, g = (1/N) Σ_r g_r, by an all-reduce of P_ad
           numbers. DDP's reducer only registers tensors with requires_grad=True, so the frozen base is
           never communicated (it is broadcast once from rank 0 when DDP is built).
    FSDP : a 1/N shard of the base, ≈ P_base / N, plus the whole adapter (P_ad, its gradient, 2 P_ad of
           AdamW state). Each transformer block's shard is all-gathered just before the block runs (forward,
           and again in backward) and dropped after. The adapter tensors are *not* sharded
           (``fully_shard(..., ignored_params=adapter)``): they are tiny, and keeping them whole lets every
           method callback (AdaLoRA reads gradients) and ``save_adapter`` work unchanged. Their gradients are
           averaged by our own all-reduce (``all_reduce_grads``), the same sum DDP does.

So DDP pays P_base per rank and FSDP pays P_base / N: FSDP is the choice when the frozen base alone does not
fit on one device. ``held_parameters`` counts what a rank holds; the demo below writes it to JSON.

The same global batch on 1 or N processes. ``batch_size`` is the global micro-batch: rank r takes the r-th
contiguous slice of each one (``rank_slice``). A model's loss is a mean over the items of its own slice
(tokens whose label is not -100, or examples), so averaging the N ranks' means is not the mean over the
global batch when the slices hold different numbers of items. Each rank therefore weighs its loss by

    w_r = N · n_r / Σ_s n_s            (n_r: items in rank r's slice)

and the average (1/N) Σ_r w_r · mean_r = Σ_r sum_r / Σ_s n_s is the global micro-batch's mean: the same
loss and gradient as one process, up to float rounding (different padding and matmul shapes).

Evaluation and callbacks run on every rank, on the unwrapped model (``trainer.model``): every rank evaluates
the whole eval set, so the metrics are those of one process and FSDP's all-gathers stay in step; callbacks see
averaged gradients and the same weights everywhere, so a schedule such as AdaLoRA's rank budget makes the same
decision on every rank. Only rank 0 shows progress and writes files.

Limits. Every rank first builds the whole model on its CPU; FSDP then moves it to the device one block at a
time and keeps only this rank's shard (so the base must fit in each process's CPU memory, not on one device).
DDP expects every trainable tensor to get a gradient in every step (``find_unused_parameters=False``).
Under "fsdp" every trainable tensor stays whole, so full fine-tuning with it shards nothing that trains.
Nothing is pickled: numbers travel between processes as tensors.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .data.collate import IGNORE

STRATEGIES = ("auto", "none", "ddp", "fsdp")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: the resolved strategy, its rank among world_size, its device."""
    strategy: str          # "none" | "ddp" | "fsdp"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints, shows progress and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.strategy != "none"


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun), or the live process group's size."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_strategy(strategy: str) -> str:
    """"auto" is DDP when there are several processes (torchrun), else one process."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")
    if strategy == "auto":
        return "ddp" if env_world_size() > 1 else "none"
    return strategy


def setup(strategy: str = "auto", device: torch.device | str = "cpu") -> DistInfo:
    """Resolve the strategy and, for DDP / FSDP, join the process group (gloo on CPU, nccl on CUDA) if the
    script has not done so; on CUDA each process takes the GPU cuda:LOCAL_RANK."""
    strategy, device = resolve_strategy(strategy), torch.device(device)
    if strategy == "none":
        return DistInfo("none", device=device)
    if not dist.is_available():
        raise ValueError(f"strategy={strategy!r} needs torch.distributed, which this torch build lacks")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ValueError(f"strategy={strategy!r} needs a process group: launch with "
                             f"`torchrun --nproc_per_node=N script.py` (missing environment variables {missing}) "
                             f"or call torch.distributed.init_process_group first")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(strategy, dist.get_rank(), dist.get_world_size(), local_rank, device)


def rank_slice(n: int, rank: int, world_size: int) -> slice:
    """Rank `rank`'s contiguous part of n items: sizes differ by at most one, lower ranks take the extra ones
    (the same split as torch.tensor_split). Equal parts when world_size divides n."""
    q, extra = divmod(n, world_size)
    start = rank * q + min(rank, extra)
    return slice(start, start + q + (rank < extra))


def loss_items(batch: dict) -> int:
    """How many items a model's mean loss runs over in `batch`: causal-LM tokens whose label is not -100
    (position t predicts label t+1, so the first label never counts; the course's collators mask it anyway),
    one per example for (B,) labels (classification, regression), else one per row."""
    labels = batch.get("labels")
    if torch.is_tensor(labels):
        if labels.dim() == 1:
            return labels.numel()
        return int((labels[..., 1:] != IGNORE).sum())
    first = next((v for v in batch.values() if torch.is_tensor(v)), None)
    return 0 if first is None else len(first)


def all_sum(values: list[float], device) -> list[float]:
    """Σ over ranks of each number (one all-reduce, float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ---- wrapping -------------------------------------------------------------------------------------
def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules FSDP makes one unit each: the transformer blocks, found by the class names a Hugging Face
    model lists in ``_no_split_modules`` (e.g. LlamaDecoderLayer). Innermost first, as fully_shard needs."""
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return [m for m in reversed(list(model.modules())) if type(m).__name__ in names]


def wrap(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """The module the training loop calls. "none": `model`. "ddp": a DistributedDataParallel around it (only
    parameters with requires_grad are in its reducer). "fsdp": `model` itself, its frozen base sharded in place
    by FSDP2 (`fully_shard` on every block, then on the root), the trainable tensors left whole and broadcast
    from rank 0. Call once, after the adapter is added and before the optimizer is built."""
    if info.strategy == "none":
        return model.to(info.device)
    if info.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        model.to(info.device)
        return DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    keep_whole = trainable(model)  # a list: every rank broadcasts them in the same order
    with torch.no_grad():
        for p in keep_whole:  # FSDP moves what it shards; the trainable tensors are ours to move
            p.data = p.data.to(info.device)
            dist.broadcast(p.data, src=0)  # every rank starts from rank 0's adapter (DDP does this too)
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh, ignored_params=set(keep_whole))
    fully_shard(model, mesh=mesh, ignored_params=set(keep_whole))  # embeddings, head and the rest
    return model


def all_reduce_grads(params, world_size: int) -> None:
    """g ← (1/N) Σ_r g_r for every tensor in `params`, in one flat all-reduce (what DDP's reducer does)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def is_sharded(t: torch.Tensor) -> bool:
    """Whether `t` is an FSDP shard (a DTensor): only part of it lives on this rank."""
    return hasattr(t, "full_tensor")


# ---- what a rank holds ------------------------------------------------------------------------------
def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """The part of `p` this rank stores: its shard for an FSDP parameter (DTensor), else all of it."""
    return p.to_local() if is_sharded(p) else p


def held_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Numbers this rank stores: frozen (base) and trainable (adapter) parameters, and their bytes.
    An FSDP model is resharded first, so a base shard counts only its 1/N."""
    if hasattr(model, "reshard"):
        model.reshard()
    out = {"base_params": 0, "base_bytes": 0, "adapter_params": 0, "adapter_bytes": 0}
    for p in model.parameters():
        t, kind = local_tensor(p), "adapter" if p.requires_grad else "base"
        out[f"{kind}_params"] += t.numel()
        out[f"{kind}_bytes"] += t.numel() * t.element_size()
    return out


def base_digest(model: torch.nn.Module) -> str:
    """sha256 of the bytes of this rank's frozen parameters (its shards under FSDP): equal digests before and
    after training mean the base was not changed by a single bit."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if not p.requires_grad:
            t = local_tensor(p).detach().cpu().contiguous()
            h.update(name.encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def gather_rows(row: list[float], info: DistInfo) -> list[list[float]]:
    """Every rank's `row` (numbers), in rank order, on every rank."""
    if not info.distributed:
        return [row]
    t = torch.zeros(info.world_size, len(row), dtype=torch.float64, device=info.device)
    t[info.rank] = torch.tensor(row, dtype=torch.float64)
    dist.all_reduce(t)  # each rank fills its own row; the sum is the table
    return t.tolist()


# ---- the demo -----------------------------------------------------------------------------------
def _lora():
    import minipeft as mp
    return mp.LoRAConfig(r=8, alpha=32, target="all-linear")


def _adalora():
    import minipeft as mp
    return mp.AdaLoRAConfig(init_r=8, target_r=4, alpha=32, target="all-linear")  # prunes from the first step


DEMO_METHODS = {"lora": _lora, "adalora": _adalora}


def main(argv=None) -> list[dict]:
    """Train LoRA on the zoo's tiny-llama for a few steps on the arithmetic task, save the adapter and
    `run.json` (losses; what every rank holds; base digests) under --out. Run it with torchrun for N ranks.
    Several strategies or methods (`--strategy ddp fsdp --method lora adalora`) run one after the other in the
    same processes, each under OUT/<method>-<strategy>."""
    ap = argparse.ArgumentParser(prog="python -m minipeft.distributed", description=main.__doc__)
    ap.add_argument("--strategy", default=["auto"], nargs="+", choices=STRATEGIES)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8, help="the global micro-batch (all ranks together)")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=6e-3)
    ap.add_argument("--method", default=["lora"], nargs="+", choices=sorted(DEMO_METHODS),
                    help="adalora: a method with an extra loss and a rank-budget callback")
    ap.add_argument("--model", default="tiny-llama", help="a zoo name, hub id or local directory")
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--train-n", type=int, default=None, help="train on the first n examples only")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--eval-n", type=int, default=0,
                    help="at the end: eval loss and the task metric (greedy generation) on this many validation "
                         "examples, computed on every rank")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    out = Path(args.out)
    plan = [(method, strategy) for method in args.method for strategy in args.strategy]
    return [demo(args, method, strategy, out / f"{method}-{strategy}" if len(plan) > 1 else out)
            for method, strategy in plan]


def demo(args, method: str, strategy: str, out: Path) -> dict:
    """One run of `main`: train, save the adapter, write run.json (rank 0); returns the report."""
    import minipeft as mp

    base, tok = mp.zoo.load(args.model)
    torch.manual_seed(0)  # the same adapter init on every rank (the Trainer broadcasts rank 0's anyway)
    model = mp.wrap(base, DEMO_METHODS[method]())
    evals = {}
    if args.eval_n:
        evals = dict(eval_dataset=mp.data.load(args.task, "validation", n=args.eval_n), eval_every=args.steps,
                     eval_fn=lambda m: mp.evaluate(m, tok, args.task, "validation", n=args.eval_n))
    train_set = mp.data.load(args.task, "train", n=args.train_n)
    trainer = mp.Trainer(model, train_set, collate_fn=mp.data.collator(args.task, tok),
                         lr=args.lr, max_steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                         strategy=strategy, device=args.device, progress=False,
                         gradient_checkpointing=args.gradient_checkpointing, **evals)
    info = trainer.dist
    trainer.prepare()  # wrap (DDP) or shard (FSDP) now, so the digest below is of what this rank holds
    digest_before = base_digest(model)
    t0 = time.perf_counter()
    history = trainer.train()
    seconds = time.perf_counter() - t0
    trainer.save_adapter(out / "adapter")
    held = held_parameters(model)
    digest_after = base_digest(model)
    keys = ["base_params", "base_bytes", "adapter_params", "adapter_bytes"]
    table = gather_rows([held[k] for k in keys] + [seconds], info)
    # a digest is text: each rank says whether its own base is unchanged, as a number
    unchanged = gather_rows([float(digest_before == digest_after)], info)
    report = {
        "strategy": info.strategy, "world_size": info.world_size, "device": str(info.device),
        "steps": args.steps, "batch_size": args.batch_size, "grad_accum": args.grad_accum, "lr": args.lr,
        "method": method, "model": args.model, "task": args.task, "loss": history["loss"], "eval": history["eval"],
        "per_rank": [dict({k: int(v) for k, v in zip(keys, row[:4])}, rank=r, seconds=round(row[4], 3),
                          base_unchanged=bool(unchanged[r][0])) for r, row in enumerate(table)],
        "base_params_total": sum(p.numel() for p in model.parameters() if not p.requires_grad),
        "adapter_params_total": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "base_digest_rank0": digest_before,
    }
    if info.strategy == "ddp":  # what DDP's reducer registered: the trainable tensors only
        ddp = trainer.engine._get_ddp_logging_data()
        report["ddp_reducer"] = {"num_parameter_tensors": ddp.get("num_parameter_tensors"),
                                 "total_parameter_size_bytes": ddp.get("total_parameter_size_bytes")}
    if info.is_main:
        (out / "run.json").write_text(json.dumps(report, indent=2) + "\n")
        rows = "\n".join(f"  rank {r['rank']}: base {r['base_params']:>9,}  adapter {r['adapter_params']:>7,}"
                         for r in report["per_rank"])
        print(f"{info.strategy} on {info.world_size} process(es): loss {history['loss'][0]:.4f} -> "
              f"{history['loss'][-1]:.4f}; adapter saved to {out / 'adapter'}\n{rows}")
    if info.distributed:
        dist.barrier()
    return report


if __name__ == "__main__":
    main()
