"""The Prefix tuning chapter's checks pass for different correct implementations and fail, on the right line,
for typical mistakes; a solution that raises gives FAIL lines, never a traceback."""
import math

import pytest
import torch
import torch.nn.functional as F

from minipeft.exercises import check_prefix_attention, check_prefix_lambda


def failing(report):
    return [i for i, (_, ok) in enumerate(report) if not ok]


def causal_keep(T, L):
    """(T, L + T) bool: prefix columns always kept, input columns j <= i."""
    return torch.cat([torch.ones(T, L, dtype=torch.bool), torch.ones(T, T, dtype=torch.bool).tril()], 1)


# -- exercise 1: attention with a prefix ----------------------------------------------------------------
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


def sdpa_attention(q, k, v, p_k, p_v, causal=True):
    """PyTorch's fused attention with a boolean mask (True = may attend)."""
    mask = causal_keep(q.shape[2], p_k.shape[2]) if causal else None
    return F.scaled_dot_product_attention(q, torch.cat([p_k, k], 2), torch.cat([p_v, v], 2), attn_mask=mask)


def float32_einsum_attention(q, k, v, p_k, p_v, causal=True):
    """A model in float32: einsum, and an additive -inf mask above the shifted diagonal."""
    q, k, v, p_k, p_v = (t.float() for t in (q, k, v, p_k, p_v))
    T, L = q.shape[2], p_k.shape[2]
    s = torch.einsum("bhtd,bhsd->bhts", q, torch.cat([p_k, k], 2)) * q.shape[-1] ** -0.5
    if causal:
        s = s + torch.full((T, L + T), float("-inf")).triu(L + 1)
    return torch.einsum("bhts,bhsd->bhtd", s.softmax(-1), torch.cat([p_v, v], 2))


@pytest.mark.parametrize("fn", [concat_attention, mixture_attention, sdpa_attention, float32_einsum_attention])
def test_attention_correct_solutions_pass(fn):
    assert check_prefix_attention(fn)


def mask_hits_prefix(q, k, v, p_k, p_v, causal=True):  # tril over the whole (T, L + T) score matrix
    s = q @ torch.cat([p_k, k], 2).transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(s, -1) @ torch.cat([p_v, v], 2)


def sdpa_is_causal(q, k, v, p_k, p_v, causal=True):  # is_causal aligns the triangle top-left: it masks the prefix
    return F.scaled_dot_product_attention(q, torch.cat([p_k, k], 2), torch.cat([p_v, v], 2), is_causal=causal)


def future_mask(q, k, v, p_k, p_v, causal=True):  # triu instead of tril: query i sees keys i.., not ..i
    keep = torch.cat([torch.ones(q.shape[2], p_k.shape[2], dtype=torch.bool),
                      torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).triu()], 1)
    s = q @ torch.cat([p_k, k], 2).transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1) @ torch.cat([p_v, v], 2)


def separate_softmaxes(q, k, v, p_k, p_v, causal=True):  # two attentions added, no λ weighting
    s_in = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s_in = s_in.masked_fill(~torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril(), float("-inf"))
    s_p = q @ p_k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(s_in, -1) @ v + torch.softmax(s_p, -1) @ p_v


def no_scale(q, k, v, p_k, p_v, causal=True):  # 1/sqrt(d_h) forgotten
    return concat_attention(q * math.sqrt(q.shape[-1]), k, v, p_k, p_v, causal)


def softmax_over_queries(q, k, v, p_k, p_v, causal=True):  # softmax on dim -2: normalised over the queries
    s = q @ torch.cat([p_k, k], 2).transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(~causal_keep(q.shape[2], p_k.shape[2]), float("-inf"))
    return torch.softmax(s, -2).nan_to_num() @ torch.cat([p_v, v], 2)


def prefix_keys_as_values(q, k, v, p_k, p_v, causal=True):  # a typo: p_k where p_v belongs
    return concat_attention(q, k, v, p_k, p_k, causal)


def prefix_queries_too(q, k, v, p_k, p_v, causal=True):  # the prefix also prepended to the queries
    return concat_attention(torch.cat([p_k, q], 2), k, v, p_k, p_v, causal=False)


@pytest.mark.parametrize("fn, fails", [
    (mask_hits_prefix, [2]),
    (sdpa_is_causal, [2]),
    (future_mask, [2]),
    (separate_softmaxes, [1, 2]),
    (no_scale, [1, 2]),
    (softmax_over_queries, [1, 2]),
    (prefix_keys_as_values, [1, 2, 3]),
    (prefix_queries_too, [0, 1, 2, 3]),
])
def test_attention_mistakes_fail_on_their_line(fn, fails):
    report = check_prefix_attention(fn)
    assert not report and failing(report) == fails


def test_attention_shape_mistake_is_named(capsys):
    check_prefix_attention(prefix_queries_too)
    assert "has shape (2, 3, 9, 8); expected (2, 3, 5, 8)" in capsys.readouterr().out


def test_attention_mask_mistakes_are_named(capsys):
    check_prefix_attention(sdpa_is_causal)
    assert "looks like a causal mask that also hits the prefix" in capsys.readouterr().out
    check_prefix_attention(future_mask)
    assert "tril, not triu" in capsys.readouterr().out


def test_attention_raising_is_a_fail_not_a_traceback():
    def wrong_axis(q, k, v, p_k, p_v, causal=True):  # concatenated along the heads: the matmul fails
        return concat_attention(q, torch.cat([p_k, k], 1), v, p_k[:, :, :0], p_v, causal)

    report = check_prefix_attention(wrong_axis)
    assert not report and failing(report) == [0, 1, 2, 3]


# -- exercise 2: λ --------------------------------------------------------------------------------------
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


def lam_exp_tril(q, k, p_k, causal=True):
    """Plain exponentials, the causal mask as tril on them; float32."""
    q, k, p_k = q.float(), k.float(), p_k.float()
    scale = q.shape[-1] ** -0.5
    on_prefix = torch.einsum("bhtd,bhld->bhtl", q, p_k).mul(scale).exp().sum(-1)
    e = torch.einsum("bhtd,bhsd->bhts", q, k).mul(scale).exp()
    if causal:
        e = e.tril()
    return on_prefix / (on_prefix + e.sum(-1))


@pytest.mark.parametrize("fn", [lam_logsumexp, lam_from_weights, lam_exp_tril])
def test_lambda_correct_solutions_pass(fn):
    assert check_prefix_lambda(fn)


@pytest.mark.parametrize("fn", [
    lambda q, k, p_k, causal=True: 1 - lam_from_weights(q, k, p_k, causal),               # mass on the input
    lambda q, k, p_k, causal=True: lam_from_weights(q, k, p_k, False),                     # causal mask ignored
    lambda q, k, p_k, causal=True: lam_from_weights(q, k, p_k, causal) / p_k.shape[2],     # mean, not sum
    lambda q, k, p_k, causal=True: lam_from_weights(q * math.sqrt(q.shape[-1]), k, p_k, causal),  # no 1/sqrt(d_h)
    lambda q, k, p_k, causal=True: lam_from_weights(q, k, p_k, causal)[..., None],         # (B, H, T, 1)
])
def test_lambda_mistakes_fail_on_the_first_line(fn):
    report = check_prefix_lambda(fn)
    assert not report and failing(report) == [0, 1]  # the first line's hint is the one that says why


def test_lambda_shape_mistake_is_named(capsys):
    check_prefix_lambda(lambda q, k, p_k, causal=True: lam_from_weights(q, k, p_k, causal)[..., None])
    assert "has shape (2, 3, 5, 1); expected (2, 3, 5)" in capsys.readouterr().out


def test_lambda_raising_is_a_fail_not_a_traceback():
    report = check_prefix_lambda(lambda q, k, p_k, causal=True: lam_logsumexp(q, k.transpose(-1, -2), p_k, causal))
    assert not report and failing(report) == [0, 1]


def test_unstarted_stubs_are_invitations():
    def stub(*args, **kwargs):
        raise NotImplementedError("your code here")

    for check in (check_prefix_attention, check_prefix_lambda):
        report = check(stub)
        assert not report and not report.attempted
