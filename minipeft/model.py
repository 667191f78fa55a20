"""PeftModel: a frozen base model plus named adapters.

    model = mp.wrap(base, mp.LoRAConfig(r=8, target=["q_proj", "v_proj"]))

`wrap` freezes the base, then either swaps every target module for the method's AdapterLayer (layer
methods: LoRA, adapters, BitFit, ...) or adds a model-level module that rewrites the inputs (input
methods: prompt tuning). Several adapters can live on one model; one is active at a time.
"""
from __future__ import annotations

import contextlib
import re

import torch
from torch import nn

from . import targeting
from .config import PeftConfig
from .layer import AdapterLayer, ModulesToSave

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


class TrainableSummary(dict):
    """{"trainable": int, "total": int, "percent": float}, printed like peft's one-liner."""

    def __repr__(self):
        return (f"trainable params: {self['trainable']:,} || all params: {self['total']:,} "
                f"|| trainable%: {self['percent']:.4f}")

    __str__ = __repr__


class PeftModel(nn.Module):
    def __init__(self, base_model: nn.Module, config: PeftConfig | None = None, adapter_name: str = "default"):
        super().__init__()
        self.base_model = base_model
        self.peft_config: dict[str, PeftConfig] = {}
        self.input_adapters = nn.ModuleDict()  # prompt tuning and other input methods, by adapter name
        self.active_adapter: str | None = None
        self._disabled = False
        base_model.requires_grad_(False)
        if config is not None:
            self.add_adapter(adapter_name, config)

    # anything not found here (config, device, get_input_embeddings, ...) comes from the base model
    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ---- adapters ---------------------------------------------------------------------------------
    def adapter_layers(self):
        """(dotted name, layer) for every AdapterLayer in the base model."""
        return [(n, m) for n, m in targeting.named_base_modules(self.base_model) if isinstance(m, AdapterLayer)]

    def add_adapter(self, name: str, config: PeftConfig) -> None:
        """Create adapter `name` (trainable, and active)."""
        if not isinstance(config, PeftConfig):
            raise ValueError(f"expected a minipeft config (e.g. mp.LoRAConfig), got {type(config).__name__}")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"adapter name must be an identifier-like string without dots, got {name!r}")
        if name in self.peft_config:
            raise ValueError(f"adapter {name!r} already exists; adapters: {list(self.peft_config)}")
        config.prepare_model(self.base_model)
        save_paths = targeting.find_targets(self.base_model, config.modules_to_save, method="modules_to_save") \
            if config.modules_to_save else []
        if config.kind == "layer":
            target = config.target if config.target is not None else config.default_target(self.base_model)
            for path in targeting.find_targets(self.base_model, target, method=config.method,
                                               allowed=getattr(config, "allowed_types", None)):
                if path not in save_paths:  # a module trained in full gets no adapter on top
                    self._wrap(path, config).add_adapter(name, config)
        elif config.kind == "input":
            self.input_adapters[name] = config.make_input_adapter(self.base_model)
        else:
            raise ValueError(f"unknown config kind {config.kind!r}")
        for path in save_paths:
            module = self.base_model.get_submodule(path)
            if not isinstance(module, ModulesToSave):
                module = self._replace(path, ModulesToSave(module))
            module.add_adapter(name)
        self.peft_config[name] = config
        self.set_adapter(name)

    def _wrap(self, path: str, config: PeftConfig) -> AdapterLayer:
        module = self.base_model.get_submodule(path)
        if isinstance(module, AdapterLayer):
            if type(module) is not config.layer_type():
                raise ValueError(f"{path} already carries a {type(module).__name__}; one method per module "
                                 f"(cannot add {config.method})")
            return module
        return self._replace(path, config.make_layer(module))

    def _replace(self, path: str, new: nn.Module) -> nn.Module:
        parent, _, child = path.rpartition(".")
        setattr(self.base_model.get_submodule(parent) if parent else self.base_model, child, new)
        return new

    def _check_name(self, name: str) -> None:
        if name not in self.peft_config:
            raise ValueError(f"no adapter named {name!r}; adapters: {list(self.peft_config)}")

    def adapter_parameters(self, name: str):
        """(dotted name, parameter) of adapter `name` only."""
        for path, layer in self.adapter_layers():
            for attr, obj in layer.adapter_modules(name).items():
                params = [("", obj)] if isinstance(obj, nn.Parameter) else obj.named_parameters()
                for k, p in params:
                    yield f"{path}.{attr}.{name}" + (f".{k}" if k else ""), p
        if name in self.input_adapters:
            for k, p in self.input_adapters[name].named_parameters():
                yield f"input_adapters.{name}.{k}", p

    def set_adapter(self, name: str) -> None:
        """Make `name` the active adapter: only its parameters require grad."""
        self._check_name(name)
        self.active_adapter = name
        self.requires_grad_(False)
        for _, p in self.adapter_parameters(name):
            p.requires_grad_(True)
        for _, layer in self.adapter_layers():
            layer.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        self._check_name(name)
        for path, layer in self.adapter_layers():
            layer.delete_adapter(name)
            if not layer.adapter_names():  # nothing left on this module: put the base module back
                self._replace(path, layer.base_layer)
        if name in self.input_adapters:  # ModuleDict.pop takes no default
            del self.input_adapters[name]
        del self.peft_config[name]
        if self.active_adapter == name:
            self.active_adapter = None
            if self.peft_config:
                self.set_adapter(next(iter(self.peft_config)))

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the bare base model inside the `with` block."""
        layers = [layer for _, layer in self.adapter_layers()]
        was = self._disabled
        self._disabled = True
        for layer in layers:
            layer.disabled = True
        try:
            yield self
        finally:
            self._disabled = was
            for layer in layers:
                layer.disabled = was

    # ---- merge ------------------------------------------------------------------------------------
    def merge(self, adapter_name: str | None = None) -> None:
        """Fold the adapter into the base weights: same outputs, no extra inference cost."""
        name = adapter_name or self.active_adapter
        self._check_name(name)
        if self.peft_config[name].kind != "layer":
            raise ValueError(f"{self.peft_config[name].method} acts on the inputs; there is nothing to merge")
        layers = [layer for _, layer in self.adapter_layers() if name in layer.adapter_names()]
        if any(layer.merged_adapters for layer in layers):
            raise ValueError("an adapter is already merged; call unmerge() first")
        cannot = {type(layer).__name__ for layer in layers if not layer.can_merge}
        if cannot:
            raise ValueError(f"{self.peft_config[name].method} cannot be merged: {sorted(cannot)} is not a "
                             f"linear change of a base weight")
        for layer in layers:
            layer.merge(name)

    def unmerge(self) -> None:
        for _, layer in self.adapter_layers():
            if layer.merged_adapters:
                layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Merge the active adapter and return the plain base model (no adapter layers left)."""
        self.merge()
        for path, layer in self.adapter_layers():
            self._replace(path, layer.base_layer)
        return self.base_model

    # ---- forward ----------------------------------------------------------------------------------
    def _input_adapter(self):
        name = self.active_adapter
        if self._disabled or name is None or name not in self.input_adapters:
            return None
        return self.input_adapters[name]

    def forward(self, *args, **kwargs):
        adapter = self._input_adapter()
        if adapter is None:
            return self.base_model(*args, **kwargs)
        return adapter.forward_model(self.base_model, *args, **kwargs)

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        adapter = self._input_adapter()
        if adapter is None:
            return self.base_model.generate(*args, **kwargs)
        return adapter.generate(self.base_model, *args, **kwargs)

    # ---- reports and files --------------------------------------------------------------------------
    def trainable_summary(self) -> TrainableSummary:
        """Trainable and total parameters (4-bit weights counted as the parameters they stand for)."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        total += sum(getattr(m, "n_quantized_params", 0) for m in self.modules())
        return TrainableSummary(trainable=trainable, total=total, percent=100.0 * trainable / max(total, 1))

    def print_trainable_parameters(self) -> None:
        print(self.trainable_summary())

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        from .io import adapter_state_dict
        return adapter_state_dict(self, adapter_name or self.active_adapter)

    def save_adapter(self, path, adapter_name: str | None = None) -> None:
        from .io import save_adapter
        save_adapter(self, path, adapter_name or self.active_adapter)

    def load_adapter(self, path, adapter_name: str = "default", is_trainable: bool = False) -> None:
        from .io import load_into
        load_into(self, path, adapter_name, is_trainable)


def wrap(base_model: nn.Module, config: PeftConfig, adapter_name: str = "default") -> PeftModel:
    """Freeze `base_model` and add one adapter described by `config`."""
    if isinstance(base_model, PeftModel):
        raise ValueError("model is already wrapped; use model.add_adapter(name, config) to add another adapter")
    return PeftModel(base_model, config, adapter_name)
