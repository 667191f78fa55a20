"""Checks for the Prefix tuning chapter's exercises.

    from minipeft.exercises import check_prefix_attention, check_prefix_lambda
    check_prefix_attention(my_attention)  # my_attention(q, k, v, p_k, p_v, causal=True) -> (B, H, T, d_h)
    check_prefix_lambda(my_lambda)        # my_lambda(q, k, p_k, causal=True) -> λ (B, H, T)

Shapes: q, k, v (B, H, T, d_h) are the input's queries, keys and values for H heads; p_k, p_v (B, H, L_p, d_h)
are one layer's prefix keys and values. Scores are scaled by 1/sqrt(d_h). The prefix is never masked: with
causal=True, query i sees every prefix slot and the input's keys 0..i. λ(x) is the attention mass a query puts
on the prefix (He et al. 2022, eq. 7).
"""
from __future__ import annotations

import math

import torch

from ._runner import run_checks


def _reference(q, k, v, p_k, p_v, causal):
    """Written from scratch with explicit loops over (batch, head, query): one softmax over [prefix; keys]."""
    B, H, T, dh = q.shape
    out = torch.empty_like(q)
    lam = torch.empty(B, H, T, dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                seen = i + 1 if causal else T  # the input keys this query may see; every prefix slot is seen
                keys = torch.cat([p_k[b, h], k[b, h, :seen]])
                values = torch.cat([p_v[b, h], v[b, h, :seen]])
                w = torch.softmax(keys @ q[b, h, i] / math.sqrt(dh), dim=0)
                out[b, h, i] = w @ values
                lam[b, h, i] = w[:p_k.shape[2]].sum()
    return out, lam


def _masked(q, k, v, p_k, p_v, keep):
    """Attention over [prefix; input] with a (T, L + T) boolean mask (True = seen): the known mistakes."""
    s = q @ torch.cat([p_k, k], 2).transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ torch.cat([p_v, v], 2)


def _inputs(B=2, H=3, T=5, L=4, dh=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, dh, generator=g, dtype=torch.float64) for _ in range(3))
    p_k, p_v = (torch.randn(B, H, L, dh, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v, p_k, p_v


def _got(out, want: torch.Tensor, what: str) -> torch.Tensor:
    """The learner's tensor as float64, after checking that it is one and has the reference's shape (so that a
    wrong shape is named, not met as a broadcasting error in the comparison)."""
    assert isinstance(out, torch.Tensor), f"{what}: returned {type(out).__name__}, expected a tensor"
    assert tuple(out.shape) == tuple(want.shape), \
        f"{what} has shape {tuple(out.shape)}; expected {tuple(want.shape)}"
    return out.detach().double()


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    # float32 arithmetic on the learner's side is fine; every real mistake moves the result by far more
    return torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def check_prefix_attention(fn):
    """Check `fn(q, k, v, p_k, p_v, causal=True) -> (B, H, T, d_h)` against an explicit loop."""
    q, k, v, p_k, p_v = _inputs()
    B, H, T, dh = q.shape

    def call(causal, pv=p_v):
        out = fn(q.clone(), k.clone(), v.clone(), p_k.clone(), pv.clone(), causal=causal)
        return _got(out, q, f"causal={causal}: the output (one row per input query, (B, H, T, d_h))")

    def shape():
        call(True)
        call(False)

    def bidirectional():
        want, _ = _reference(q, k, v, p_k, p_v, causal=False)
        assert _close(call(False), want), \
            "causal=False: output differs from softmax(q [P_k; K]^T / sqrt(d_h)) [P_v; V]"

    def causal():
        want, _ = _reference(q, k, v, p_k, p_v, causal=True)
        got = call(True)
        L = p_k.shape[2]
        ones = torch.ones(T, L + T, dtype=torch.bool)
        looks = {  # known mistakes, as the mask over the (T, L + T) scores they amount to
            "no mask at all": ones,
            "a causal mask that also hits the prefix (tril over the whole (T, L + T) score matrix)": ones.tril(),
            "query i seeing input keys i.. (the future) instead of 0..i: tril, not triu":
                torch.cat([ones[:, :L], ones[:, L:].triu()], 1),
        }
        like = [what for what, keep in looks.items() if _close(got, _masked(q, k, v, p_k, p_v, keep))]
        wrong = [i for i in range(T) if not _close(got[:, :, i], want[:, :, i])]
        assert not wrong, f"causal=True: output differs for queries {wrong} (query i sees every prefix slot and " \
                          f"input keys 0..i)" + (f"; it looks like {like[0]}" if like else "")

    def depends_on_prefix():
        got = call(True)
        assert not _close(got, call(True, pv=2 * p_v)), "the output ignores p_v"

    return run_checks("check_prefix_attention", [
        ("one output row per input query", "queries get no prefix: only q attends", shape),
        ("matches the reference without a mask", "one softmax over [P_k; K], then weights @ [P_v; V]",
         bidirectional),
        ("matches the reference with the causal mask", "mask input columns j > i only; prefix columns always seen",
         causal),
        ("the prefix values reach the output", "concatenate p_v in front of v", depends_on_prefix),
    ], learner=(fn,))


def check_prefix_lambda(fn):
    """Check `fn(q, k, p_k, causal=True) -> λ (B, H, T)`: the attention mass each query puts on the prefix."""
    q, k, v, p_k, p_v = _inputs(seed=1)

    def lam(is_causal):
        want = _reference(q, k, v, p_k, p_v, causal=is_causal)[1]
        out = fn(q.clone(), k.clone(), p_k.clone(), causal=is_causal)
        return _got(out, want, f"causal={is_causal}: λ (one number per query, (B, H, T))"), want

    def values():
        for is_causal in (False, True):
            got, want = lam(is_causal)
            looks = {"1 − λ, the mass on the input": 1 - want,
                     "the mean prefix weight, not the sum": want / p_k.shape[2],
                     "λ without the causal mask": _reference(q, k, v, p_k, p_v, causal=False)[1]}
            like = [what for what, alt in looks.items() if _close(got, alt)]
            assert _close(got, want), f"λ differs from the reference (causal={is_causal})" + \
                (f"; it looks like {like[0]}" if like else "") + \
                ("; λ should lie in [0, 1]" if (got < -1e-9).any() or (got > 1 + 1e-9).any() else "")

    def mixture():
        out, _ = _reference(q, k, v, p_k, p_v, causal=True)
        got, _ = lam(True)
        g = got.unsqueeze(-1)
        on_input, _ = _reference(q, k, v, p_k[:, :, :0], p_v[:, :, :0], causal=True)  # attention over the input only
        dh = q.shape[-1]
        on_prefix = torch.softmax(q @ p_k.transpose(-1, -2) / math.sqrt(dh), -1) @ p_v
        assert _close(out, (1 - g) * on_input + g * on_prefix), \
            "(1 − λ)·Attn(q, K, V) + λ·Attn(q, P_k, P_v) does not give the attention output"

    return run_checks("check_prefix_lambda", [
        ("λ matches the reference", "λ = Σ_prefix exp(s) / (Σ_prefix exp(s) + Σ_seen input exp(s))", values),
        ("He et al.'s mixture holds with your λ", "λ is the softmax mass on the prefix columns, per query", mixture),
    ], learner=(fn,))


__all__ = ["check_prefix_attention", "check_prefix_lambda"]
