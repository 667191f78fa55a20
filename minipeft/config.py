"""Config base class, value checks and the method registry.

Every method has a config dataclass that subclasses `PeftConfig`. The config is the only place the spine
learns what a method does (the hooks on `PeftConfig`, called in the order its docstring gives). The spine
never names a method; the registry maps the `method` string saved in adapter_config.json back to its class.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

REGISTRY: dict[str, type["PeftConfig"]] = {}


def register(cls):
    """Class decorator: make a config loadable from adapter_config.json by its `method` name."""
    if not cls.method:
        raise TypeError(f"{cls.__name__} needs a `method` name")
    REGISTRY[cls.method] = cls
    return cls


def config_from_dict(d: dict) -> "PeftConfig":
    d = dict(d)
    method = d.pop("method", None)
    if method not in REGISTRY:
        raise ValueError(f"unknown PEFT method {method!r}; known methods: {sorted(REGISTRY)}")
    cls = REGISTRY[method]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:  # a misspelt or foreign field must not be dropped silently
        raise ValueError(f"{method}: unknown config field(s) {unknown}; {cls.__name__} has {sorted(names)}")
    return cls(**d)


# ---- value checks: each raises a ValueError that names the field -----------------------------------
def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def check_probability(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")


@dataclass
class PeftConfig:
    """Fields every method shares, and the hooks through which the spine learns what a method does.

    target: which modules the method wraps — a list of module-name suffixes (["q_proj", "v_proj"]),
        a regex string matched against the full dotted name, or "all-linear" (every linear layer but the
        output head). None means the method's default for the architecture.
    exclude: modules never wrapped, even if `target` matches them (suffixes or a regex; peft's
        `exclude_modules`).
    modules_to_save: base modules that are trained in full and saved with the adapter (a classifier head).

    The order in which `PeftModel.add_adapter(name, config)` calls the hooks:
      1. prepare_model(base)               change the frozen base first (QLoRA quantizes it)
      2. make_shared(base)                 one model-level module of tensors shared by all layers (or None)
      3. layer methods, for each target:   layer_class_for(module)(module, path) → layer.add_adapter(name, config)
         input methods:                    make_input_adapter(base)
      4. modules_to_save get their trainable copies; the adapter becomes active.
    While training, `PeftModel.extra_loss()` returns `extra_loss(model, name)` of the active adapter (the
    Trainer adds it to the loss) and `PeftModel.training_callbacks()` returns `training_callbacks(model,
    name)` (the Trainer runs them), so a method with a schedule needs no wiring by the user.
    """

    target: str | list[str] | None = None
    exclude: str | list[str] | None = None
    modules_to_save: list[str] | None = None

    method: ClassVar[str] = ""
    kind: ClassVar[str] = "layer"  # "layer": wraps target modules; "input": acts on the model's inputs

    def __post_init__(self):
        for field_name in ("target", "exclude"):
            value = getattr(self, field_name)
            if isinstance(value, tuple):
                value = list(value)
                setattr(self, field_name, value)
            if value is not None and not isinstance(value, (str, list)):
                raise ValueError(f"{field_name} must be a list of module-name suffixes, a regex string or "
                                 f"'all-linear', got {value!r}")
            if isinstance(value, list) and (not value or not all(isinstance(t, str) for t in value)):
                raise ValueError(f"{field_name} must be a non-empty list of strings, got {value!r}")
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        saved = self.modules_to_save
        if saved is not None and (not isinstance(saved, list) or not all(isinstance(m, str) for m in saved)):
            raise ValueError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
        self.validate()

    def validate(self) -> None:
        """Raise ValueError on invalid hyperparameters (overridden per method)."""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    # ---- hooks the spine calls (see the class docstring for their order) ----------------------------
    def default_target(self, model) -> str | list[str] | None:
        """Targets used when `target` is None (None: the method needs no target)."""
        return None

    @property
    def base_types(self) -> tuple[type, ...] | None:
        """Layer methods: the module types this method can wrap (None: any)."""
        return None

    @property
    def layer_class(self) -> type:
        """Layer methods: the AdapterLayer subclass that wraps each target."""
        raise NotImplementedError

    def prepare_model(self, model) -> None:
        """Change the frozen base before injection (QLoRA quantizes it). Default: nothing."""

    def make_shared(self, model):
        """A module of tensors shared by every layer of this adapter (VeRA's random matrices), kept once
        per model at `PeftModel.shared[name]` and saved with the adapter; None (default): nothing shared."""
        return None

    def layer_class_for(self, module) -> type:
        """Layer methods: the layer class for this base module (LoRA: another one for embeddings)."""
        return self.layer_class

    def make_input_adapter(self, model):
        """Input methods: return the nn.Module that transforms the model's inputs."""
        raise NotImplementedError

    def extra_loss(self, model, adapter_name: str):
        """A term the Trainer adds to the loss while this adapter trains (AdaLoRA's orthogonality). None: none."""
        return None

    def training_callbacks(self, model, adapter_name: str) -> list:
        """Trainer callbacks this method needs (AdaLoRA's rank budget), e.g. [RankAllocator(model)]."""
        return []


__all__ = ["PeftConfig", "REGISTRY", "register", "config_from_dict", "field",
           "check_positive_int", "check_positive", "check_probability", "check_choice"]
