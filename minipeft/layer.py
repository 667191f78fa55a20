"""AdapterLayer: a frozen base module plus any number of named adapters of one method.

A method subclasses AdapterLayer, keeps each adapter's tensors in `nn.ModuleDict`s / `nn.ParameterDict`s
keyed by adapter name (listed in `adapter_dicts`, like peft's `lora_A["default"]`), and implements
`add_adapter` and `forward`. Everything else — which adapter is active, disabling, deleting, the
adapter's state for saving — is shared here.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class AdapterLayer(nn.Module):
    adapter_dicts: tuple[str, ...] = ()  # attributes holding per-adapter tensors, keyed by adapter name
    adapter_values: tuple[str, ...] = ()  # plain dicts of per-adapter numbers (e.g. "scaling")
    can_merge: bool = False

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.active_adapter: str | None = None
        self.merged_adapters: list[str] = []
        self.disabled = False
        for p in base_layer.parameters():
            p.requires_grad_(False)

    # ---- per method ------------------------------------------------------------------------------
    def add_adapter(self, name: str, config) -> None:
        raise NotImplementedError

    def merge(self, name: str) -> None:
        raise ValueError(f"{type(self).__name__} cannot be merged into the base weights")

    def unmerge(self) -> None:
        raise ValueError(f"{type(self).__name__} cannot be merged into the base weights")

    # ---- shared ----------------------------------------------------------------------------------
    def base_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        """Where new adapter tensors go: the base's device and floating dtype. Buffers count too (a 4-bit
        layer without bias keeps its weight only in integer buffers); integer-only bases get float32."""
        tensors = [*self.base_layer.parameters(), *self.base_layer.buffers()]
        device = tensors[0].device if tensors else torch.device("cpu")
        floats = [t.dtype for t in tensors if t.is_floating_point()]
        return device, (floats[0] if floats else torch.float32)

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
        for obj in self.adapter_modules(name).values():
            yield from ([obj] if isinstance(obj, nn.Parameter) else obj.parameters())

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors with the adapter name left out of the keys ("lora_A.weight")."""
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
    """A base module trained in full for each adapter (e.g. a new classifier head): one copy per adapter."""

    adapter_dicts = ("copies",)
    can_merge = True

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.copies = nn.ModuleDict()
        self._original: dict[str, torch.Tensor] = {}

    def add_adapter(self, name: str, config=None) -> None:
        self.copies[name] = copy.deepcopy(self.base_layer).requires_grad_(True)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """The copy's own keys ("weight", "bias"): saved as "classifier.weight", as peft does."""
        return {k: v.detach() for k, v in self.copies[name].state_dict().items()}

    def forward(self, *args, **kwargs):
        name = self.active
        return (self.copies[name] if name else self.base_layer)(*args, **kwargs)

    @torch.no_grad()
    def merge(self, name: str) -> None:
        self._original = {k: v.clone() for k, v in self.base_layer.state_dict().items()}
        self.base_layer.load_state_dict(self.copies[name].state_dict())
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged_adapters:
            self.base_layer.load_state_dict(self._original)
            self._original, self.merged_adapters = {}, []
