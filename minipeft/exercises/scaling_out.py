"""Checks for the scaling-out chapter's exercises.

    from minipeft.exercises import check_loss_weights, check_mixed_lora, check_per_rank_bytes
    check_loss_weights(my_weights)      # my_weights(n_items: list[int]) -> one weight per rank
    check_mixed_lora(my_mixed)          # my_mixed(x (B, d_in), W0, adapters, names, scale) -> (B, d_out)
    check_per_rank_bytes(my_bytes)      # my_bytes(base_params, adapter_params, world_size, strategy) -> bytes

Loss weights: rank r holds n_r items and reports the mean of their losses; DDP averages the ranks'
(weighted) means, so w_r = N n_r / Σ_s n_s makes (1/N) Σ_r w_r mean_r the mean over the global batch.
Mixed LoRA: row i computes x_i W0ᵀ + s (x_i A_tᵀ) B_tᵀ with its own adapter t = names[i], and
"__base__" rows x_i W0ᵀ alone. Per-rank bytes: the model states of PEFT training (no activations),
M = 2Φ + 16φ under DDP and 2Φ/N + 16φ under FSDP, which in minipeft shards only the frozen base.
The references inside the checks are the global mean itself, a loop over rows, and that count.
"""
from __future__ import annotations

import math

import torch

from ._runner import run_checks


# -- exercise 1: loss weights ------------------------------------------------------------------------------
def _weights(fn, n_items):
    out = fn(list(n_items))
    w = torch.as_tensor(out, dtype=torch.float64).reshape(-1) if not isinstance(out, torch.Tensor) \
        else out.detach().double().reshape(-1)
    assert len(w) == len(n_items), f"items per rank {list(n_items)}: returned {len(w)} weights, expected " \
                                   f"{len(n_items)} (one per rank)"
    return w


def check_loss_weights(fn):
    """Check `fn(n_items) -> weights`: (1/N) Σ_r w_r · mean_r must equal the mean loss over the whole batch."""

    def equal_slices():
        w = _weights(fn, [6, 6, 6, 6])
        assert torch.allclose(w, torch.ones(4, dtype=torch.float64), atol=1e-6), \
            f"4 ranks with 6 items each: weights {[round(v, 4) for v in w.tolist()]}, expected [1, 1, 1, 1]"

    def sum_to_n():
        n = [3, 9, 4]
        w = _weights(fn, n)
        assert math.isclose(w.sum().item(), len(n), rel_tol=1e-6), \
            f"items per rank {n}: the weights sum to {w.sum().item():.4f}, expected N = {len(n)}"

    def global_mean():
        g = torch.Generator().manual_seed(0)
        for n in ([5, 1, 12], [2, 7, 3, 20, 1], [9, 4]):
            losses = [torch.rand(k, generator=g, dtype=torch.float64) * 4 for k in n]
            w = _weights(fn, n)
            got = sum(w[r] * losses[r].mean() for r in range(len(n))).item() / len(n)
            want = torch.cat(losses).mean().item()
            assert math.isclose(got, want, rel_tol=1e-6), \
                f"items per rank {n}: (1/N) Σ w_r · mean_r = {got:.4f}, the mean over the batch is {want:.4f}"

    return run_checks("check_loss_weights", [
        ("one weight per rank", "return a list with one number for each entry of n_items",
         lambda: _weights(fn, [3, 1, 4, 1, 5])),
        ("equal slices: every weight is 1", "n_r / Σ n forgets the N: DDP's all-reduce divides the sum "
         "of the ranks' losses by N, so the weights must average to 1", equal_slices),
        ("uneven slices: the weights sum to N", "weights relative to the largest slice (n_r / max n) or "
         "inverted (mean n / n_r) do not average to 1: the share of rank r is n_r / Σ n, times N", sum_to_n),
        ("uneven slices: the weighted average is the batch's mean", "all ones is DDP's plain average: a rank "
         "with few items gets the same say as one with many; the weight must grow with n_r", global_mean),
    ], learner=(fn,))


# -- exercise 2: one batch, several LoRA adapters --------------------------------------------------------
def _lora_problem(names, n_adapters, seed):
    g = torch.Generator().manual_seed(seed)
    d_in, d_out, r = 6, 5, 2
    x, W0 = torch.randn(len(names), d_in, generator=g), torch.randn(d_out, d_in, generator=g)
    adapters = {t: (torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g))
                for t in "abc"[:n_adapters]}
    return x, W0, adapters


def _loop_lora(x, W0, adapters, names, scale):
    rows = []
    for i, t in enumerate(names):
        h = W0 @ x[i]
        if t != "__base__":
            A, B = adapters[t]
            h = h + scale * (B @ (A @ x[i]))
        rows.append(h)
    return torch.stack(rows)


def check_mixed_lora(fn):
    """Check `fn(x, W0, adapters, names, scale) -> (B, d_out)` against a loop over the rows."""

    def agrees(names, n_adapters, scale, seed=0):
        x, W0, adapters = _lora_problem(names, n_adapters, seed)
        got = fn(x.clone(), W0.clone(), {t: (A.clone(), B.clone()) for t, (A, B) in adapters.items()},
                 list(names), scale)
        assert isinstance(got, torch.Tensor), f"returned {type(got).__name__}, expected a tensor (B, d_out)"
        want = _loop_lora(x, W0, adapters, names, scale)
        assert tuple(got.shape) == tuple(want.shape), \
            f"names {names}: shape {tuple(got.shape)}, expected (B, d_out) = {tuple(want.shape)}"
        got = got.detach().float()
        bad = [i for i in range(len(names)) if not torch.allclose(got[i], want[i], atol=1e-4)]
        assert not bad, f"names {names}, scale {scale}: rows {bad} are wrong"

    return run_checks("check_mixed_lora", [
        ("one adapter, scale s", "the update is s · (x Aᵀ) Bᵀ: the scale multiplies the low-rank term",
         lambda: (agrees(["a"] * 3, 1, 0.5), agrees(["a"] * 2, 1, 3.0, seed=1))),
        ("rows grouped by adapter", "each row uses its own adapter's A and B: not the first adapter for "
         "every row, and not the sum of all adapters", lambda: agrees(["a", "a", "b", "c", "c"], 3, 2.0)),
        ("rows of different adapters interleaved", "computing each adapter's rows as one group is fine, "
         "but each result must go back to its row's position in the batch",
         lambda: agrees(["b", "a", "c", "b", "a", "c", "b"], 3, 2.0)),
        ('"__base__" rows get the base only', 'a row named "__base__" gets x W0ᵀ and no adapter at all',
         lambda: agrees(["__base__", "__base__", "a", "b"], 2, 2.0)),
    ], learner=(fn,))


# -- exercise 3: bytes per rank under DDP and FSDP ---------------------------------------------------------
def _model_state_bytes(base, adapter, world, strategy):
    """M = 2Φ (bf16 frozen base, / N under FSDP) + 16φ (fp32 adapter: weight 4, grad 4, AdamW moments 8)."""
    return 2 * base / (world if strategy == "fsdp" else 1) + 16 * adapter


def check_per_rank_bytes(fn):
    """Check `fn(base_params, adapter_params, world_size, strategy) -> bytes per rank` (model states only)."""

    def agrees(base, adapter, world, strategy):
        out = fn(base, adapter, world, strategy)
        if isinstance(out, torch.Tensor):
            assert out.numel() == 1, f"returned a tensor of shape {tuple(out.shape)}, expected one number"
            out = out.item()
        assert isinstance(out, (int, float)) or hasattr(out, "__float__"), \
            f"returned {type(out).__name__}, expected a number of bytes"
        want = _model_state_bytes(base, adapter, world, strategy)
        assert math.isclose(float(out), want, rel_tol=1e-9), \
            f"Φ = {base:,} base and φ = {adapter:,} adapter parameters, {world} rank(s), {strategy}: " \
            f"{float(out):,.0f} bytes, expected {want:,.0f}"

    return run_checks("check_per_rank_bytes", [
        ("frozen base: 2 bytes per parameter", "a bf16 frozen weight is 2 bytes, with no gradient and no "
         "optimizer state", lambda: agrees(1_000_000, 0, 1, "ddp")),
        ("adapter: 16 bytes per parameter", "an fp32 adapter parameter holds a 4-byte weight, a 4-byte "
         "gradient and two 4-byte AdamW moments: 16 bytes (not 12 with one moment, not 2 as in bf16)",
         lambda: (agrees(0, 40_960, 1, "ddp"), agrees(7_000_000, 81_920, 1, "ddp"))),
        ("DDP: everything whole on every rank", "DDP keeps a whole copy of the base on every rank: "
         "sharding belongs to FSDP", lambda: agrees(7_000_000, 81_920, 8, "ddp")),
        ("FSDP: the base divided by N", "FSDP stores 1/N of the frozen base on each rank",
         lambda: agrees(7_000_000, 0, 8, "fsdp")),
        ("FSDP: the adapter stays whole", "minipeft shards only the frozen base and keeps the adapter whole "
         "on every rank (ZeRO-3 would shard it too)", lambda: agrees(6_000_000, 81_920, 4, "fsdp")),
    ], learner=(fn,))
