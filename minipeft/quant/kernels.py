"""Fused 4-bit dequantization for the GPU, beside the plain-PyTorch reference it must match.

The reference (`dequantize_tensors` below, wrapped by `nf4.dequantize_4bit_reference`) runs several kernels and writes intermediates:
unpack the bytes, look the codes up, dequantize the absmax vector, multiply, cast. A fused kernel
reads each packed byte once and writes the two output values once, which is what makes 4-bit
weights cheap on a GPU (the layer is memory-bound: 0.5 byte in, 2 bytes of bf16 out).

    out[2k]   = code[byte_k >> 4] · c2[block(2k)]      out[2k+1] = code[byte_k & 15] · c2[block(2k+1)]
    c2[b]     = q[b] / 127 · c1[b // 256] + offset      (double quant; else c2 is stored in fp32)

This module is the floor under nf4.py: it takes a quantized state (anything with nf4.QuantState's fields)
and the 16-entry code table, and imports nothing from the quantizer.

Selection (`dequantize_4bit_fused`): the Triton kernel below when `triton` imports and the tensor is
on CUDA; otherwise `torch.compile` of the reference core (falls back to the eager reference, with a
warning, if compilation fails, e.g. no C++ compiler). `nf4.dequantize_4bit` calls this on CUDA.

Caveat: the Triton kernel was written without a GPU at hand; tests/test_quant.py compares it with the
reference on CUDA and is skipped elsewhere. Floating-point results may differ from the reference in
the last bit (the kernel may fuse q·s + offset into one FMA).
"""
from __future__ import annotations

import warnings

import torch


def dequantize_absmax(q: torch.Tensor, s2: torch.Tensor, offset: torch.Tensor, blocksize: int = 256):
    """Inverse of quantize_absmax: c2 ≈ q/127 · c1 + offset (fp32)."""
    per_block = (s2 / 127).repeat_interleave(blocksize)[: q.numel()]  # (n_blocks,)
    return q.float() * per_block + offset


def dequantize_tensors(packed, code16, absmax, blocksize, absmax_scale=None, absmax_offset=None,
                       absmax_blocksize=256, dtype=torch.float32) -> torch.Tensor:
    """Plain-tensor core of dequantization → (n_pad,) in `dtype` (kernels.py compiles this function)."""
    if absmax_scale is not None:  # double quant: c2 ≈ q/127 · c1 + offset
        absmax = dequantize_absmax(absmax, absmax_scale, absmax_offset, absmax_blocksize)
    # one lookup per byte: pair_lut[16·hi + lo] = (code[hi], code[lo])
    pair_lut = torch.stack([code16.repeat_interleave(16), code16.repeat(16)], dim=1)  # (256, 2)
    vals = pair_lut[packed.long()].view(-1, blocksize)  # (n_blocks, blocksize)
    return (vals * absmax[:, None]).reshape(-1).to(dtype)


try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


if HAS_TRITON:

    @triton.jit
    def _dequant_4bit_kernel(packed_ptr, code_ptr, absmax_ptr, scale_ptr, offset_ptr, out_ptr, n_bytes,
                             BLOCKSIZE: tl.constexpr, ABSMAX_BLOCKSIZE: tl.constexpr,
                             DOUBLE_QUANT: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        j = pid * BLOCK + tl.arange(0, BLOCK)  # byte index; int64 so that 2·j cannot overflow
        mask = j < n_bytes
        byte = tl.load(packed_ptr + j, mask=mask, other=0).to(tl.int32)
        hi = tl.load(code_ptr + (byte >> 4))  # code value of element 2j (16-entry table, always in range)
        lo = tl.load(code_ptr + (byte & 15))  # code value of element 2j+1
        blk = j // (BLOCKSIZE // 2)  # both elements of a byte are in the same block (blocksize even)
        if DOUBLE_QUANT:
            q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.float32)
            s = tl.load(scale_ptr + blk // ABSMAX_BLOCKSIZE, mask=mask, other=0.0)
            c = q * (s / 127.0) + tl.load(offset_ptr)
        else:
            c = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
        # interleave (hi, lo) into one contiguous run of 2·BLOCK outputs: one coalesced store, not two strided
        vals = tl.reshape(tl.join(hi * c, lo * c), (2 * BLOCK,)).to(out_ptr.dtype.element_ty)
        k = 2 * pid * BLOCK + tl.arange(0, 2 * BLOCK)
        tl.store(out_ptr + k, vals, mask=k < 2 * n_bytes)


def dequantize_4bit_triton(state, code16: torch.Tensor, dtype: torch.dtype, block: int = 1024) -> torch.Tensor:
    if not (HAS_TRITON and state.packed.is_cuda):
        raise ValueError("the Triton kernel needs `triton` and a CUDA tensor")
    dev = state.packed.device
    code16 = code16.to(dev)
    n_bytes = state.packed.numel()
    out = torch.empty(2 * n_bytes, dtype=dtype, device=dev)
    dq = state.double_quant
    scale = state.absmax_scale if dq else state.absmax  # unused pointers get a valid dummy tensor
    offset = state.absmax_offset.reshape(1) if dq else state.absmax
    grid = (triton.cdiv(n_bytes, block),)
    _dequant_4bit_kernel[grid](state.packed, code16, state.absmax, scale, offset, out, n_bytes,
                               BLOCKSIZE=state.blocksize, ABSMAX_BLOCKSIZE=state.absmax_blocksize,
                               DOUBLE_QUANT=dq, BLOCK=block)
    return out[: state.numel].view(state.shape)


_compiled = None  # torch.compile(dequantize_tensors), built on first use; False once it has failed


def dequantize_4bit_compiled(state, code16: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(dequantize_tensors, dynamic=False)
    args = (state.packed, code16.to(state.packed.device), state.absmax, state.blocksize, state.absmax_scale,
            state.absmax_offset, state.absmax_blocksize, dtype)
    if _compiled is False:
        return dequantize_tensors(*args)[: state.numel].view(state.shape)
    try:
        flat = _compiled(*args)
    except Exception as e:  # compiler missing or unsupported backend: stay correct, just slower
        warnings.warn(f"torch.compile of 4-bit dequantization failed ({type(e).__name__}); using eager")
        _compiled = False
        flat = dequantize_tensors(*args)
    return flat[: state.numel].view(state.shape)


def dequantize_4bit_fused(state, code16: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Triton on CUDA when available, torch.compile otherwise."""
    if HAS_TRITON and state.packed.is_cuda:
        return dequantize_4bit_triton(state, code16, dtype)
    return dequantize_4bit_compiled(state, code16, dtype)
