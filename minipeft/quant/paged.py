"""Paged optimizer, from scratch: AdamW whose state lives in (pinned) CPU memory between steps.

QLoRA's paged optimizers put the Adam moments in CUDA unified memory, which the driver pages out to
CPU RAM when the GPU runs short (long sequences → memory spikes) and back in when the optimizer
touches them. Unified memory is not reachable from plain PyTorch, so this version does the paging
by hand and always: each parameter's moments m, v stay in pinned CPU memory; at `step()` they are
copied to the parameter's device, updated, and copied back. GPU memory held by optimizer state
between steps: 0 (during a step: the moments of one parameter at a time). The cost is 2 × (read +
write) of the state over PCIe per step, which is why real paged optimizers page only under pressure.

The update is AdamW (Loshchilov & Hutter), written in the same order of operations as
torch.optim.AdamW's single-tensor path, so on CPU the two agree to rounding:

    m ← β1·m + (1−β1)·g        v ← β2·v + (1−β2)·g²        θ ← θ·(1 − lr·λ)
    θ ← θ − lr/(1−β1ᵗ) · m / (√v / √(1−β2ᵗ) + ε)
"""
from __future__ import annotations

import math

import torch


class PagedAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, pin_memory: bool | None = None):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid PagedAdamW hyperparameters: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        # pinned host memory makes the copies asynchronous-capable; only meaningful with CUDA present
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory

    def _host(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().to("cpu", copy=True)
        return t.pin_memory() if self.pin_memory else t

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("PagedAdamW does not support sparse gradients")
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = self._host(torch.zeros_like(p, memory_format=torch.preserve_format))
                    st["exp_avg_sq"] = self._host(torch.zeros_like(p, memory_format=torch.preserve_format))
                st["step"] += 1
                t = st["step"]
                # page in (non_blocking from pinned memory overlaps with other work on CUDA)
                m = st["exp_avg"].to(p.device, non_blocking=True)
                v = st["exp_avg_sq"].to(p.device, non_blocking=True)
                g = p.grad
                p.mul_(1 - lr * wd)
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                step_size = lr / (1 - b1**t)
                denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(eps)
                p.addcdiv_(m, denom, value=-step_size)
                # page out: on CPU, m and v are the state tensors themselves (no copy happened)
                if m.data_ptr() != st["exp_avg"].data_ptr():
                    st["exp_avg"].copy_(m, non_blocking=True)
                    st["exp_avg_sq"].copy_(v, non_blocking=True)
        if self.pin_memory and torch.cuda.is_available():
            torch.cuda.synchronize()  # the device→host copies must land before the next step reads them
        return loss

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)  # this moves state to each parameter's device ...
        for st in self.state.values():  # ... so page it back out
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    st[k] = self._host(st[k])
            if "step" in st:
                st["step"] = int(st["step"])


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> dict:
    """Bytes of optimizer state tensors per device type, e.g. {'cpu': 8_000, 'cuda': 0}."""
    out: dict = {}
    for st in optimizer.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                out[v.device.type] = out.get(v.device.type, 0) + v.numel() * v.element_size()
    return out
