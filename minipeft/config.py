"""Config base class, value checks and the method registry.

Every method has a config dataclass that subclasses `PeftConfig`. The config is the only place the
spine learns what a method does: which modules it wraps (`make_layer`) or, for methods that act on the
inputs, which model-level module it adds (`make_input_adapter`). The spine never names a method; the
registry maps the `method` string saved in adapter_config.json back to its config class.
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
    return cls(**{k: v for k, v in d.items() if k in names})


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
    """Fields every method shares.

    target: which modules the method wraps — a list of module-name suffixes (["q_proj", "v_proj"]),
        a regex string matched against the full dotted name, or "all-linear" (every linear layer but the
        output head). None means the method's default for the architecture.
    modules_to_save: base modules that are trained in full and saved with the adapter (a classifier head).
    """

    target: str | list[str] | None = None
    modules_to_save: list[str] | None = None

    method: ClassVar[str] = ""
    kind: ClassVar[str] = "layer"  # "layer": wraps target modules; "input": acts on the model's inputs

    def __post_init__(self):
        if isinstance(self.target, tuple):
            self.target = list(self.target)
        if self.target is not None and not isinstance(self.target, (str, list)):
            raise ValueError(f"target must be a list of module-name suffixes, a regex string or 'all-linear', "
                             f"got {self.target!r}")
        if isinstance(self.target, list) and (not self.target or not all(isinstance(t, str) for t in self.target)):
            raise ValueError(f"target must be a non-empty list of strings, got {self.target!r}")
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        self.validate()

    def validate(self) -> None:
        """Raise ValueError on invalid hyperparameters (overridden per method)."""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    # ---- hooks the spine calls ------------------------------------------------------------------
    def default_target(self, model) -> str | list[str] | None:
        """Targets used when `target` is None (None: the method needs no target)."""
        return None

    def prepare_model(self, model) -> None:
        """Change the frozen base before injection (QLoRA quantizes it). Default: nothing."""

    def make_layer(self, module):
        """Layer methods: return a new AdapterLayer wrapping `module`."""
        raise NotImplementedError

    def layer_type(self) -> type:
        """Layer methods: the AdapterLayer class this method wraps modules with."""
        raise NotImplementedError

    def make_input_adapter(self, model):
        """Input methods: return the nn.Module that transforms the model's inputs."""
        raise NotImplementedError


__all__ = ["PeftConfig", "REGISTRY", "register", "config_from_dict", "field",
           "check_positive_int", "check_positive", "check_probability", "check_choice"]
