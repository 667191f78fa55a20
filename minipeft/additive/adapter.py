r"""Bottleneck adapters (Houlsby et al., 2019, arXiv:1902.00751).

A small two-layer network is inserted after a sublayer's output projection, with its own skip connection:

    h ← h + W_up f(W_down h + b_down) + b_up,      W_down ∈ R^{m×d}, b_down ∈ R^m, W_up ∈ R^{d×m}, b_up ∈ R^d

h is the output of the wrapped projection (d = its output dim), m the bottleneck. The result then goes on to
the block's dropout, residual add and LayerNorm as before. Houlsby puts two adapters per block: after the
attention output projection and after the FFN output projection (`targeting.DEFAULT_TARGETS
["sublayer_outputs"]`: Llama o_proj/down_proj, BERT output.dense, GPT-2 c_proj).

Code names: W_down, b_down = `adapter_down[name].weight/.bias` (m, d), (m,); W_up, b_up =
`adapter_up[name].weight/.bias` (d, m), (d,); f = `act[name]`; m = `config.bottleneck`.

Init (near identity): weights ~ N(0, σ²) truncated to ±2σ with σ = 1e-2 (the paper's text; the released
adapter-bert code defaults to 1e-3), biases 0 — so the adapter adds only a tiny W_up f(W_down h) at start.
Trainable parameters per wrapped layer: 2md + d + m.
Not mergeable: f is nonlinear, so the adapter cannot be folded into W (model.merge() raises).
Inference cost: two extra (d×m) matmuls per wrapped layer and token, 2md multiply-adds; see
`adapter_macs_per_token`. Time it in a chapter with `with model.disable_adapter():` as the baseline.

Differences from the paper, honestly: (1) wrapping the projection puts the adapter before the block's
dropout (adapter-bert applies it after), which only matters in training mode; (2) the paper also trains
the LayerNorms and the task head: pass `modules_to_save=["LayerNorm", "classifier"]` (BERT) for that.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import targeting
from ..config import PeftConfig, check_choice, check_positive, check_positive_int, register
from ..layer import AdapterLayer
from ..weights import linear_dims

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU, "identity": nn.Identity}


@register
@dataclass
class AdapterConfig(PeftConfig):
    bottleneck: int = 16  # m; the paper sweeps m ∈ {8, 64, 256} on GLUE
    activation: str = "gelu"  # f; GELU as in BERT and the released adapter-bert code (the paper leaves f open)
    init_std: float = 1e-2  # σ of the truncated-normal weight init (the paper's 10^-2)

    method = "adapter"

    def validate(self):
        check_positive_int("bottleneck", self.bottleneck)
        check_choice("activation", self.activation, set(ACTIVATIONS))
        check_positive("init_std", self.init_std)

    @property
    def base_types(self):
        return targeting.LINEAR_TYPES

    def default_target(self, model):
        return targeting.default_target(model, "sublayer_outputs", self.method)

    @property
    def layer_class(self):
        return BottleneckAdapter


class BottleneckAdapter(AdapterLayer):
    adapter_dicts = ("adapter_down", "adapter_up", "act")
    can_merge = False  # W_up f(W_down h) is not linear in h

    def __init__(self, base_layer: nn.Module, path: str = ""):
        super().__init__(base_layer, path)
        _, self.out_features = linear_dims(base_layer)
        self.adapter_down, self.adapter_up, self.act = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()

    def add_adapter(self, name: str, config: AdapterConfig) -> None:
        device, dtype = self.base_device_dtype()
        d, m = self.out_features, config.bottleneck
        self.adapter_down[name] = nn.Linear(d, m, device=device, dtype=dtype)  # W_down (m, d), b_down (m,)
        self.adapter_up[name] = nn.Linear(m, d, device=device, dtype=dtype)  # W_up (d, m), b_up (d,)
        self.act[name] = ACTIVATIONS[config.activation]()
        self.reset_adapter(name, config.init_std)

    @torch.no_grad()
    def reset_adapter(self, name: str, std: float = 1e-2) -> None:
        for lin in (self.adapter_down[name], self.adapter_up[name]):
            nn.init.trunc_normal_(lin.weight, mean=0.0, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        h = self.base_layer(x, *args, **kwargs)  # (..., d)
        name = self.active
        if name is None:
            return h
        down, up = self.adapter_down[name], self.adapter_up[name]
        z = self.act[name](down(h.to(down.weight.dtype)))  # (..., m)
        return h + up(z).to(h.dtype)  # (..., d): h + W_up f(W_down h + b_down) + b_up


def adapter_macs_per_token(model, adapter_name: str | None = None) -> dict[str, int]:
    """Multiply-adds per token added by adapter `adapter_name` next to those of the base's linear layers.

    {"adapter": Σ 2·m·d over wrapped layers, "base_linear": Σ d_in·d_out over all linear layers,
     "layers": number of wrapped layers}. A count, not a timing: time it with and without
    `model.disable_adapter()` to see what the extra small matmuls cost on your hardware.
    """
    name = adapter_name or model.active_adapter
    model.check_adapter_name(name)
    layers = [layer for _, layer in model.adapter_layers()
              if isinstance(layer, BottleneckAdapter) and name in layer.adapter_names()]
    extra = sum(2 * layer.adapter_down[name].weight.numel() for layer in layers)
    base = 0
    for _, module in targeting.named_base_modules(model.base_model):
        if targeting.is_linear(targeting.unwrap(module)):
            d_in, d_out = linear_dims(targeting.unwrap(module))
            base += d_in * d_out
    return {"adapter": extra, "base_linear": base, "layers": len(layers)}


__all__ = ["AdapterConfig", "BottleneckAdapter", "adapter_macs_per_token"]
