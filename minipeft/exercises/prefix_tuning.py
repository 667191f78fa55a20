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


def _inputs(B=2, H=3, T=5, L=4, dh=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, dh, generator=g, dtype=torch.float64) for _ in range(3))
    p_k, p_v = (torch.randn(B, H, L, dh, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v, p_k, p_v


def check_prefix_attention(fn):
    """Check `fn(q, k, v, p_k, p_v, causal=True) -> (B, H, T, d_h)` against an explicit loop."""
    q, k, v, p_k, p_v = _inputs()

    def shape():
        out = fn(q, k, v, p_k, p_v, causal=True)
        assert tuple(out.shape) == tuple(q.shape), \
            f"output shape {tuple(out.shape)}, expected one row per input query {tuple(q.shape)}"

    def bidirectional():
        want, _ = _reference(q, k, v, p_k, p_v, causal=False)
        assert torch.allclose(fn(q, k, v, p_k, p_v, causal=False), want, atol=1e-8), \
            "causal=False: output differs from softmax(q [P_k; K]^T / sqrt(d_h)) [P_v; V]"

    def causal():
        want, _ = _reference(q, k, v, p_k, p_v, causal=True)
        got = fn(q, k, v, p_k, p_v, causal=True)
        assert torch.allclose(got[:, :, :1], want[:, :, :1], atol=1e-8), \
            "the first query must see every prefix slot and the first key (is the causal mask hitting the prefix?)"
        assert torch.allclose(got, want, atol=1e-8), "causal=True: output differs (prefix columns never masked)"

    def depends_on_prefix():
        got = fn(q, k, v, p_k, p_v, causal=True)
        assert not torch.allclose(got, fn(q, k, v, p_k, 2 * p_v, causal=True)), "the output ignores p_v"

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

    def values():
        for is_causal in (False, True):
            _, want = _reference(q, k, v, p_k, p_v, causal=is_causal)
            got = fn(q, k, p_k, causal=is_causal)
            assert tuple(got.shape) == tuple(want.shape), f"λ shape {tuple(got.shape)}, expected {tuple(want.shape)}"
            assert torch.allclose(got, want, atol=1e-8), f"λ differs from the reference (causal={is_causal})"

    def mixture():
        out, _ = _reference(q, k, v, p_k, p_v, causal=True)
        lam = fn(q, k, p_k, causal=True).unsqueeze(-1)
        on_input, _ = _reference(q, k, v, p_k[:, :, :0], p_v[:, :, :0], causal=True)  # attention over the input only
        dh = q.shape[-1]
        on_prefix = torch.softmax(q @ p_k.transpose(-1, -2) / math.sqrt(dh), -1) @ p_v
        assert torch.allclose(out, (1 - lam) * on_input + lam * on_prefix, atol=1e-8), \
            "(1 − λ)·Attn(q, K, V) + λ·Attn(q, P_k, P_v) does not give the attention output"

    return run_checks("check_prefix_lambda", [
        ("λ matches the reference", "λ = Σ_prefix exp(s) / (Σ_prefix exp(s) + Σ_seen input exp(s))", values),
        ("He et al.'s mixture holds with your λ", "λ is the softmax mass on the prefix columns, per query", mixture),
    ], learner=(fn,))


__all__ = ["check_prefix_attention", "check_prefix_lambda"]
