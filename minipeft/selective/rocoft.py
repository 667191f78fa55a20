r"""RoCoFT: Row-Column Fine-Tuning (Kowsher et al., ACL 2025, arXiv:2410.10075).

Fine-tune a few rows (or a few columns) of each frozen weight matrix and nothing else. With the set
S = {i_1, ..., i_k} of chosen indices and W0 ∈ R^{d_out×d_in} (PyTorch layout):

    rows:     W = W0 with rows    S replaced by R ∈ R^{k×d_in},    y = W x + b
    columns:  W = W0 with columns S replaced by C ∈ R^{d_out×k},   y = W x + b

Row i of W is output neuron i, so training k rows retunes k output neurons completely; training k
columns lets k input features reach every output differently. R and C start at their pre-trained values
(R = W0[S, :], C = W0[:, S]), so the model starts exactly at the base.

Code names: R or C = `rocoft_weight[name]` ((k, d_in) for rows, (d_out, k) for columns), S =
`rocoft_index[name].index` (k,) (a buffer, saved with the adapter), the optional trained bias b =
`rocoft_bias[name]` (d_out,). peft has no RoCoFT; the names follow ours.

Forward: the base layer's own output plus the change of the chosen rows or columns,

    rows:     y = W0 x + b  + scatter_S((R − W0[S, :]) x)           (only k outputs get a term)
    columns:  y = W0 x + b  + (C − W0[:, S]) x[S]

which equals (W x + b) up to rounding, never copies the d_out×d_in weight, saves nothing for the backward
pass beyond x and the k-row slice, and works on every linear base the spine reads through `minipeft.weights` (nn.Linear, GPT-2's
Conv1D, the 4-bit Linear4bit). The gradient reaching R is exactly the rows S of the full gradient
g_y xᵀ (columns: the columns S), so RoCoFT is full fine-tuning with the gradient masked to S; tested.

Merge: W[S, :] = R (or W[:, S] = C), b = trained bias: exact copies, undone bit for bit by unmerge.
Trainable parameters per layer: k·d_in (rows) or k·d_out (columns), + d_out with bias=True.

Which indices: `select="first"` takes 0..k−1, as the official code (Kowsher/RoCoFT, `RoCoFT.row` /
`RoCoFT.column`). `select="random"` draws k distinct indices per matrix from `seed` and the module path
(reproducible); the official code can also pick them by a pruning score (|W| times the input norm, largest
or smallest first, its `prune.py`), not implemented here. k larger than the dimension is clipped to it, as in the official code.

Where it differs from the official code: the official layer concatenates the trained rows and the frozen
rest into a new full weight on every forward pass; we add the change of the k rows to the base output
(same function, no d_out×d_in copy, which autograd would keep for the backward pass). The official `PEFT(..., bias=True)` also trains every bias by
default; here bias=False is the default (the paper's count k·d_in, and Llama-style models have no bias).

Why not `selective/sparse.py` (element-level deltas, BitFit/FISH): it would express RoCoFT as a flat
index of k·d_in entries per matrix, rebuild the whole weight W0 + scatter(δ) on every forward pass and run
the module through `functional_call`. Autograd keeps that rebuilt weight for the backward pass, so every
targeted matrix is stored once more per step (on the tiny Llama: 2.3 MiB more saved for backward, about
the 2.8 MiB of its targeted weights; on a 7B model, the size of the model). Here the saved state is x
alone, the file holds (k, d_in) slices with k indices instead of k·d_in long indices, and the trained
tensors are the rows themselves, as in the official code (the same as deltas under Adam without weight
decay; AdamW's decay then pulls the rows toward 0, as in the paper's training). Speed is not the reason:
at the tiny Llama's size the sparse path's one matmul is slightly faster (about 0.85x the time of a step
here, on one CPU thread), the extra small ops of this layer costing more than a 128×352 copy.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import targeting
from ..config import PeftConfig, check_choice, check_positive_int, register
from ..layer import AdapterLayer
from ..weights import base_weight, linear_dims, set_base_weight


@register
@dataclass
class RoCoFTConfig(PeftConfig):
    k: int = 1  # rows (or columns) trained per matrix; the paper uses 1 and 3 ("rank")
    mode: str = "rows"  # "rows": k output neurons (k·d_in numbers); "columns": k input features (k·d_out)
    select: str = "first"  # "first": indices 0..k-1 (official code); "random": k drawn per matrix from seed
    seed: int = 0  # for select="random": with the module path, fixes each matrix's draw
    bias: bool = False  # also train the whole bias vector where the layer has one (official default: True)

    method = "rocoft"

    def validate(self):
        check_positive_int("k", self.k)
        check_choice("mode", self.mode, {"rows", "columns"})
        check_choice("select", self.select, {"first", "random"})
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.bias, bool):
            raise ValueError(f"bias must be True or False, got {self.bias!r}")

    def indices(self, path: str, n: int) -> torch.Tensor:
        """The sorted indices (long, (min(k, n),)) of the rows/columns trained in the matrix at `path`."""
        k = min(self.k, n)
        if self.select == "first":
            return torch.arange(k)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(path.encode()))
        return torch.randperm(n, generator=g)[:k].sort().values

    @property
    def base_types(self):
        return targeting.LINEAR_TYPES

    def default_target(self, model):
        return "all-linear"  # the official PEFT() wraps every linear layer

    @property
    def layer_class(self):
        return RoCoFTLinear


class RoCoFTLinear(AdapterLayer):
    adapter_dicts = ("rocoft_weight", "rocoft_index", "rocoft_bias")
    adapter_values = ("mode",)
    can_merge = True

    def __init__(self, base_layer: nn.Module, path: str = ""):
        super().__init__(base_layer, path)
        self.in_features, self.out_features = linear_dims(base_layer)
        self.rocoft_weight, self.rocoft_bias = nn.ParameterDict(), nn.ParameterDict()
        self.rocoft_index = nn.ModuleDict()  # a module per adapter holding the `index` buffer
        self.mode: dict[str, str] = {}

    @torch.no_grad()
    def add_adapter(self, name: str, config: RoCoFTConfig) -> None:
        device, dtype = self.base_device_dtype()
        W0 = base_weight(self.base_layer)  # (d_out, d_in)
        dim = 0 if config.mode == "rows" else 1
        idx = config.indices(self.path, W0.shape[dim]).to(W0.device)
        holder = nn.Module()
        holder.register_buffer("index", idx.to(device))  # (k,) which rows / columns: saved, never trained
        self.rocoft_index[name] = holder
        # R = W0[S, :] (k, d_in) or C = W0[:, S] (d_out, k): the chosen slice, starting at its pre-trained values
        self.rocoft_weight[name] = nn.Parameter(W0.index_select(dim, idx).to(device, dtype).clone())
        b0 = getattr(self.base_layer, "bias", None)
        if config.bias and b0 is not None:
            self.rocoft_bias[name] = nn.Parameter(b0.detach().to(device, dtype).clone())  # (d_out,)
        self.mode[name] = config.mode

    def slice_change(self, name: str) -> torch.Tensor:
        """R − W0[S, :] (k, d_in) or C − W0[:, S] (d_out, k): how far the chosen slice has moved."""
        T, idx = self.rocoft_weight[name], self.rocoft_index[name].index
        dim = 0 if self.mode[name] == "rows" else 1
        return T - base_weight(self.base_layer).index_select(dim, idx).to(T.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        name = self.active
        if name is None:
            return y
        idx, D = self.rocoft_index[name].index, self.slice_change(name)
        xa = x.to(D.dtype)
        if self.mode[name] == "rows":
            y = y.index_add(-1, idx, F.linear(xa, D).to(y.dtype))  # (..., k) added to the k chosen outputs
        else:
            y = y + F.linear(xa.index_select(-1, idx), D).to(y.dtype)  # (..., d_out) from the k chosen inputs
        if name in self.rocoft_bias:
            y = y + (self.rocoft_bias[name] - self.base_layer.bias.to(D.dtype)).to(y.dtype)
        return y

    def merge_weights(self, name: str) -> None:
        W = base_weight(self.base_layer).float().clone()
        dim = 0 if self.mode[name] == "rows" else 1
        W.index_copy_(dim, self.rocoft_index[name].index, self.rocoft_weight[name].float())
        set_base_weight(self.base_layer, W)
        if name in self.rocoft_bias:
            self.base_layer.bias.copy_(self.rocoft_bias[name].to(self.base_layer.bias.dtype))


@torch.no_grad()
def weight_change(layer: RoCoFTLinear, name: str = "default") -> torch.Tensor:
    """|W − W0| of one RoCoFT layer as a dense (d_out, d_in) matrix: zero outside the chosen rows/columns."""
    W0 = base_weight(layer.base_layer).float()
    out = torch.zeros_like(W0)
    dim = 0 if layer.mode[name] == "rows" else 1
    return out.index_copy(dim, layer.rocoft_index[name].index, layer.slice_change(name).float().abs())


__all__ = ["RoCoFTConfig", "RoCoFTLinear", "weight_change"]
