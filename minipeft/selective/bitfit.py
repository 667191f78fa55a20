r"""BitFit: train only the bias terms (Ben Zaken, Ravfogel & Goldberg, 2022, arXiv:2106.10199).

Every affine map of the frozen model keeps its weight and trains its bias:

    y = W0 x + (b0 + δb),      trained: δb for the q, k, v, attention-output, FFN and LayerNorm (β) biases

Built on the sparse-delta machinery (`selective/sparse.py`) with whole bias vectors selected:
b0 = `base_layer.bias`, δb = `sparse_values[name]["bias"]` (init 0, so the model starts exactly at the
base), indices = all of them. Merge: b = b0 + δb (exact, and exactly undone by unmerge).
Trainable parameters: the number of bias entries selected — with target=None, every bias of the model,
which equals `count_bias_parameters(model)`.

The paper also trains the task head: pass `modules_to_save=["classifier"]`. Seed 002 / the paper's Fig. 1:
b_q and the intermediate FFN bias change most; `target=["query", "intermediate.dense"]` trains only those,
and `bias_changes` measures how much each bias moved, as the paper's (1/dim b)·‖δb‖₁ per layer.

Llama-style models have no bias terms at all (bias-free Linear layers, RMSNorm without β): wrapping one
raises a ValueError.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .. import targeting
from ..config import register
from .sparse import SelectiveConfig, SparseDeltaLayer, base_parameters


def count_bias_parameters(model: nn.Module) -> int:
    """Reference count from the model itself: entries of every parameter named "...bias" (adapter tensors
    excluded, a tied bias counted once)."""
    seen = {id(p): p.numel() for _, _, n, p in base_parameters(model) if n == "bias"}
    return sum(seen.values())


@register
@dataclass
class BitFitConfig(SelectiveConfig):
    """target: None = every module with a bias (LayerNorms included); or module-name suffixes/regex."""

    method = "bitfit"

    def select(self, model):
        skip = set()
        if self.modules_to_save:  # trained in full, not through BitFit
            skip = set(targeting.find_targets(model, self.modules_to_save, method="modules_to_save"))
        chosen = None if self.target is None else set(targeting.find_targets(model, self.target, method="bitfit"))
        if chosen and skip & chosen:
            raise ValueError(f"bitfit: {sorted(skip & chosen)[:5]} are both BitFit targets and modules_to_save")
        out, no_bias = {}, []
        owners = {path for path, *_ in base_parameters(model)}
        for path in sorted(owners):
            if path in skip or any(path.startswith(s + ".") for s in skip):
                continue
            module = targeting.unwrap(model.get_submodule(path)) if path else model
            bias = module._parameters.get("bias")
            if chosen is not None and path not in chosen:
                continue
            if bias is None:
                no_bias.append(path)
            else:
                out[f"{path}.bias" if path else "bias"] = torch.arange(bias.numel())
        if chosen is not None:
            no_bias += sorted(chosen - owners)
            if no_bias:
                raise ValueError(f"bitfit: target {self.target!r} matched modules without a bias: {no_bias[:5]}")
        if not out:
            raise ValueError(f"bitfit: this {targeting.model_type(model) or type(model).__name__} model has no "
                             f"bias terms to train. Llama-style models use Linear layers without bias and RMSNorm "
                             f"without β, so BitFit does not apply; use a model with biases (BERT, GPT-2) or "
                             f"another method (e.g. LoRA).")
        return out


@torch.no_grad()
def bias_changes(model, adapter_name: str | None = None) -> dict[str, dict[int | None, float]]:
    """How much each bias moved: {module type: {layer index: (1/dim b)·‖δb‖₁}}.

    Module type = the module path with the layer number taken out ("encoder.layer.*.attention.self.query");
    layer index = the first number in the path (None for modules outside the stack, e.g. embeddings).
    Ready for a heatmap: rows = module types, columns = layers.
    """
    name = adapter_name or model.active_adapter
    model.check_adapter_name(name)
    out: dict[str, dict] = {}
    for path, layer in model.adapter_layers():
        if not isinstance(layer, SparseDeltaLayer) or name not in layer.adapter_names():
            continue
        for key, delta in layer.sparse_values[name].items():
            full = f"{path}.{key.replace('__', '.')}"
            m = re.search(r"\.(\d+)\.", full)
            kind = re.sub(r"\.\d+\.", ".*.", full, count=1).removesuffix(".bias")
            out.setdefault(kind, {})[int(m.group(1)) if m else None] = delta.float().abs().mean().item()
    return out


__all__ = ["BitFitConfig", "bias_changes", "count_bias_parameters"]
