"""NF4: 4-bit NormalFloat with blockwise absmax and double quantization (QLoRA, Dettmers et al. 2023).

A weight tensor W is cut into blocks of 64 consecutive values. Each block b keeps one fp32 scale
c_b = max|W_b| and, per value, the index of the nearest of 16 code values q_j in [-1, 1]:

    W_b[i]  ≈  q[idx_b[i]] · c_b,        idx_b[i] = argmin_j |W_b[i] / c_b − q_j|        (4 bits each)

NF4's q_j are quantiles of N(0, 1) rescaled to [-1, 1], so each code is used about equally often
when W is normal (the paper's "information-theoretically optimal" argument, approximately):

    δ = ½[(1 − 1/30) + (1 − 1/32)]
    positives: Φ⁻¹(linspace(δ, ½, 9)[:-1]),  negatives: −Φ⁻¹(linspace(δ, ½, 8)[:-1]),  plus 0,
    sorted and divided by the largest. 8 positives, 7 negatives and an exact zero.

Double quantization (the paper's c1, c2): the fp32 scale vector c2 costs 32/64 = 0.5 bit/param. We
subtract its mean (one fp32 offset) and quantize it in blocks of 256 to 8 bits, keeping one fp32
scale per block (c1): 8/64 + 32/(64·256) ≈ 0.127 bit/param, so ≈ 4.127 bits/param in all.

Our 8-bit scheme for c2 is a plain symmetric int8 absmax code (round(c/s·127)), not bitsandbytes'
nonlinear "dynamic" 8-bit map. Why: it is one line, its error bound is obvious (half a step,
s/254 per scale), and after subtracting the mean the scales are spread evenly enough that a
linear grid loses little. The storage cost is the same, so bits/param matches the paper.

For comparison the module also has FP4 (E2M1) and Int4 code books (`CODES`); the same blockwise
machinery quantizes with any sorted code book of at most 16 values.

Nibble order: element 2k goes in the high 4 bits of byte k, element 2k+1 in the low 4 bits
(the order bitsandbytes uses). Tensors are padded with zeros to a multiple of the block size.
Everything here is device-agnostic; `dequantize_4bit` picks the fused kernel on CUDA.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import torch

from .kernels import dequantize_4bit_fused, dequantize_absmax, dequantize_tensors


def nf4_code_values() -> torch.Tensor:
    """The 16 NF4 code values, derived from normal quantiles as in the paper (sorted, fp32)."""
    inv_cdf = NormalDist().inv_cdf
    delta = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))
    pos = [inv_cdf(p) for p in torch.linspace(delta, 0.5, 9, dtype=torch.float64)[:-1].tolist()]
    neg = [-inv_cdf(p) for p in torch.linspace(delta, 0.5, 8, dtype=torch.float64)[:-1].tolist()]
    v = torch.tensor(sorted(pos + neg + [0.0]), dtype=torch.float64)
    return (v / v.abs().max()).float()


def fp4_code_values(variant: str = "e2m1") -> torch.Tensor:
    """4-bit floats: 1 sign, 2 exponent, 1 mantissa bit (E2M1), divided by the largest value.

    variant="e2m1": the standard E2M1 (OCP MX spec), exponent bias 1: subnormals (e=0) m/2 → 0, 0.5;
    normals (1 + m/2)·2^(e−1) → 1, 1.5, 2, 3, 4, 6. Largest 6.
    variant="bnb": bitsandbytes' "fp4": normals (1 + m/2)·2^k for k ∈ {1, 2, 3} → 2, 3, 4, 6, 8, 12 and a
    subnormal slot of 0 and 0.0625 (= 0.0052 after scaling). Largest 12. Spending a code on a value that
    close to 0 makes it worse than Int4 in round-trip MSE on normal weights (our measurement).
    ±0 collapse, so both have 15 distinct values.
    """
    if variant == "e2m1":
        mags = [m / 2 for m in (0, 1)] + [(1 + m / 2) * 2.0 ** (e - 1) for e in (1, 2, 3) for m in (0, 1)]
    elif variant == "bnb":
        mags = [0.0, 0.0625] + [(1 + m / 2) * 2.0**k for k in (1, 2, 3) for m in (0, 1)]
    else:
        raise ValueError(f"fp4 variant must be 'e2m1' or 'bnb', got {variant!r}")
    v = torch.tensor(sorted(set([-x for x in mags] + mags)), dtype=torch.float64) + 0.0  # −0 → +0
    return (v / v.max()).float()


def int4_code_values() -> torch.Tensor:
    """Symmetric integer absmax code: k/7 for k = -7..7 (15 values, zero exact, no clipping)."""
    return torch.arange(-7, 8, dtype=torch.float64).div(7).float()


CODES = {"nf4": nf4_code_values(), "fp4": fp4_code_values("e2m1"), "fp4_bnb": fp4_code_values("bnb"),
         "int4": int4_code_values()}
_ON_DEVICE: dict = {}  # (quant_type, device, pad16) → code book already on that device


def get_code(quant_type: str, device=None, pad16: bool = False) -> torch.Tensor:
    """The sorted code book; pad16=True appends zeros up to 16 entries (a full 4-bit lookup table)."""
    if quant_type not in CODES:
        raise ValueError(f"quant_type must be one of {sorted(CODES)}, got {quant_type!r}")
    key = (quant_type, torch.device(device or "cpu"), pad16)
    if key not in _ON_DEVICE:
        code = CODES[quant_type]
        code = torch.nn.functional.pad(code, (0, 16 - code.numel())) if pad16 else code
        _ON_DEVICE[key] = code.to(key[1])
    return _ON_DEVICE[key]


# ---------------------------------------------------------------- packing: two codes per byte
def pack_4bit(idx: torch.Tensor) -> torch.Tensor:
    """(n,) integer codes in [0, 16), n even → (n/2,) uint8; element 2k in the high nibble."""
    if idx.numel() % 2:
        raise ValueError("pack_4bit needs an even number of codes")
    pairs = idx.reshape(-1, 2).to(torch.uint8)  # (n/2, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_4bit(packed: torch.Tensor) -> torch.Tensor:
    """(n/2,) uint8 → (n,) uint8 codes, inverse of pack_4bit."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).reshape(-1)


# ---------------------------------------------------------------- blockwise absmax, 4-bit codes
def quantize_blockwise(W: torch.Tensor, code: torch.Tensor, blocksize: int = 64):
    """Flatten W, pad to a multiple of blocksize, return (idx uint8 (n_pad,), absmax fp32 (n_blocks,))."""
    if blocksize <= 0 or blocksize % 2:
        raise ValueError(f"blocksize must be a positive even number, got {blocksize}")
    x = W.detach().reshape(-1).float()
    x = torch.nn.functional.pad(x, (0, (-x.numel()) % blocksize)).view(-1, blocksize)  # (n_blocks, 64)
    absmax = x.abs().amax(dim=1)  # (n_blocks,) = c2
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))  # all-zero block: codes of 0
    normed = (x / scale[:, None]).reshape(-1)  # in [-1, 1]
    # nearest code: the midpoints between neighbouring codes are the decision boundaries
    mids = (code[1:] + code[:-1]) / 2
    idx = torch.bucketize(normed, mids, out_int32=True)  # ties go to the lower code
    return idx.to(torch.uint8), absmax


def quantize_absmax(absmax: torch.Tensor, blocksize: int = 256):
    """Double quantization of the fp32 scales: (c2 − mean) in blocks of 256 → int8 + fp32 scale each."""
    offset = absmax.mean()  # fp32, 0-d (absmax: the per-block constants c2)
    c = absmax - offset
    c = torch.nn.functional.pad(c, (0, (-c.numel()) % blocksize)).view(-1, blocksize)
    s2 = c.abs().amax(dim=1)  # (n_blocks / 256,) = c1
    s2_safe = torch.where(s2 > 0, s2, torch.ones_like(s2))
    q = torch.round(c / s2_safe[:, None] * 127).to(torch.int8).reshape(-1)[: absmax.numel()]
    return q, s2, offset


@dataclass
class QuantState:
    """A packed 4-bit tensor. Without double quant `absmax` is fp32 and `absmax_scale`/`absmax_offset` are None."""

    packed: torch.Tensor  # (n_pad/2,) uint8, two codes per byte
    absmax: torch.Tensor  # (n_blocks,) fp32 c2, or int8 when double-quantized
    absmax_scale: torch.Tensor | None  # (ceil(n_blocks/256),) fp32 c1
    absmax_offset: torch.Tensor | None  # () fp32 mean of c2
    shape: torch.Size
    dtype: torch.dtype  # dtype of the original weight
    quant_type: str = "nf4"
    blocksize: int = 64
    absmax_blocksize: int = 256

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes actually stored (codes + scales); the 16-entry code book is shared, not counted."""
        ts = [self.packed, self.absmax, self.absmax_scale, self.absmax_offset]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def absmax_fp32(self) -> torch.Tensor:
        if not self.double_quant:
            return self.absmax
        return dequantize_absmax(self.absmax, self.absmax_scale, self.absmax_offset, self.absmax_blocksize)


def bits_per_param(state: QuantState) -> float:
    return 8 * state.nbytes / state.numel


def quantize_4bit(W: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                  double_quant: bool = True, absmax_blocksize: int = 256) -> QuantState:
    """Quantize any float tensor (CPU or CUDA) to packed 4-bit codes + (double-quantized) absmax."""
    if not torch.is_floating_point(W):
        raise ValueError(f"quantize_4bit expects a floating-point tensor, got {W.dtype}")
    code = get_code(quant_type, W.device)
    idx, absmax = quantize_blockwise(W, code, blocksize)
    scale = offset = None
    if double_quant:
        absmax, scale, offset = quantize_absmax(absmax, absmax_blocksize)
    return QuantState(pack_4bit(idx), absmax, scale, offset, W.shape, W.dtype,
                      quant_type, blocksize, absmax_blocksize)


def dequantize_4bit_reference(state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain PyTorch dequantization (the reference every fused kernel must match)."""
    code16 = get_code(state.quant_type, state.packed.device, pad16=True)  # (16,)
    flat = dequantize_tensors(state.packed, code16, state.absmax, state.blocksize, state.absmax_scale,
                              state.absmax_offset, state.absmax_blocksize, dtype or state.dtype)
    return flat[: state.numel].view(state.shape)


def dequantize_4bit(state: QuantState, dtype: torch.dtype | None = None, fused: bool | None = None) -> torch.Tensor:
    """Dequantize to `dtype` (default: the original dtype). fused=None: the fused kernel on CUDA."""
    if fused is None:
        fused = state.packed.is_cuda
    if fused:
        code16 = get_code(state.quant_type, state.packed.device, pad16=True)
        return dequantize_4bit_fused(state, code16, dtype or state.dtype)
    return dequantize_4bit_reference(state, dtype)


def roundtrip_mse(W: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False) -> float:
    """Mean squared error of quantize → dequantize (fp32), for comparing code books."""
    Wq = dequantize_4bit_reference(quantize_4bit(W, quant_type, blocksize, double_quant), torch.float32)
    return (Wq - W.float()).pow(2).mean().item()
