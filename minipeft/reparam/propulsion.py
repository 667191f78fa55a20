r"""Propulsion: steering a model by rescaling each output (Kowsher, Prottasha & Bhat, COLING 2025,
arXiv:2409.10927).

Every targeted layer keeps its weights and multiplies its output, element by element, by a trained
vector raised to a fixed power:

    y = (W0 x + b) ⊙ z^{∘k},      z ∈ R^{d_out}, init z = 1,   k a fixed integer (the "degree")

so output i is scaled by z_i^k; at init 1^k = 1 and the model is exactly the base. On an embedding the
same applies to each embedding dimension: e = E0[ids] ⊙ z^{∘k}, z ∈ R^{dim}.

Why a power and not z alone: the gradient is ∂L/∂z = k·z^{k−1} ⊙ Σ_tokens (W0 x + b) ⊙ g_y, k times the
gradient a plain scale would get at z = 1, and the scale z^k moves by ≈ k·Δz per step: the degree acts as
a learning-rate multiplier for the scales that grows as a scale moves away from 1 (z^{k−1} > 1 above 1,
< 1 below) — scales that grow speed up, scales that shrink slow down.

Code names: z = `propulsion[name]` (d_out,) — the official code's name (`self.propulsion`); k =
`degree[name]`. peft has no Propulsion.

Merge: W = diag(z^k)·W0 (each row i times z_i^k), b = z^k ⊙ b; on an embedding E = E0·diag(z^k) (each
column). Exact up to rounding; unmerge restores W0 bit for bit (the spine keeps it). Trainable parameters:
d_out per linear layer, dim per embedding.

The degree: the official class `PropulsionLinear` defaults to 15, its `PEFT(model)` helper (what the README
and the notebooks call) to 5; we default to 5, the helper's value. Differences from the official code: its
`PEFT` wraps every nn.Linear and every nn.Embedding and trains the biases too (bias=True); here the default
target is "all-linear" (name embeddings in `target` to scale them), biases stay frozen (the paper's count
is d_out per layer). An embedding tied to the output head (GPT-2's wte) trains and runs, but cannot be
merged: E·diag(z^k) would rescale the head too, so `merge()` refuses it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import targeting
from ..config import PeftConfig, check_positive_int, register
from ..layer import AdapterLayer
from ..weights import base_weight, linear_dims, set_base_weight


@register
@dataclass
class PropulsionConfig(PeftConfig):
    k: int = 5  # degree of z^k: 5 in the official PEFT() helper (README, notebooks); its class default is 15

    method = "propulsion"

    def validate(self):
        check_positive_int("k", self.k)

    def prepare_model(self, model):
        """Note the output head's weight: an embedding tied to it cannot be merged (see PropulsionLayer)."""
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self._head_weight_id = id(getattr(head, "weight", None)) if head is not None else None

    @property
    def base_types(self):
        return targeting.LINEAR_TYPES + (nn.Embedding,)

    def default_target(self, model):
        return "all-linear"  # the official PEFT() also scales every embedding: add them to `target`

    @property
    def layer_class(self):
        return PropulsionLayer


class PropulsionLayer(AdapterLayer):
    """One class for linear layers (scales d_out outputs) and embeddings (scales the dim features)."""

    adapter_dicts = ("propulsion",)
    adapter_values = ("degree",)
    can_merge = True

    def __init__(self, base_layer: nn.Module, path: str = ""):
        super().__init__(base_layer, path)
        self.is_embedding = isinstance(base_layer, nn.Embedding)
        self.in_features, self.out_features = linear_dims(base_layer)  # embedding: (V, dim)
        self.propulsion = nn.ParameterDict()
        self.degree: dict[str, int] = {}

    def add_adapter(self, name: str, config: PropulsionConfig) -> None:
        device, dtype = self.base_device_dtype()
        self.propulsion[name] = nn.Parameter(torch.ones(self.out_features, device=device, dtype=dtype))  # z = 1
        self.degree[name] = config.k
        if self.is_embedding and id(self.base_layer.weight) == getattr(config, "_head_weight_id", None):
            self.can_merge = False  # tied to the output head (GPT-2's wte): E·diag(z^k) would rescale the head too

    def push(self, name: str) -> torch.Tensor:
        """z^k (d_out,): the factor each output is multiplied by."""
        return self.propulsion[name].pow(self.degree[name])

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)  # W0 x + b, or E0[ids]: (..., d_out)
        name = self.active
        if name is None:
            return y
        p = self.push(name)
        return (y.to(p.dtype) * p).to(y.dtype)

    def merge_weights(self, name: str) -> None:
        p = self.push(name).float()
        W0 = base_weight(self.base_layer).float()  # (d_out, d_in); embedding (V, dim)
        set_base_weight(self.base_layer, W0 * p if self.is_embedding else p[:, None] * W0)
        bias = getattr(self.base_layer, "bias", None)
        if bias is not None and not self.is_embedding:
            bias.copy_((bias.float() * p).to(bias.dtype))


@torch.no_grad()
def propulsion_scales(model, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """{module path: z^k (d_out,)} for every Propulsion layer of the adapter (float32, on the CPU)."""
    name = adapter_name or model.active_adapter
    model.check_adapter_name(name)
    return {path: layer.push(name).float().cpu() for path, layer in model.adapter_layers()
            if isinstance(layer, PropulsionLayer) and name in layer.adapter_names()}


__all__ = ["PropulsionConfig", "PropulsionLayer", "propulsion_scales"]
