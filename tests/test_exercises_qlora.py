"""The QLoRA chapter's exercise checks: each passes for a correct answer and fails for a broken one.

The correct answers below are written independently of minipeft.quant (plain torch), so a check that
accepted anything would fail the `broken` cases here."""
import pytest
import torch

from minipeft.exercises.qlora import check_blockwise_absmax, check_nf4_codes, check_pack_4bit


def results(report):
    return [ok for _, ok in report]


def nf4_codes(delta=0.5 * ((1 - 1 / 30) + (1 - 1 / 32)), normalise=True, zero=True):
    icdf = torch.distributions.Normal(0.0, 1.0).icdf
    pos = icdf(torch.linspace(delta, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -icdf(torch.linspace(delta, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, neg] + ([torch.zeros(1, dtype=torch.float64)] if zero else [pos[:1]])).sort().values
    return v / v.abs().max() if normalise else v


@pytest.mark.parametrize("fn, expected", [
    (nf4_codes, [True, True, True]),
    (lambda: nf4_codes().flip(0).float(), [True, True, True]),          # order and dtype do not matter
    (lambda: nf4_codes(delta=0.99), [True, True, False]),               # wrong offset δ
    (lambda: nf4_codes(normalise=False), [True, False, False]),         # not scaled to [-1, 1]
    (lambda: nf4_codes(zero=False), [False, True, False]),              # no exact zero
    (lambda: torch.linspace(-1, 1, 16), [False, True, False]),          # a uniform grid is not NF4
])
def test_nf4_codes(fn, expected):
    assert results(check_nf4_codes(fn)) == expected


def good_quantize(w, code, blocksize, per_block=True):
    x = w.view(-1, blocksize)
    absmax = x.abs().amax(1) if per_block else x.abs().max().expand(x.shape[0])
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    idx = ((x / safe[:, None]).reshape(-1, 1) - code).abs().argmin(1)
    return idx, absmax


def good_dequantize(idx, absmax, code, blocksize):
    return (code[idx].view(-1, blocksize) * absmax[:, None]).reshape(-1)


def nan_dequantize(idx, absmax, code, blocksize):  # a needless division: 0/0 in the all-zero block
    return (code[idx].view(-1, blocksize) * absmax[:, None] / absmax[:, None] * absmax[:, None]).reshape(-1)


@pytest.mark.parametrize("q, dq, expected", [
    (good_quantize, good_dequantize, [True] * 4),
    (lambda w, c, b: good_quantize(w, c, b, per_block=False), good_dequantize, [False] * 4),  # one absmax for all
    (lambda w, c, b: ((lambda i, a: ((i + 1).clamp(max=15), a))(*good_quantize(w, c, b))), good_dequantize,
     [True, False, False, False]),                                      # off-by-one code index
    (good_quantize, nan_dequantize, [True, True, False, False]),       # all-zero block → nan
])
def test_blockwise_absmax(q, dq, expected):
    assert results(check_blockwise_absmax(q, dq)) == expected


def good_pack(idx):
    pairs = idx.reshape(-1, 2).to(torch.uint8)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def good_unpack(b):
    return torch.stack([b >> 4, b & 15], dim=-1).reshape(-1)


@pytest.mark.parametrize("pack, unpack, expected", [
    (good_pack, good_unpack, [True, True, True]),
    (lambda i: (lambda p: (p[:, 1] << 4) | p[:, 0])(i.reshape(-1, 2).to(torch.uint8)),   # low nibble first
     lambda b: torch.stack([b & 15, b >> 4], -1).reshape(-1), [True, False, True]),
    (lambda i: i.to(torch.uint8), lambda b: b, [False, False, True]),                      # no packing at all
    (good_pack, lambda b: torch.cat([b >> 4, b & 15]), [True, True, False]),              # not interleaved
])
def test_pack_4bit(pack, unpack, expected):
    assert results(check_pack_4bit(pack, unpack)) == expected


# ---- more correct answers, and the mistakes issue 16 found slipping through -------------------------------
def bucket_quantize(w, code, blocksize):  # a second correct answer: midpoints between codes, clamp not where
    x = w.reshape(-1, blocksize)
    absmax = x.abs().max(dim=1).values
    normed = x / absmax.clamp_min(1e-12)[:, None]   # 0 / tiny = 0 in the all-zero block
    mids = (code[1:] + code[:-1]) / 2
    return torch.bucketize(normed.reshape(-1), mids), absmax


def bucket_dequantize(idx, absmax, code, blocksize):
    return code[idx] * absmax.repeat_interleave(blocksize)


def zero_division_quantize(w, code, blocksize):  # forgets the all-zero block: 0/0 = nan there
    x = w.view(-1, blocksize)
    absmax = x.abs().amax(1)
    return ((x / absmax[:, None]).reshape(-1, 1) - code).abs().argmin(1), absmax


def test_blockwise_absmax_second_answer_and_the_zero_block_hint(capsys):
    assert check_blockwise_absmax(bucket_quantize, bucket_dequantize)
    report = check_blockwise_absmax(zero_division_quantize, good_dequantize)
    assert results(report)[1] is False
    assert "all-zero block" in capsys.readouterr().out


def arithmetic_pack(idx):  # a second correct answer: even codes × 16 + odd codes
    idx = idx.to(torch.int64)
    return (idx[0::2] * 16 + idx[1::2]).to(torch.uint8)


def arithmetic_unpack(b):
    b = b.to(torch.int64)
    out = torch.empty(2 * b.numel(), dtype=torch.int64)
    out[0::2], out[1::2] = torch.div(b, 16, rounding_mode="floor"), b % 16
    return out


def halves_pack(idx):  # first half of the codes in the high nibbles, second half in the low ones
    half = idx.numel() // 2
    return (idx[:half].to(torch.uint8) << 4) | idx[half:].to(torch.uint8)


def halves_unpack(b):
    return torch.cat([b >> 4, b & 15])


@pytest.mark.parametrize("pack, unpack, expected", [
    (arithmetic_pack, arithmetic_unpack, [True, True, True]),
    (halves_pack, halves_unpack, [True, False, True]),          # a consistent pair, but not bitsandbytes' layout
])
def test_pack_4bit_more(pack, unpack, expected):
    assert results(check_pack_4bit(pack, unpack)) == expected


def test_a_raising_answer_is_a_fail_not_a_traceback():
    def boom(*args):
        return [][0]
    assert not any(results(check_nf4_codes(boom)))
    assert not any(results(check_blockwise_absmax(boom, boom)))
    assert not any(results(check_pack_4bit(boom, boom)))
