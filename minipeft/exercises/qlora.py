"""Checks for the QLoRA chapter's exercises.

    from minipeft.exercises.qlora import check_nf4_codes, check_blockwise_absmax, check_pack_4bit
    check_nf4_codes(my_nf4_codes)                       # my_nf4_codes() -> 16 values
    check_blockwise_absmax(my_quantize, my_dequantize)  # my_quantize(w, code, blocksize) -> (idx, absmax)
                                                        # my_dequantize(idx, absmax, code, blocksize) -> w_hat
    check_pack_4bit(my_pack, my_unpack)                 # my_pack(idx) -> bytes,  my_unpack(bytes) -> idx

The reference inside each check is the published NF4 table or a direct computation (argmin over all codes),
not minipeft's own quantizer.
"""
from __future__ import annotations

import torch

from ._runner import run_checks

# The NF4 code values as published with QLoRA / bitsandbytes.
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


def check_nf4_codes(fn):
    """`fn()` returns the 16 NF4 code values (any order, any float dtype, list or tensor)."""
    def codes():
        return torch.as_tensor(fn(), dtype=torch.float64).flatten().sort().values

    def count():
        c = codes()
        assert c.numel() == 16, f"{c.numel()} values; 4 bits give 16 codes"
        assert (c > 0).sum() == 8 and (c < 0).sum() == 7 and (c == 0).sum() == 1, \
            f"{(c > 0).sum()} positive, {(c < 0).sum()} negative, {(c == 0).sum()} zero; want 8, 7 and 1"

    def scaled():
        c = codes()
        assert c[0] == -1 and c[-1] == 1, f"range [{c[0]:.4f}, {c[-1]:.4f}]; want exactly [-1, 1]"

    def table():
        diff = (codes() - torch.tensor(PUBLISHED_NF4, dtype=torch.float64)).abs().max().item()
        assert diff < 1e-6, f"largest difference from the published table: {diff:.2e}"

    return run_checks("check_nf4_codes", [
        ("16 codes: 8 positive, 7 negative, one exact zero",
         "NF4 is asymmetric: 8 quantiles of N(0, 1) on the positive side, 7 on the negative side, plus an exact 0",
         count),
        ("scaled to [-1, 1]", "divide every value by the largest absolute value", scaled),
        ("equal to the published table",
         "the quantiles run from the offset δ of the chapter's derivation to 0.5 (not from 0 or 1: Φ⁻¹ is infinite "
         "there); compute them in float64", table),
    ], learner=(fn,))


def check_blockwise_absmax(quantize_fn, dequantize_fn, blocksize: int = 64):
    """`quantize_fn(w, code, blocksize) -> (idx, absmax)` for a 1-D w whose length is a multiple of blocksize:
    idx (len(w),) integer index of the nearest code for w / (its block's absmax), absmax (len(w)/blocksize,).
    `dequantize_fn(idx, absmax, code, blocksize) -> w_hat` (len(w),)."""
    g = torch.Generator().manual_seed(0)
    code = torch.tensor(PUBLISHED_NF4)
    w = torch.randn(8 * blocksize, generator=g)
    w[3] = 25.0  # an outlier in block 0
    w[2 * blocksize: 3 * blocksize] = 0.0  # an all-zero block
    blocks = w.view(-1, blocksize)
    c = blocks.abs().amax(1)

    def run():
        idx, absmax = quantize_fn(w.clone(), code, blocksize)
        return torch.as_tensor(idx).long().flatten(), torch.as_tensor(absmax).float().flatten()

    def absmax_ok():
        _, absmax = run()
        assert absmax.shape == c.shape, f"absmax has shape {tuple(absmax.shape)}, want one per block {tuple(c.shape)}"
        assert torch.allclose(absmax, c), "absmax is not max|w| of each block of `blocksize` consecutive values"

    def nearest():
        idx, _ = run()
        safe = torch.where(c > 0, c, torch.ones_like(c))
        normed = (blocks / safe[:, None]).flatten()
        dist = (normed[:, None] - code).abs()
        chosen = dist.gather(1, idx[:, None]).squeeze(1)
        assert idx.shape == w.shape and 0 <= idx.min() and idx.max() < 16, "one index in [0, 16) per value"
        wrong = chosen > dist.min(1).values + 1e-6
        zero_block = torch.zeros_like(wrong)
        zero_block[2 * blocksize: 3 * blocksize] = True
        assert not (wrong & zero_block).any(), \
            f"values of the all-zero block (positions {2 * blocksize}–{3 * blocksize - 1}) got the wrong code: " \
            f"there absmax = 0 and w / absmax = 0/0 = nan; divide by 1 where absmax is 0 (they are all 0)"
        assert not wrong.any(), f"{int(wrong.sum())} values did not get their nearest code"

    def roundtrip():
        idx, absmax = run()
        w_hat = torch.as_tensor(dequantize_fn(idx, absmax, code, blocksize)).float().flatten()
        assert w_hat.shape == w.shape, f"w_hat has shape {tuple(w_hat.shape)}, want {tuple(w.shape)}"
        assert torch.isfinite(w_hat).all(), "non-finite values: an all-zero block divides by absmax = 0"
        bound = (code.diff().max() / 2 * c).repeat_interleave(blocksize) + 1e-6
        assert torch.all((w_hat - w).abs() <= bound), "error above half a code gap × the block's absmax"
        assert torch.all(w_hat[2 * blocksize: 3 * blocksize] == 0), "the all-zero block must come back as zeros"

    def isolated():
        idx, absmax = run()
        w_hat = torch.as_tensor(dequantize_fn(idx, absmax, code, blocksize)).float().flatten()
        assert torch.isfinite(w_hat).all(), "non-finite values (see the round-trip check)"
        err_rest = (w_hat - w)[blocksize:].abs().max().item()
        assert err_rest < 0.5, f"error {err_rest:.3f} outside the outlier's block: is absmax taken per block?"

    return run_checks("check_blockwise_absmax", [
        ("absmax per block", "one absmax per block of `blocksize` consecutive values: the largest |w| in it",
         absmax_ok),
        ("nearest code", "divide each value by its own block's absmax, then take the code closest to the "
                         "result (not the one just below it)", nearest),
        ("round trip within the bound, zero block safe",
         "dequantize multiplies each code value by its block's absmax; an all-zero block must not divide 0 by 0",
         roundtrip),
        ("an outlier only hurts its own block", "scale each block by its own absmax, not the tensor's", isolated),
    ], learner=(quantize_fn, dequantize_fn))


def check_pack_4bit(pack, unpack):
    """`pack(idx)`: (n,) integer codes in [0, 16), n even → (n/2,) torch.uint8 with element 2k in the HIGH
    nibble of byte k (bitsandbytes' order); `unpack` is its inverse."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 16, (1000,), generator=g, dtype=torch.uint8)

    def packed_shape():
        p = torch.as_tensor(pack(idx.clone()))
        assert p.dtype == torch.uint8, f"packed dtype {p.dtype}; want torch.uint8 (one byte holds two codes)"
        assert p.numel() == idx.numel() // 2, f"{p.numel()} bytes for {idx.numel()} codes; want half as many"

    def order():
        p = torch.as_tensor(pack(torch.tensor([3, 10], dtype=torch.uint8)))
        assert p.numel() == 1 and int(p[0]) == 3 * 16 + 10, \
            f"pack([3, 10]) = {p.tolist()}; want [58] = 3·16 + 10 (first code in the high nibble)"
        codes = [3, 10, 1, 2, 15, 0]  # several pairs: neighbours share a byte, not the two halves of the tensor
        want = [3 * 16 + 10, 1 * 16 + 2, 15 * 16 + 0]
        p = torch.as_tensor(pack(torch.tensor(codes, dtype=torch.uint8))).flatten().tolist()
        assert p == want, f"pack({codes}) = {p}; want {want}: codes 2k and 2k+1 share byte k"

    def inverse():
        back = torch.as_tensor(unpack(torch.as_tensor(pack(idx.clone())))).long().flatten()
        assert torch.equal(back, idx.long()), "unpack(pack(idx)) != idx"
        every = torch.arange(256, dtype=torch.int64).to(torch.uint8)  # every possible byte
        again = torch.as_tensor(pack(torch.as_tensor(unpack(every.clone())).to(torch.uint8)))
        assert torch.equal(again, every), "pack(unpack(b)) != b for some byte b"

    return run_checks("check_pack_4bit", [
        ("two codes per uint8 byte", "a uint8 holds two 4-bit codes: half as many bytes as codes, dtype uint8",
         packed_shape),
        ("high nibble first", "neighbouring codes share a byte, the first of the two in the upper 4 bits (× 16)",
         order),
        ("unpack inverts pack", "unpack must return the codes in their original order: each byte gives its upper "
                                "then its lower 4 bits, byte after byte", inverse),
    ], learner=(pack, unpack))


__all__ = ["check_nf4_codes", "check_blockwise_absmax", "check_pack_4bit", "PUBLISHED_NF4"]
