r"""Sparse deltas on the base model's own parameters: the machinery of selective methods.

Selective methods (BitFit, FISH, PaFi, ID3) train a chosen subset S of the entries of the frozen
parameters θ0. We keep θ0 frozen and train only the deltas of the chosen entries:

    θ = θ0 + scatter_S(δ),      δ ∈ R^{|S|}, init 0

Per wrapped module and adapter, for each selected parameter p (e.g. "bias"): a flat index buffer
`sparse_index[name][p]` (long, |S_p|,) into θ0_p.flatten() and the trainable values `sparse_values[name][p]`
(|S_p|,). The forward pass runs the module with the patched parameters via
`torch.func.functional_call`, so several adapters, `disable_adapter()` and `delete_adapter` work and θ0
is never touched. Merge adds δ in place; unmerge restores θ0 exactly (the spine keeps it while merged).
Saving writes only the indices and the values ("save only the changed entries").
Trainable parameters: |S|.

`SparseConfig(selection={param_name: bool mask | flat index tensor | list of ints})` is the generic entry
point (FISH/PaFi/ID3 compute masks and pass them here); subclasses such as BitFit override `select`.
In adapter_config.json a selection is stored as counts {param_name: |S_p|}; the indices come from the
adapter file.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from .. import targeting
from ..config import PeftConfig, register
from ..layer import AdapterLayer

KEY_SEP = "__"  # a parameter of a submodule ("transform.dense.bias") is keyed "transform__dense__bias"


class SelectiveConfig(PeftConfig):
    """Base for selective methods: `select(model)` says which entries of which parameters are trained."""

    def select(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """{parameter name as in the unwrapped base, e.g. "encoder.layer.0.attention.self.query.bias":
        flat index tensor (long)}."""
        raise NotImplementedError

    # ---- hooks the spine calls ------------------------------------------------------------------
    def prepare_model(self, model):
        self._plan = plan_selection(model, self.select(model))
        if self.modules_to_save:
            full = targeting.find_targets(model, self.modules_to_save, method="modules_to_save")
            both = [p for p in self._plan if any(p == f or p.startswith(f + ".") for f in full)]
            if both:
                raise ValueError(f"{self.method}: {both[:5]} are selected and also in modules_to_save")

    def default_target(self, model):
        return "|".join(re.escape(path) for path in self._plan)  # exactly the owner modules (a regex)

    @property
    def layer_class(self):
        return SparseDeltaLayer

    def indices_for(self, module: nn.Module) -> dict[str, torch.Tensor]:
        for path, (owner, idx) in self._plan.items():
            if owner is module:
                return idx
        raise ValueError(f"{type(self).__name__}: module {type(module).__name__} has no selected entries")


def base_parameters(model: nn.Module):
    """(owner path, owner module, local name, parameter) for every parameter of the unwrapped base."""
    for path, module in [("", model), *targeting.named_base_modules(model)]:
        module = targeting.unwrap(module)
        for pname, p in module.named_parameters(recurse=False):
            yield path, module, pname, p


def plan_selection(model, selection: dict[str, torch.Tensor]) -> dict[str, tuple[nn.Module, dict]]:
    """{owner path: (owner module, {local key: sorted unique flat indices})}; checks names, ranges, ties.

    A parameter owned by a module inside another selected owner is handed to the outer one (functional_call
    reaches it by its dotted name). Weights tied across modules (GPT-2 wte / lm_head) are refused: a delta
    applied through one module would not reach the other."""
    params = {}
    owners_of = {}
    for path, module, pname, p in base_parameters(model):
        params.setdefault(f"{path}.{pname}" if path else pname, (path, p))
        owners_of.setdefault(id(p), []).append(path)
    known = {}
    for name, index in selection.items():
        name = name.replace(".base_layer.", ".")
        if name not in params:
            raise ValueError(f"selection names a parameter the model does not have: {name!r} "
                             f"(e.g. {list(params)[:3]})")
        path, p = params[name]
        idx = as_flat_index(name, index, p)
        if idx.numel():
            known[name] = (path, p, idx)
    if not known:
        raise ValueError("the selection is empty: no parameter entry is selected")
    paths = sorted({path for path, _, _ in known.values()}, key=len)
    outer = {}
    for path in paths:  # an owner inside another owner is folded into the outer one
        outer[path] = next((o for o in outer if o == "" or path.startswith(o + ".")), path)
    if "" in outer.values():
        raise ValueError("the model itself owns a selected parameter; put it inside a submodule to select it")
    plan = {}
    for name, (path, p, idx) in known.items():
        top = outer[path]
        outside = [o for o in owners_of[id(p)] if o != top and not o.startswith(top + ".")]
        if outside:
            raise ValueError(f"{name} is tied to a parameter of {outside}; sparse deltas on tied weights "
                             f"are not supported")
        local = name[len(top) + 1:]
        owner = targeting.unwrap(model.get_submodule(top))
        plan.setdefault(top, (owner, {}))[1][local.replace(".", KEY_SEP)] = idx
    return plan


def reserved_selection(model, counts: dict[str, int]) -> dict[str, torch.Tensor]:
    """{name: count} from a saved adapter_config.json → placeholder indices (0..count-1) per parameter, which
    load_adapter then overwrites with the saved indices."""
    params = {f"{path}.{n}" if path else n: p for path, _, n, p in base_parameters(model)}
    out = {}
    for name, count in counts.items():
        p = params.get(name.replace(".base_layer.", "."))
        if p is None or isinstance(count, bool) or not isinstance(count, int) or not 0 < count <= p.numel():
            raise ValueError(f"selection[{name!r}] = {count!r}: no such parameter or not 1..numel entries")
        out[name] = torch.arange(count)
    return out


def as_flat_index(name: str, index, param: torch.Tensor) -> torch.Tensor:
    """A bool mask (param's shape), an index tensor or a list of ints → sorted unique flat indices (long, cpu)."""
    if isinstance(index, (list, tuple)):
        index = torch.tensor(index, dtype=torch.long)
    if not isinstance(index, torch.Tensor):
        raise ValueError(f"selection[{name!r}] must be a bool mask, an index tensor or a list of ints, "
                         f"got {type(index).__name__}")
    index = index.detach().cpu()
    if index.dtype == torch.bool:
        if index.shape != param.shape:
            raise ValueError(f"selection[{name!r}]: mask shape {tuple(index.shape)} != parameter shape "
                             f"{tuple(param.shape)}")
        return index.flatten().nonzero().flatten()
    if index.is_floating_point() or index.is_complex():
        raise ValueError(f"selection[{name!r}]: indices must be integers or a bool mask, got {index.dtype}")
    index = index.flatten().long()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= param.numel()):
        raise ValueError(f"selection[{name!r}]: index out of range for a parameter of {param.numel()} entries")
    unique = index.unique(sorted=True)
    if unique.numel() != index.numel():
        raise ValueError(f"selection[{name!r}] has repeated indices")
    return unique


@register
@dataclass
class SparseConfig(SelectiveConfig):
    """Train the given entries: selection = {param name: bool mask | flat indices | list of ints | int}.

    An int n only reserves n entries; it is what adapter_config.json stores, and load_adapter then copies
    the saved indices in."""

    selection: dict | None = None

    method = "sparse"

    def validate(self):
        if not isinstance(self.selection, dict) or not self.selection:
            raise ValueError("SparseConfig needs selection={param name: bool mask | index tensor | list of ints}")
        if self.target is not None:
            raise ValueError("SparseConfig: the selection says which parameters are trained; leave target=None")

    def select(self, model):
        counts = {k: v for k, v in self.selection.items() if isinstance(v, int) and not isinstance(v, bool)}
        return {**self.selection, **reserved_selection(model, counts)}

    def to_dict(self):
        counts = {}
        for name, index in self.selection.items():
            if isinstance(index, int) and not isinstance(index, bool):
                counts[name] = index
            elif isinstance(index, torch.Tensor) and index.dtype == torch.bool:
                counts[name] = int(index.sum())
            else:
                counts[name] = len(index)
        return {"method": self.method, "target": None, "modules_to_save": self.modules_to_save,
                "selection": counts}


class SparseDeltaLayer(AdapterLayer):
    adapter_dicts = ("sparse_values", "sparse_index")
    can_merge = True

    def __init__(self, base_layer: nn.Module, path: str = ""):
        super().__init__(base_layer, path)
        self.sparse_values, self.sparse_index = nn.ModuleDict(), nn.ModuleDict()

    def theta0(self, key: str) -> torch.Tensor:
        return self.base_layer.get_parameter(key.replace(KEY_SEP, "."))

    def add_adapter(self, name: str, config: SelectiveConfig) -> None:
        values, index = nn.ParameterDict(), nn.Module()
        for key, idx in config.indices_for(self.base_layer).items():
            p = self.theta0(key)
            index.register_buffer(key, idx.to(p.device))  # (|S_p|,) flat positions in θ0_p
            values[key] = nn.Parameter(torch.zeros(idx.numel(), device=p.device, dtype=p.dtype))  # δ_p
        self.sparse_values[name], self.sparse_index[name] = values, index

    def patched(self, name: str, key: str) -> torch.Tensor:
        """θ0_p + scatter(δ_p), out of place (gradients reach δ_p only)."""
        theta0, idx, delta = self.theta0(key), getattr(self.sparse_index[name], key), self.sparse_values[name][key]
        return theta0.flatten().index_add(0, idx, delta.to(theta0.dtype)).view_as(theta0)

    def forward(self, *args, **kwargs):
        name = self.active
        if name is None:
            return self.base_layer(*args, **kwargs)
        params = {key.replace(KEY_SEP, "."): self.patched(name, key) for key in self.sparse_values[name]}
        return functional_call(self.base_layer, params, args, kwargs)

    def merge_weights(self, name: str) -> None:
        for key, delta in self.sparse_values[name].items():
            flat, idx = self.theta0(key).view(-1), getattr(self.sparse_index[name], key)
            flat[idx] += delta.to(flat.dtype)


def selected_entries(model, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """{parameter name in the base: flat indices} the adapter trains, for every sparse-delta layer (an ID3
    layer saves its chosen entries in the same form)."""
    name = adapter_name or model.active_adapter
    model.check_adapter_name(name)
    out = {}
    for path, layer in model.adapter_layers():
        if name in layer.adapter_names():
            for key, t in layer.adapter_state(name).items():
                if key.startswith("sparse_index."):
                    out[f"{path}.{key.removeprefix('sparse_index.').replace(KEY_SEP, '.')}"] = t
    return out


@torch.no_grad()
def delta_summary(model, adapter_name: str | None = None) -> dict[str, dict[str, float]]:
    """{parameter name: {"n": |S_p|, "mean_abs": mean |δ|, "l2": ‖δ‖}} for a sparse adapter."""
    name = adapter_name or model.active_adapter
    model.check_adapter_name(name)
    out = {}
    for path, layer in model.adapter_layers():
        if isinstance(layer, SparseDeltaLayer) and name in layer.adapter_names():
            for key, delta in layer.sparse_values[name].items():
                d = delta.float()
                out[f"{path}.{key.replace(KEY_SEP, '.')}"] = {"n": d.numel(), "mean_abs": d.abs().mean().item(),
                                                          "l2": d.norm().item()}
    return out


__all__ = ["SelectiveConfig", "SparseConfig", "SparseDeltaLayer", "plan_selection", "reserved_selection",
           "selected_entries", "delta_summary"]
