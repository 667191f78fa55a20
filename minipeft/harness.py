"""The bench harness: peak memory, a timed training loop on a Llama-shaped model, fresh-process runs.

Apart from what it measures: minipeft.bench (LoRA, DoRA, methods) and minipeft.quant.bench (NF4, QLoRA)
both import it; it imports neither (a fresh process runs `python -m minipeft.bench --worker ...`).
See minipeft/bench.py's docstring for what the numbers mean.
"""
from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
import threading
import time

import torch

# ---- memory --------------------------------------------------------------------------------------------
_STATUS = "/proc/self/status"


def _status_kb(field: str) -> int | None:
    try:
        with open(_STATUS) as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


class PeakMemory:
    """`with PeakMemory(device) as mem: ...` then `mem.peak_mb`: peak memory above the start, in MB."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb, self.how = device, float("nan"), ""

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start, self.how = torch.cuda.memory_allocated(), "cuda max_memory_allocated"
            return self
        self.start, self.sampler = _status_kb("VmRSS"), None
        if self.start is None:
            raise RuntimeError("CPU memory is measured from /proc/self/status (Linux only)")
        try:  # reset the kernel's peak-RSS mark to the current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.how = "RSS high-water mark (VmHWM)"
        except OSError:
            self.how, self.sampled, self.stop = "VmRSS sampled every 1 ms", self.start, threading.Event()
            self.sampler = threading.Thread(target=self._sample, daemon=True)
            self.sampler.start()
        return self

    def _sample(self):
        while not self.stop.is_set():
            self.sampled = max(self.sampled, _status_kb("VmRSS"))
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self.start) / 2**20
        elif self.sampler is None:
            self.peak_mb = (_status_kb("VmHWM") - self.start) / 1024
        else:
            self.stop.set()
            self.sampler.join()
            self.peak_mb = (self.sampled - self.start) / 1024
        return False


# ---- one training run ----------------------------------------------------------------------------------
def llama_base(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.heads, max_position_embeddings=max(args.seq, 128),
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(device)


def time_training(model, args, device) -> dict:
    """Train `model` on one fixed random batch; return median step time, peak training memory, losses."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed))
    ids = ids.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, losses = [], []
    with PeakMemory(device) as mem:
        for step in range(args.warmup + args.steps):
            sync()
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
            losses.append(loss.item())
    return {"step_ms": [1000 * t for t in times], "train_mb": mem.peak_mb, "memory": mem.how,
            "trainable": sum(p.numel() for p in params), "total": sum(p.numel() for p in model.parameters()),
            "first_loss": losses[0], "last_loss": losses[-1]}


def run_isolated(section: str, variant: str, args, memory: bool = False) -> dict:
    """Run WORKERS[section](variant, args) in a fresh Python process and return its result.

    memory=True: a short run (1 + 1 steps) with glibc's mmap threshold fixed at 128 KiB, so every tensor
    buffer is its own mapping, returned to the OS when freed, and RSS follows the tensors' bytes. With
    glibc's default (a threshold that grows to 32 MiB) freed buffers stay in the heap and the peak depends
    on the allocator's history (we saw ±10% between identical workloads). Timing runs keep the default
    allocator, because page faults on every fresh buffer slow the steps down.
    """
    cmd = [sys.executable, "-m", "minipeft.bench", "--worker", f"{section}:{variant}", *args.argv]
    env = dict(os.environ)
    if memory:
        cmd.append("--memory-run")
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark worker {section}:{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])
