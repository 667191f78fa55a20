"""PeftModel: a frozen base model plus named adapters.

    model = mp.wrap(base, mp.LoRAConfig(r=8, target=["q_proj", "v_proj"]))

`wrap` freezes the base, then either swaps every target module for the method's AdapterLayer (layer
methods: LoRA, adapters, BitFit, ...) or adds a model-level module that rewrites the inputs (input
methods: prompt tuning). Several adapters can live on one model; one is active at a time.

Deliberate choices, compared with peft:
- `add_adapter` leaves the active adapter as it is (as peft); `set_adapter(name)` switches.
- adapter tensors are float32 on an fp16/bf16 base (as peft's default autocast_adapter_dtype).
- a target list in which one name matches nothing is an error even if the others match (peft accepts it):
  a typo such as "v_prj" would otherwise silently train fewer layers than the reader thinks.
"""
from __future__ import annotations

import contextlib
import re

import torch

from . import io, peft_format, targeting
from .config import PeftConfig, config_from_dict
from .layer import AdapterLayer, ModulesToSave

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


class TrainableSummary(dict):
    """{"trainable": int, "total": int, "percent": float}, printed like peft's one-liner."""

    def __repr__(self):
        return (f"trainable params: {self['trainable']:,} || all params: {self['total']:,} "
                f"|| trainable%: {self['percent']:.4f}")

    __str__ = __repr__


class PeftModel(torch.nn.Module):
    def __init__(self, base_model: torch.nn.Module, config: PeftConfig | None = None, adapter_name: str = "default"):
        super().__init__()
        self.base_model = base_model
        self.peft_config: dict[str, PeftConfig] = {}
        self.input_adapters = torch.nn.ModuleDict()  # prompt tuning and other input methods, by adapter name
        self.shared = torch.nn.ModuleDict()  # tensors one adapter shares across its layers (config.make_shared)
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
        """Create adapter `name`. The first adapter becomes active; later ones wait for set_adapter (as peft)."""
        if not isinstance(config, PeftConfig):
            raise ValueError(f"expected a minipeft config (e.g. mp.LoRAConfig), got {type(config).__name__}")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"adapter name must be an identifier-like string without dots, got {name!r}")
        if name in self.peft_config:
            raise ValueError(f"adapter {name!r} already exists; adapters: {list(self.peft_config)}")
        save_paths = targeting.find_modules_to_save(self.base_model, config.modules_to_save)
        config.prepare_model(self.base_model)
        shared = config.make_shared(self.base_model)
        if shared is not None:
            self.shared[name] = shared
        if config.kind == "layer":
            target = config.target if config.target is not None else config.default_target(self.base_model)
            paths = targeting.find_targets(self.base_model, target, method=config.method, allowed=config.base_types,
                                           exclude=config.exclude, inside=save_paths)
            for path in paths:
                layer = self._layer_for(path, config)
                layer.add_adapter(name, config, **({"shared": shared} if shared is not None else {}))
        elif config.kind == "input":
            self.input_adapters[name] = config.make_input_adapter(self.base_model)
        else:
            raise ValueError(f"unknown config kind {config.kind!r}")
        for path in save_paths:
            module = self.base_model.get_submodule(path)
            if not isinstance(module, ModulesToSave):
                module = self.replace_module(path, ModulesToSave(module, path))
            module.add_adapter(name)
        self.peft_config[name] = config
        if self.active_adapter is None:
            self.set_adapter(name)
        else:  # keep the active adapter active; the new one waits, frozen
            self.set_adapter(self.active_adapter)

    def _layer_for(self, path: str, config: PeftConfig) -> AdapterLayer:
        module = self.base_model.get_submodule(path)
        if isinstance(module, AdapterLayer):
            if type(module) is not config.layer_class_for(module.base_layer):
                raise ValueError(f"{path} already carries a {type(module).__name__}; one method per module "
                                 f"(cannot add {config.method})")
            return module
        return self.replace_module(path, config.layer_class_for(module)(module, path))

    def replace_module(self, path: str, new: torch.nn.Module) -> torch.nn.Module:
        """Put `new` at dotted `path` in the base model; returns it."""
        parent, _, child = path.rpartition(".")
        new.train(self.base_model.get_submodule(path).training)  # a wrapped layer keeps its module's mode
        setattr(self.base_model.get_submodule(parent) if parent else self.base_model, child, new)
        return new

    def check_adapter_name(self, name: str) -> None:
        if name not in self.peft_config:
            raise ValueError(f"no adapter named {name!r}; adapters: {list(self.peft_config)}")

    def adapter_parameters(self, name: str):
        """(dotted name, parameter) of adapter `name` only: its trainable tensors."""
        for path, layer in self.adapter_layers():
            for attr, obj in layer.adapter_modules(name).items():
                params = [("", obj)] if isinstance(obj, torch.nn.Parameter) else obj.named_parameters()
                for k, p in params:
                    yield f"{path}.{attr}.{name}" + (f".{k}" if k else ""), p
        for prefix, modules in (("input_adapters", self.input_adapters), ("shared", self.shared)):
            if name in modules:
                for k, p in modules[name].named_parameters():
                    yield f"{prefix}.{name}.{k}", p

    def set_adapter(self, name: str) -> None:
        """Make `name` the active adapter: only its parameters require grad (frozen adapter tensors are
        buffers, so they stay frozen)."""
        self.check_adapter_name(name)
        self.active_adapter = name
        self.requires_grad_(False)
        for _, p in self.adapter_parameters(name):
            p.requires_grad_(True)
        for _, layer in self.adapter_layers():
            layer.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        self.check_adapter_name(name)
        for path, layer in self.adapter_layers():
            layer.delete_adapter(name)
            if not layer.adapter_names():  # nothing left on this module: put the base module back
                self.replace_module(path, layer.base_layer)
        for modules in (self.input_adapters, self.shared):
            if name in modules:  # ModuleDict.pop takes no default
                del modules[name]
        del self.peft_config[name]
        if self.active_adapter == name:
            self.active_adapter = None
            if self.peft_config:
                self.set_adapter(next(iter(self.peft_config)))

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the bare base model inside the `with` block — merged or not (a merged adapter is taken out
        of the base weights for the block and put back after it)."""
        layers = [layer for _, layer in self.adapter_layers()]
        was_disabled, merged = self._disabled, {layer: list(layer.merged_adapters) for layer in layers}
        self.unmerge()
        self._disabled = True
        for layer in layers:
            layer.disabled = True
        try:
            yield self
        finally:
            self._disabled = was_disabled
            for layer in layers:
                layer.disabled = was_disabled
                for name in merged[layer]:
                    layer.merge(name)

    # ---- merge ------------------------------------------------------------------------------------
    def merge(self, adapter_name: str | None = None, safe_merge: bool = False) -> None:
        """Fold the adapter into the base weights: same outputs, no extra inference cost.
        safe_merge: check every merged weight is finite and undo the merge (ValueError) if one is not."""
        name = adapter_name or self.active_adapter
        self.check_adapter_name(name)
        if self.peft_config[name].kind != "layer":
            raise ValueError(f"{self.peft_config[name].method} acts on the inputs; there is nothing to merge")
        layers = [(p, layer) for p, layer in self.adapter_layers() if name in layer.adapter_names()]
        if any(layer.merged_adapters for _, layer in layers):
            raise ValueError("an adapter is already merged; call unmerge() first")
        cannot = {type(layer).__name__ for _, layer in layers if not layer.can_merge}
        if cannot:
            raise ValueError(f"{self.peft_config[name].method} cannot be merged: {sorted(cannot)} is not a "
                             f"linear change of a base weight")
        for _, layer in layers:
            layer.merge(name)
        if safe_merge:
            bad = [p for p, layer in layers if not all(torch.isfinite(t).all() for t in
                                                      layer.base_layer.state_dict().values() if t.is_floating_point())]
            if bad:
                self.unmerge()
                raise ValueError(f"merging adapter {name!r} gives non-finite weights in {bad[:5]}; nothing merged")

    def unmerge(self) -> None:
        """Give the base layers back their exact weights from before the merge."""
        for _, layer in self.adapter_layers():
            if layer.merged_adapters:
                layer.unmerge()

    def unload(self) -> torch.nn.Module:
        """The base model without any adapter layer and unchanged weights (merged adapters are taken out)."""
        self.unmerge()
        for path, layer in self.adapter_layers():
            self.replace_module(path, layer.base_layer)
        return self.base_model

    def merge_and_unload(self, safe_merge: bool = False) -> torch.nn.Module:
        """Merge the active adapter and return the plain base model (no adapter layers left)."""
        self.merge(safe_merge=safe_merge)
        for path, layer in self.adapter_layers():
            self.replace_module(path, layer.base_layer)
        return self.base_model

    # ---- training hooks ---------------------------------------------------------------------------
    def extra_loss(self):
        """The active adapter's extra loss term (its config's `extra_loss`), or None."""
        name = self.active_adapter
        if name is None or self._disabled or not self.training:
            return None
        return self.peft_config[name].extra_loss(self, name)

    def training_callbacks(self) -> list:
        """Trainer callbacks the active adapter's method needs (its config's `training_callbacks`)."""
        name = self.active_adapter
        return [] if name is None else list(self.peft_config[name].training_callbacks(self, name))

    # ---- forward ----------------------------------------------------------------------------------
    def _input_adapter(self):
        name = self.active_adapter
        if self._disabled or name is None or name not in self.input_adapters:
            return None
        return self.input_adapters[name]

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The model's forward with the active adapter; adapter_names=[name per row] runs a mixed-adapter
        batch instead (row i through adapter adapter_names[i], "__base__" for the bare base; see _rows_routed)."""
        if adapter_names is not None:
            with self._rows_routed(adapter_names, args, kwargs):
                return self.base_model(*args, **kwargs)
        adapter = self._input_adapter()
        if adapter is None:
            return self.base_model(*args, **kwargs)
        return adapter.forward_model(self.base_model, *args, **kwargs)

    @torch.no_grad()
    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The base model's generate with the active adapter; adapter_names=[name per prompt]: each prompt keeps
        its own adapter at every step (beams and samples of a prompt too)."""
        if adapter_names is not None:
            with self._rows_routed(adapter_names, args, kwargs, generating=True):
                return self.base_model.generate(*args, **kwargs)
        adapter = self._input_adapter()
        if adapter is None:
            return self.base_model.generate(*args, **kwargs)
        return adapter.generate(self.base_model, *args, **kwargs)

    @contextlib.contextmanager
    def _rows_routed(self, adapter_names: list[str], args: tuple = (), kwargs: dict | None = None,
                     generating: bool = False):
        """Inside the block, row i of the batch in `args`/`kwargs` (input_ids, inputs_embeds or the first
        tensor) goes through adapter adapter_names[i] on every adapter layer — "__base__": the bare base model.
        Inference only (eval mode, as peft), layer methods only (an input method changes the sequence itself),
        nothing merged. Each row gets what it would get alone with its adapter active."""
        names = self._check_row_names(adapter_names, args, kwargs or {})
        layers = [layer for _, layer in self.adapter_layers()]
        for layer in layers:
            layer.route_rows(names, repeats=generating)
        try:
            yield self
        finally:
            for layer in layers:
                layer.route_rows(None)

    def _check_row_names(self, adapter_names, args: tuple, kwargs: dict) -> list[str]:
        """adapter_names as a list, or a ValueError saying what is wrong with it."""
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise ValueError(f"adapter_names must be a list of adapter names, one per row; got {adapter_names!r}")
        names = list(adapter_names)
        tensors = [kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args]
        inputs = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
        if inputs is None:
            raise ValueError("adapter_names needs input_ids or inputs_embeds to count the rows of the batch")
        if len(names) != inputs.shape[0]:
            raise ValueError(f"adapter_names has {len(names)} names but the batch has {inputs.shape[0]} rows "
                             f"(one name per row)")
        unknown = sorted({n for n in names if n != "__base__" and n not in self.peft_config})
        if unknown:
            raise ValueError(f"adapter_names: no adapter named {unknown}; adapters: {list(self.peft_config)} "
                             f"(or \"__base__\" for the bare base model)")
        input_methods = sorted({n for n in names if n in self.input_adapters})
        if input_methods:
            raise ValueError(f"adapter_names: {input_methods} ({self.peft_config[input_methods[0]].method}) "
                             f"changes the input sequence, not a layer, so rows cannot be routed through it "
                             f"one by one; mixed batches work with layer methods (LoRA, DoRA, (IA)³, ...)")
        if any(layer.merged_adapters for _, layer in self.adapter_layers()):
            raise ValueError("adapter_names cannot be used while an adapter is merged; call unmerge() first")
        if self.training:
            raise ValueError("adapter_names is for inference: call model.eval() first (as peft; one adapter "
                             "trains at a time)")
        if self._disabled:
            raise ValueError("adapter_names inside disable_adapter(): every row would get the base model; "
                             "route rows to \"__base__\" instead")
        return names

    # ---- reports and files --------------------------------------------------------------------------
    def trainable_summary(self) -> TrainableSummary:
        """Trainable and total parameters (4-bit weights counted as the parameters they stand for)."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        total += sum(m.n_quantized_params for m in self.modules()
                     if "n_quantized_params" in dir(type(m)))  # the 4-bit layer itself, not its wrapper
        return TrainableSummary(trainable=trainable, total=total, percent=100.0 * trainable / max(total, 1))

    def print_trainable_parameters(self) -> None:
        print(self.trainable_summary())

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """{"model.layers.0.self_attn.q_proj.lora_A.weight": tensor, ...}: adapter tensors only."""
        name = adapter_name or self.active_adapter
        self.check_adapter_name(name)
        state = {}
        for path, layer in self.adapter_layers():
            state.update({f"{path}.{k}": v for k, v in layer.adapter_state(name).items()})
        for prefix, modules in (("input_adapter", self.input_adapters), ("shared", self.shared)):
            if name in modules:
                module = modules[name]
                # an input adapter may save a compact form of its live tensors (prefix tuning: P, not its MLP)
                saved = module.adapter_state() if hasattr(module, "adapter_state") else module.state_dict()
                state.update({f"{prefix}.{k}": v.detach() for k, v in saved.items()})
        return state

    def save_adapter(self, path, adapter_name: str | None = None, format: str = "minipeft") -> None:
        """Write adapter `adapter_name` (default: the active one) to folder `path`: format="minipeft"
        (adapter_config.json + adapter.safetensors) or format="peft" (peft's adapter_config.json +
        adapter_model.safetensors, which peft.PeftModel.from_pretrained(base, path) reads; ValueError for a
        method peft cannot store exactly)."""
        name = adapter_name or self.active_adapter
        self.check_adapter_name(name)
        if format not in ("minipeft", "peft"):
            raise ValueError(f"format must be 'minipeft' or 'peft', got {format!r}")
        config, state = self.peft_config[name].to_dict(), self.adapter_state_dict(name)
        if format == "minipeft":
            io.write_adapter(path, config, io.base_model_info(self.base_model), state)
            return
        plain = (bool, int, float, str)  # each layer's per-adapter numbers (is_feedforward, scaling, ...)
        layers = {p: {"layer": type(layer).__name__, "base": type(targeting.unwrap(layer)).__name__,
                      **{v: getattr(layer, v)[name] for v in layer.adapter_values
                         if isinstance(getattr(layer, v).get(name), plain)}}
                  for p, layer in self.adapter_layers() if name in layer.adapter_names()}
        peft_config, tensors = peft_format.to_peft(config, state, layers, type(self.base_model).__name__)
        peft_format.write_peft(path, peft_config, tensors)

    def load_adapter(self, path, adapter_name: str = "default", is_trainable: bool = False) -> None:
        """Add adapter `adapter_name` from a saved folder, checking that it fits this base. For inference
        (default) it is frozen and the model is put in eval mode (dropout off); with is_trainable=True it
        trains once active and the model stays in its mode. As peft, loading does not switch the active
        adapter (the first adapter of a model is active): call set_adapter(adapter_name).
        The folder may be minipeft's or one peft saved (told apart by its files; see peft_format.py)."""
        if io.detect_format(path) == "peft":
            peft_config, peft_tensors = peft_format.read_peft(path)
            config_dict, tensors = peft_format.from_peft(peft_config, peft_tensors,
                                                         io.base_module_types(self.base_model))
            meta = {"config": config_dict, "base_model": {}}
        else:
            meta, tensors = io.read_adapter(path)
        config = config_from_dict(meta["config"])
        io.check_fits(path, meta, tensors, self.base_model)
        self.add_adapter(adapter_name, config)
        try:
            expected = self.adapter_state_dict(adapter_name)
            io.check_tensors_match(path, tensors, expected)
            with torch.no_grad():
                for key, value in tensors.items():
                    expected[key].copy_(value)  # the state-dict tensors share storage with the live tensors
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        if not is_trainable:
            for _, p in self.adapter_parameters(adapter_name):
                p.requires_grad_(False)
            self.eval()


def wrap(base_model: torch.nn.Module, config: PeftConfig, adapter_name: str = "default") -> PeftModel:
    """Freeze `base_model` and add one adapter described by `config`."""
    if isinstance(base_model, PeftModel):
        raise ValueError("model is already wrapped; use model.add_adapter(name, config) to add another adapter")
    return PeftModel(base_model, config, adapter_name)


def load_adapter(base_model: torch.nn.Module, path, adapter_name: str = "default", is_trainable: bool = False):
    """Wrap `base_model` with the adapter saved at `path` (by minipeft, or by peft's save_pretrained): frozen and
    in eval mode, unless is_trainable."""
    if isinstance(base_model, PeftModel):
        raise ValueError("base_model is already wrapped; use model.load_adapter(path, adapter_name)")
    model = PeftModel(base_model)  # no adapter yet: load_adapter adds it with the file's tensors
    model.load_adapter(path, adapter_name, is_trainable)
    return model
