"""Linear4bit: a frozen linear layer whose weight is stored in NF4 (QLoRA's base layer).

    Y = X · dequant(dequant(c1, c2), W_NF4)ᵀ + b        (computed in compute_dtype, e.g. bf16)

The weight lives only as packed 4-bit codes plus (double-quantized) block scales, in buffers, so no
optimizer ever sees it; the bias stays in its original precision as a frozen Parameter. A LoRA
layer wraps a Linear4bit like an nn.Linear: it reads `in_features`/`out_features`, calls
`forward`, and merges with `W = dequantize() + ΔW; set_weight(W)`. Merging into a 4-bit base is
lossy: W + ΔW is re-quantized (see `requant_error`).

Buffers in the state_dict: weight_packed (uint8), weight_absmax (int8, or fp32 without double
quant), weight_absmax_scale and weight_absmax_offset (fp32, double quant only). All safetensors-able.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .nf4 import QuantState, dequantize_4bit, dequantize_4bit_reference, quantize_4bit

try:  # GPT-2 stores its projections as Conv1D: y = x @ W + b with W of shape (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is optional for this module
    Conv1D = None


class Linear4bit(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 compute_dtype: torch.dtype = torch.float32, double_quant: bool = True,
                 quant_type: str = "nf4", blocksize: int = 64, weight_dtype: torch.dtype = torch.float32,
                 device=None):
        super().__init__()
        if compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"compute_dtype must be float32, bfloat16 or float16, got {compute_dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype  # dtype of the dequantized weight and of the matmul
        self.weight_dtype = weight_dtype  # dtype of the weight before quantization
        self.double_quant, self.quant_type, self.blocksize = double_quant, quant_type, blocksize
        # placeholders with the right shapes, so that load_state_dict works on a fresh layer
        state = quantize_4bit(torch.zeros(out_features, in_features, device=device), quant_type,
                              blocksize, double_quant)
        self._store(state)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    def _store(self, state: QuantState):
        self.register_buffer("weight_packed", state.packed)
        self.register_buffer("weight_absmax", state.absmax)
        self.register_buffer("weight_absmax_scale", state.absmax_scale)  # None without double quant
        self.register_buffer("weight_absmax_offset", state.absmax_offset)

    @classmethod
    def from_linear(cls, linear: nn.Module, compute_dtype: torch.dtype = torch.bfloat16,
                    double_quant: bool = True, quant_type: str = "nf4", blocksize: int = 64) -> "Linear4bit":
        """Quantize an nn.Linear (or a transformers Conv1D, whose weight is transposed)."""
        if isinstance(linear, nn.Linear):
            W = linear.weight.detach()  # (out, in)
        elif Conv1D is not None and isinstance(linear, Conv1D):
            W = linear.weight.detach().T  # Conv1D stores (in, out)
        else:
            raise ValueError(f"from_linear expects nn.Linear or transformers Conv1D, got {type(linear).__name__}")
        out_f, in_f = W.shape
        layer = cls(in_f, out_f, linear.bias is not None, compute_dtype, double_quant, quant_type, blocksize,
                    weight_dtype=W.dtype, device=W.device)
        layer.set_weight(W)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    @property
    def quant_state(self) -> QuantState:
        # .float(): model.to(torch.bfloat16) casts float buffers too; the scales are fp32 by design, so
        # cast back (move such models with .to(device) only: a bf16 round trip of the scales is lossy)
        f = lambda t: None if t is None else (t.float() if t.is_floating_point() else t)
        return QuantState(self.weight_packed, f(self.weight_absmax), f(self.weight_absmax_scale),
                          f(self.weight_absmax_offset), torch.Size((self.out_features, self.in_features)),
                          self.weight_dtype, self.quant_type, self.blocksize)

    def dequantize(self) -> torch.Tensor:
        """The weight (out, in) in compute dtype (fused kernel on CUDA, plain PyTorch on CPU)."""
        return dequantize_4bit(self.quant_state, self.compute_dtype)

    def set_weight(self, W: torch.Tensor):
        """Re-quantize a new (out, in) weight into the buffers (lossy; used to merge LoRA)."""
        if W.shape != (self.out_features, self.in_features):
            raise ValueError(f"set_weight expects shape {(self.out_features, self.in_features)}, got {tuple(W.shape)}")
        state = quantize_4bit(W.detach().to(self.weight_packed.device), self.quant_type, self.blocksize,
                              self.double_quant)
        self._store(state)

    def requant_error(self, W: torch.Tensor) -> dict:
        """What set_weight(W) would lose: errors of quantize → dequantize of W (fp32), layer unchanged."""
        W = W.detach().float()
        Wq = dequantize_4bit_reference(quantize_4bit(W, self.quant_type, self.blocksize, self.double_quant),
                                       torch.float32)
        err = Wq - W
        return {"max_abs": err.abs().max().item(), "rmse": err.pow(2).mean().sqrt().item(),
                "rel_fro": (err.norm() / W.norm().clamp_min(1e-30)).item()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:  # training an adapter: keep no dequantized weight
            return _Linear4bitFn.apply(x, self)
        return self.plain_forward(x)

    def plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        W = self.dequantize()  # (out, in), compute dtype
        b = None if self.bias is None else self.bias.to(self.compute_dtype)
        return F.linear(x.to(self.compute_dtype), W, b).to(x.dtype)

    @property
    def n_quantized_params(self) -> int:
        """The weights this layer stands for; PeftModel.trainable_summary counts them in the total."""
        return self.in_features * self.out_features

    @property
    def nbytes(self) -> int:
        """Bytes of the stored base weight (codes + scales) plus the bias."""
        n = self.quant_state.nbytes
        return n + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")


class _Linear4bitFn(torch.autograd.Function):
    """y = x·dequant(W)ᵀ + b, dequantizing again in backward instead of keeping dequant(W) alive.

    Keeping it between forward and backward would hold a full-precision copy of every layer until backward:
    the memory QLoRA is meant to save. Dequantizing twice (as bitsandbytes' MatMul4Bit does) costs a little
    compute and keeps only one layer's dequantized weight alive at a time."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return layer.plain_forward(x)

    @staticmethod
    def backward(ctx, g):  # the base is frozen: only x gets a gradient, g_x = g · dequant(W)
        W = ctx.layer.dequantize()  # (out, in), compute dtype
        return (g.to(W.dtype) @ W).to(g.dtype), None


def linear_4bit(x: torch.Tensor, layer: Linear4bit) -> torch.Tensor:
    """layer(x): the autograd graph keeps no dequantized copy of the weight (what Linear4bit.forward does)."""
    return layer(x)


def _matches(name: str, skip) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def quantize_model(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16, skip=("lm_head",),
                   double_quant: bool = True, quant_type: str = "nf4", verbose: bool = True) -> nn.Module:
    """Replace every nn.Linear (and transformers Conv1D) except those named in `skip` by a Linear4bit.

    Embeddings, norms and skipped layers are left as they are. Modifies `model` in place and returns it;
    the bytes saved are printed (verbose) and kept in `model.quant_report`.
    """
    if isinstance(skip, str):
        skip = (skip,)
    kinds = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, kinds) and not _matches(n, skip)]
    before = after = 0
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        q = Linear4bit.from_linear(mod, compute_dtype, double_quant, quant_type)
        before += sum(p.numel() * p.element_size() for p in mod.parameters())
        after += q.nbytes
        setattr(parent, child, q)
    n_weights = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear4bit))
    report = {"replaced": len(targets), "bytes_before": before, "bytes_after": after,
              "bytes_saved": before - after, "bytes_per_param": after / max(n_weights, 1)}
    model.quant_report = report
    if verbose:
        print(f"quantize_model: {len(targets)} layers to {quant_type}, {before / 2**20:.2f} MiB -> "
              f"{after / 2**20:.2f} MiB (saved {(before - after) / 2**20:.2f} MiB, "
              f"{report['bytes_per_param']:.3f} bytes/param incl. bias)")
    return model


def base_weight_bytes_per_param(model: nn.Module) -> float:
    """Stored bytes of all Linear4bit weights (codes + scales, no bias) / their parameter count."""
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if not layers:
        raise ValueError("model has no Linear4bit layer")
    return sum(m.quant_state.nbytes for m in layers) / sum(m.in_features * m.out_features for m in layers)


# let target="all-linear" (and LoRA's checks) treat a 4-bit layer as a linear layer
from .. import targeting  # noqa: E402

targeting.register_linear_type(Linear4bit)
