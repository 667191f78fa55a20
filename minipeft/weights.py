"""Reading and writing a frozen base layer's weight, whatever stores it.

Every method that merges into the base, or computes from W0 (DoRA's norm, PaFi's magnitudes), goes through
these three functions, so a new base type (GPT-2's transposed `Conv1D`, the 4-bit `Linear4bit`, an
`nn.Embedding`) is taught here once, not in each method.

Layouts: `base_weight` returns the weight as the layer uses it in PyTorch's convention — (d_out, d_in) for
linear-like layers (Conv1D stores (d_in, d_out) and is transposed), (num_embeddings, dim) for an embedding.
A quantized layer (any module with `dequantize()` / `set_weight()`) is dequantized on read and re-quantized
on write (lossy; the spine keeps the original codes while a merge is in place).
"""
from __future__ import annotations

import torch
from torch import nn

try:  # GPT-2 stores its projections as Conv1D with the weight transposed: (d_in, d_out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is optional for plain PyTorch models
    class Conv1D(nn.Module):  # type: ignore[no-redef]
        pass


def linear_dims(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of nn.Linear, GPT-2 Conv1D or a linear-like layer with in/out_features."""
    if isinstance(layer, Conv1D):
        d_in, d_out = layer.weight.shape
        return d_in, d_out
    if isinstance(layer, nn.Embedding):
        return layer.num_embeddings, layer.embedding_dim
    return layer.in_features, layer.out_features


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The weight in PyTorch layout: (d_out, d_in), or (num_embeddings, dim) for an embedding."""
    if hasattr(layer, "dequantize"):
        return layer.dequantize()
    return layer.weight.T if isinstance(layer, Conv1D) else layer.weight


@torch.no_grad()
def set_base_weight(layer: nn.Module, W: torch.Tensor) -> None:
    """Overwrite the weight with W (same layout as `base_weight`); re-quantizes a quantized layer."""
    if hasattr(layer, "set_weight"):
        layer.set_weight(W.float())
    elif isinstance(layer, Conv1D):
        layer.weight.copy_(W.T.to(layer.weight.dtype))
    else:
        layer.weight.copy_(W.to(layer.weight.dtype))


__all__ = ["Conv1D", "linear_dims", "base_weight", "set_base_weight"]
