"""QLoRA benchmarks: the `dequant` and `qlora` sections of `python -m minipeft.bench`
(e.g. `python -m minipeft.bench --only dequant qlora --hidden 256`).

Section `dequant`: NF4 dequantization throughput against the device's own copy bandwidth. One weight of
`--dequant-mib` MiB (in the compute dtype) is quantized once; we time dequantize_4bit (the fused kernel on
CUDA, the plain-PyTorch reference on CPU) and `out.copy_(src)` of a tensor of the same output size.
    effective bandwidth = (bytes read + bytes written) / time
    dequant: reads 0.5 B (codes) + 1/64 B (int8 scales) per weight, writes one output element;
    copy: reads and writes one output element.
    fraction = dequant bandwidth / copy bandwidth        (GPU goal: >= 0.60)

Section `qlora`: one training step (forward, backward, optimizer step) on a randomly initialised
Llama-shaped model, LoRA (base weights in the compute dtype) vs QLoRA (NF4 + double quant base), LoRA on
every linear layer but lm_head, r = --r, alpha = 2r, dropout 0, fp32 adapters in both. Reported: median step
time, peak training memory above the built model (see minipeft/bench.py for how it is measured), weight
memory of the built model, and the base's stored bytes per weight (goal ≈ 0.52). GPU goal: QLoRA / LoRA step
time <= 1.15. With CUDA a third run uses PagedAdamW: the optimizer state it keeps off the GPU is the memory
saved (on CPU there is nothing to page: n/a). Each variant runs in a fresh process.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn, device, warmup: int = 3, reps: int = 20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def compute_dtype(args) -> str:
    return args.compute_dtype or ("bfloat16" if torch.device(args.device).type == "cuda" else "float32")


# ---- section dequant -------------------------------------------------------------------------------------
def section_dequant(args) -> list[dict]:
    from .nf4 import dequantize_4bit, quantize_4bit
    device, dtype = torch.device(args.device), DTYPE_NAMES[compute_dtype(args)]
    size = dtype.itemsize
    n = (args.dequant_mib * 2**20 // size) // 4096 * 4096
    W = torch.randn(n // 4096, 4096, device=device, dtype=dtype)
    state = quantize_4bit(W, "nf4", 64, double_quant=True)
    out, src = torch.empty_like(W), torch.randn_like(W)
    t_deq = _median_ms(lambda: dequantize_4bit(state, dtype), device)
    t_copy = _median_ms(lambda: out.copy_(src), device)
    read = state.nbytes
    deq_gbs = (read + n * size) / t_deq / 1e6
    copy_gbs = 2 * n * size / t_copy / 1e6
    kernel = "fused (Triton/compile)" if device.type == "cuda" else "plain PyTorch reference"
    row = {"section": "dequant", "device": str(device), "dtype": compute_dtype(args), "weights": n,
           "kernel": kernel, "dequant_ms": t_deq, "copy_ms": t_copy, "dequant_GBps": deq_gbs, "copy_GBps": copy_gbs,
           "fraction_of_copy": deq_gbs / copy_gbs}
    print(f"\n## NF4 dequantization: {n / 1e6:.1f}M weights -> {compute_dtype(args)} on {device}, {kernel}")
    print(f"dequant {t_deq:.3f} ms = {deq_gbs:.1f} GB/s   copy {t_copy:.3f} ms = {copy_gbs:.1f} GB/s   "
          f"fraction {row['fraction_of_copy']:.2f}" + ("   (goal >= 0.60)" if device.type == "cuda" else "   (CPU: no goal)"))
    return [row]


# ---- section qlora ---------------------------------------------------------------------------------------
def _model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def qlora_variant(variant: str, args) -> dict:
    """One training run in this process: variant "lora", "qlora" or "qlora-paged"."""
    import minipeft as mp
    from ..harness import PeakMemory, llama_base

    from .linear4bit import base_weight_bytes_per_param
    from .paged import PagedAdamW, optimizer_state_bytes
    from .qlora import QLoRAConfig

    device, cdt = torch.device(args.device), compute_dtype(args)
    # the whole base in the compute dtype for every variant (QLoRA then quantizes its linear layers), so
    # embeddings and lm_head, which stay unquantized, cost the same in both
    base = llama_base(args, device).to(DTYPE_NAMES[cdt])
    if variant == "lora":
        model = mp.wrap(base, mp.LoRAConfig(r=args.r, alpha=2 * args.r, target="all-linear"))
        for _, p in model.adapter_parameters("default"):
            p.data = p.data.float()  # fp32 adapters, as QLoRA keeps them
    elif variant in ("qlora", "qlora-paged"):
        model = mp.wrap(base, QLoRAConfig(r=args.r, alpha=2 * args.r, dropout=0.0, compute_dtype=cdt))
    else:
        raise ValueError(f"unknown qlora bench variant {variant!r}")
    del base
    if device.type == "cuda":
        torch.cuda.empty_cache()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = PagedAdamW(params, lr=1e-4) if variant == "qlora-paged" else torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed))
    ids = ids.to(device)
    model.train()
    times, losses = [], []
    with PeakMemory(device) as mem:
        for step in range(args.warmup + args.steps):
            _sync(device)
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
            losses.append(loss.item())
    bpp = base_weight_bytes_per_param(model) if variant != "lora" else DTYPE_NAMES[cdt].itemsize
    return {"section": "qlora", "variant": variant, "device": str(device), "compute_dtype": cdt,
            "step_ms": 1000 * statistics.median(times), "train_mb": mem.peak_mb, "memory": mem.how,
            "weights_mb": _model_bytes(model) / 2**20, "base_bytes_per_param": bpp,
            "optimizer_state_on_device_mb": optimizer_state_bytes(opt).get(device.type, 0) / 2**20,
            "trainable": sum(p.numel() for p in params), "first_loss": losses[0], "last_loss": losses[-1]}


def section_qlora(args) -> list[dict]:
    from ..harness import run_isolated
    device, cdt = torch.device(args.device), compute_dtype(args)
    print(f"\n## QLoRA vs LoRA training step: Llama-shaped, hidden {args.hidden}, {args.layers} layers, vocab "
          f"{args.vocab}, intermediate {args.intermediate}, batch {args.batch}x{args.seq}, r={args.r} on all linear "
          f"layers, compute {cdt}; {device}, {torch.get_num_threads()} threads, {args.warmup} warmup + "
          f"{args.steps} timed steps, each variant in its own process")
    variants = ["lora", "qlora"] + (["qlora-paged"] if device.type == "cuda" else [])
    rows = []
    for v in variants:
        print(f"  running {v} ...", flush=True)
        rows.append(run_isolated("qlora", v, args))
    print(f"\n{'variant':<12} {'step ms':>9} {'train MB':>9} {'weights MB':>11} {'base B/param':>13} "
          f"{'opt state on dev MB':>20} {'first loss':>11} {'last loss':>10}")
    for r in rows:
        print(f"{r['variant']:<12} {r['step_ms']:>9.1f} {r['train_mb']:>9.1f} {r['weights_mb']:>11.1f} "
              f"{r['base_bytes_per_param']:>13.3f} {r['optimizer_state_on_device_mb']:>20.2f} "
              f"{r['first_loss']:>11.4f} {r['last_loss']:>10.4f}")
    res = {r["variant"]: r for r in rows}
    goal = device.type == "cuda"
    ratio = res["qlora"]["step_ms"] / res["lora"]["step_ms"]
    print(f"QLoRA / LoRA step time {ratio:.3f}" + ("   (goal <= 1.15)" if goal else "   (CPU: no goal)"))
    print(f"QLoRA base bytes/param {res['qlora']['base_bytes_per_param']:.3f}   (goal ≈ 0.52)")
    print(f"weights: QLoRA {res['qlora']['weights_mb']:.1f} MB vs LoRA {res['lora']['weights_mb']:.1f} MB "
          f"(embeddings and lm_head are not quantized)")
    if "qlora-paged" in res:
        saved = res["qlora"]["optimizer_state_on_device_mb"] - res["qlora-paged"]["optimizer_state_on_device_mb"]
        peak = res["qlora"]["train_mb"] - res["qlora-paged"]["train_mb"]
        print(f"PagedAdamW: optimizer state kept off the GPU {saved:.1f} MB; peak training memory saved {peak:.1f} MB; "
              f"step time x{res['qlora-paged']['step_ms'] / res['qlora']['step_ms']:.2f}")
    else:
        print("PagedAdamW GPU memory saved: n/a on CPU (its state lives in CPU memory either way)")
    rows.append({"section": "qlora", "variant": "summary", "qlora_over_lora_step": ratio,
                 "base_bytes_per_param": res["qlora"]["base_bytes_per_param"]})
    return rows


def add_args(p: argparse.ArgumentParser) -> None:
    """The flags these sections add to a parser that already has minipeft.bench's model/step flags."""
    p.add_argument("--compute-dtype", choices=sorted(DTYPE_NAMES), default=None,
                   help="QLoRA compute dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--dequant-mib", type=int, default=64, help="output size of the dequantization benchmark")
