"""The Prefix tuning chapter's checks pass for correct implementations and fail for typical mistakes."""
import math

import torch

from minipeft.exercises import check_prefix_attention, check_prefix_lambda


def causal_keep(T, L, device=None):
    """(T, L + T) bool: prefix columns always kept, input columns j <= i."""
    return torch.cat([torch.ones(T, L, dtype=torch.bool), torch.ones(T, T, dtype=torch.bool).tril()], 1)


def concat_attention(q, k, v, p_k, p_v, causal=True):
    s = q @ torch.cat([p_k, k], 2).transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, T, L + T)
    if causal:
        s = s.masked_fill(~causal_keep(q.shape[2], p_k.shape[2]), float("-inf"))
    return torch.softmax(s, -1) @ torch.cat([p_v, v], 2)


def mixture_attention(q, k, v, p_k, p_v, causal=True):
    """He et al.'s form: (1 − λ) Attn(q, K, V) + λ Attn(q, P_k, P_v), λ from the two log-normalisers."""
    scale = 1 / math.sqrt(q.shape[-1])
    s_in = q @ k.transpose(-1, -2) * scale
    if causal:
        s_in = s_in.masked_fill(~torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril(), float("-inf"))
    s_p = q @ p_k.transpose(-1, -2) * scale
    z_in, z_p = s_in.logsumexp(-1, keepdim=True), s_p.logsumexp(-1, keepdim=True)
    lam = torch.sigmoid(z_p - z_in)  # e^{z_p} / (e^{z_p} + e^{z_in})
    return (1 - lam) * torch.softmax(s_in, -1) @ v + lam * torch.softmax(s_p, -1) @ p_v


def test_attention_correct_solutions_pass():
    assert check_prefix_attention(concat_attention)
    assert check_prefix_attention(mixture_attention)


def test_attention_mistakes_fail():
    # the prefix also prepended to the queries: one output row per [prefix; input] position
    assert not check_prefix_attention(lambda q, k, v, p_k, p_v, causal=True: concat_attention(
        torch.cat([p_k, q], 2), k, v, p_k, p_v, causal=False))

    def mask_hits_prefix(q, k, v, p_k, p_v, causal=True):  # tril over the whole (T, L + T) score matrix
        s = q @ torch.cat([p_k, k], 2).transpose(-1, -2) / math.sqrt(q.shape[-1])
        if causal:
            s = s.masked_fill(~torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool).tril(), float("-inf"))
        return torch.softmax(s, -1) @ torch.cat([p_v, v], 2)
    assert not check_prefix_attention(mask_hits_prefix)

    def separate_softmaxes(q, k, v, p_k, p_v, causal=True):  # two attentions added, no λ weighting
        s_in = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if causal:
            s_in = s_in.masked_fill(~torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril(), float("-inf"))
        s_p = q @ p_k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        return torch.softmax(s_in, -1) @ v + torch.softmax(s_p, -1) @ p_v
    assert not check_prefix_attention(separate_softmaxes)


def lam_logsumexp(q, k, p_k, causal=True):
    s_in = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s_in = s_in.masked_fill(~torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril(), float("-inf"))
    s_p = q @ p_k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.sigmoid(s_p.logsumexp(-1) - s_in.logsumexp(-1))


def lam_from_weights(q, k, p_k, causal=True):
    s = q @ torch.cat([p_k, k], 2).transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(~causal_keep(q.shape[2], p_k.shape[2]), float("-inf"))
    return torch.softmax(s, -1)[..., :p_k.shape[2]].sum(-1)


def test_lambda():
    assert check_prefix_lambda(lam_logsumexp)
    assert check_prefix_lambda(lam_from_weights)
    # mass on the input instead of the prefix
    assert not check_prefix_lambda(lambda q, k, p_k, causal=True: 1 - lam_from_weights(q, k, p_k, causal))
    # the causal mask ignored
    assert not check_prefix_lambda(lambda q, k, p_k, causal=True: lam_from_weights(q, k, p_k, False))
    # the mean prefix weight instead of the sum
    assert not check_prefix_lambda(lambda q, k, p_k, causal=True: lam_from_weights(q, k, p_k, causal) / p_k.shape[2])
