"""AdapterLayer: a frozen base module plus any number of named adapters of one method — the layer contract.

A layer method subclasses AdapterLayer and writes two things:

    add_adapter(name, config)   create the adapter's tensors in the dicts named by `adapter_dicts`
                                (`nn.ModuleDict`/`nn.ParameterDict` keyed by adapter name, like peft's
                                `lora_A["default"]`); trainable tensors are Parameters, frozen ones are
                                buffers (so nothing can unfreeze them: "what trains is structural")
    forward(x, ...)             the base output plus the `active` adapter's change (None: base only)

and, if it can be folded into the base weights, sets `can_merge = True` and writes

    merge_weights(name)         change `base_layer` in place so that it computes what the adapter did.

Everything else is shared here: which adapter is active, disabling, deleting, the adapter's state for
saving, and exact unmerge — `merge` keeps the base layer's state from before the merge and `unmerge` puts
it back bit for bit (no method subtracts a recomputed delta). A layer knows its dotted module `path` in the
model (for per-module options such as AdaLoRA's ranks or LoRA's `rank_pattern`), and attributes it does not
have (`weight`, `bias`, `in_features`, ...) are read from the base layer, as code written for the plain
model expects (T5 reads `self.wo.weight.dtype`).
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class AdapterLayer(nn.Module):
    adapter_dicts: tuple[str, ...] = ()  # attributes holding per-adapter tensors, keyed by adapter name
    adapter_values: tuple[str, ...] = ()  # plain dicts of per-adapter numbers (e.g. "scaling")
    can_merge: bool = False

    def __init__(self, base_layer: nn.Module, path: str = ""):
        super().__init__()
        self.base_layer = base_layer
        self.path = path  # dotted name of this module in the wrapped model ("model.layers.0.self_attn.q_proj")
        self.active_adapter: str | None = None
        self.merged_adapters: list[str] = []
        self.disabled = False
        self._unmerged_state: dict[str, torch.Tensor] | None = None  # the base layer's state while merged
        for p in base_layer.parameters():
            p.requires_grad_(False)

    # anything not found on the layer (weight, bias, in_features, ...) comes from the base layer
    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    # ---- per method ------------------------------------------------------------------------------
    def add_adapter(self, name: str, config) -> None:
        raise NotImplementedError

    def merge_weights(self, name: str) -> None:
        """Fold adapter `name` into `base_layer` in place (mergeable methods override this)."""
        raise ValueError(f"{type(self).__name__} cannot be merged into the base weights")

    # ---- shared ----------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, name: str) -> None:
        if not self.can_merge:
            raise ValueError(f"{type(self).__name__} cannot be merged into the base weights")
        if self._unmerged_state is None:  # keep the exact base (4-bit codes included) for unmerge
            self._unmerged_state = {k: v.clone() for k, v in self.base_layer.state_dict().items()}
        self.merge_weights(name)
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put the base layer's weights back exactly as they were before the first merge."""
        if self._unmerged_state is not None:
            self.base_layer.load_state_dict(self._unmerged_state)
        self._unmerged_state, self.merged_adapters = None, []

    def base_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        """Where new adapter tensors go: the base's device, in float32 unless the base is float64 (as peft:
        adapters on an fp16/bf16 base stay fp32 for stable training). Buffers count too (a 4-bit layer
        without bias keeps its weight only in integer buffers)."""
        tensors = [*self.base_layer.parameters(), *self.base_layer.buffers()]
        device = tensors[0].device if tensors else torch.device("cpu")
        floats = [t.dtype for t in tensors if t.is_floating_point()]
        return device, (torch.float64 if floats and floats[0] == torch.float64 else torch.float32)

    @property
    def active(self) -> str | None:
        """The adapter the forward pass must add, or None (disabled, merged, or not on this layer)."""
        name = self.active_adapter
        if self.disabled or name is None or self.merged_adapters or name not in self.adapter_names():
            return None
        return name

    def adapter_names(self) -> list[str]:
        return list(getattr(self, self.adapter_dicts[0]).keys()) if self.adapter_dicts else []

    def adapter_modules(self, name: str) -> dict[str, nn.Module | nn.Parameter]:
        return {attr: getattr(self, attr)[name] for attr in self.adapter_dicts if name in getattr(self, attr)}

    def adapter_parameters(self, name: str):
        """The adapter's trainable tensors (Parameters); its frozen tensors are buffers."""
        for obj in self.adapter_modules(name).values():
            yield from ([obj] if isinstance(obj, nn.Parameter) else obj.parameters())

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors (buffers included) with the adapter name left out ("lora_A.weight")."""
        out = {}
        for attr, obj in self.adapter_modules(name).items():
            if isinstance(obj, nn.Parameter):
                out[attr] = obj.detach()
            else:
                out.update({f"{attr}.{k}": v.detach() for k, v in obj.state_dict().items()})
        return out

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged; unmerge it before deleting")
        for attr in self.adapter_dicts:
            if name in getattr(self, attr):  # ModuleDict.pop takes no default
                del getattr(self, attr)[name]
        for attr in self.adapter_values:
            getattr(self, attr).pop(name, None)
        if self.active_adapter == name:
            self.active_adapter = None

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names()}, active={self.active_adapter!r}, merged={self.merged_adapters}"


class ModulesToSave(AdapterLayer):
    """A base module trained in full for each adapter (e.g. a new classifier head): one copy per adapter.
    Attribute reads (`weight`, ...) go to the copy in use, as with peft's ModulesToSaveWrapper."""

    adapter_dicts = ("copies",)
    can_merge = True

    def __init__(self, base_layer: nn.Module, path: str = ""):
        super().__init__(base_layer, path)
        self.copies = nn.ModuleDict()

    def __getattr__(self, name):
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            if name in ("base_layer", "copies"):
                raise
            return getattr(self.module_in_use, name)

    @property
    def module_in_use(self) -> nn.Module:
        name = self.active
        return self.copies[name] if name else self.base_layer

    def add_adapter(self, name: str, config=None) -> None:
        self.copies[name] = copy.deepcopy(self.base_layer).requires_grad_(True)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """The copy's own keys ("weight", "bias"): saved as "classifier.weight", as peft does."""
        if name not in self.copies:
            return {}
        return {k: v.detach() for k, v in self.copies[name].state_dict().items()}

    def forward(self, *args, **kwargs):
        return self.module_in_use(*args, **kwargs)

    def merge_weights(self, name: str) -> None:
        self.base_layer.load_state_dict(self.copies[name].state_dict())
