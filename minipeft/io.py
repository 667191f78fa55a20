"""Adapter files: `adapter_config.json` (the config + which base it was trained on) and
`adapter.safetensors` (the adapter's tensors only, keyed by module path; never the base weights).

    model.save_adapter("out/")
    model = mp.load_adapter(base, "out/")
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .config import config_from_dict
from .targeting import model_type

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter.safetensors"


def adapter_state_dict(model, name: str) -> dict[str, torch.Tensor]:
    """{"model.layers.0.self_attn.q_proj.lora_A.weight": tensor, ...} for adapter `name`."""
    model._check_name(name)
    state = {}
    for path, layer in model.adapter_layers():
        state.update({f"{path}.{k}": v for k, v in layer.adapter_state(name).items()})
    if name in model.input_adapters:
        state.update({f"input_adapter.{k}": v.detach() for k, v in model.input_adapters[name].state_dict().items()})
    return state


def _base_info(base) -> dict:
    cfg = getattr(base, "config", None)
    return {"model_type": model_type(base), "name_or_path": getattr(cfg, "_name_or_path", None) or None,
            "class": type(base).__name__}


def save_adapter(model, path, name: str) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in adapter_state_dict(model, name).items()}
    meta = {"config": model.peft_config[name].to_dict(), "base_model": _base_info(model.base_model),
            "minipeft_version": __version__}
    (path / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt", "method": model.peft_config[name].method})


def read_adapter(path) -> tuple[dict, dict[str, torch.Tensor]]:
    path = Path(path)
    if not (path / CONFIG_NAME).exists() or not (path / WEIGHTS_NAME).exists():
        raise ValueError(f"{path} is not a minipeft adapter folder (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    meta = json.loads((path / CONFIG_NAME).read_text())
    return meta, load_file(str(path / WEIGHTS_NAME))


def load_into(model, path, name: str, is_trainable: bool = False) -> None:
    """Add adapter `name` to a wrapped model from a saved folder, checking that it fits this base."""
    meta, tensors = read_adapter(path)
    config = config_from_dict(meta["config"])
    saved_type, here_type = meta.get("base_model", {}).get("model_type"), model_type(model.base_model)
    if saved_type and here_type and saved_type != here_type:
        raise ValueError(f"adapter at {path} was trained on a {saved_type!r} model; this base is {here_type!r}")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"adapter at {path} has non-finite values (nan/inf) in {bad[:5]}")
    model.add_adapter(name, config)
    try:
        expected = adapter_state_dict(model, name)
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if unexpected or missing:
            raise ValueError(f"adapter at {path} does not fit this base model: tensors for modules it does not "
                             f"have {unexpected[:5]}, missing {missing[:5]}")
        for key, value in tensors.items():
            if value.shape != expected[key].shape:
                module = key.rsplit(".", 2)[0]
                raise ValueError(f"adapter at {path} does not fit this base model: {key} has shape "
                                 f"{tuple(value.shape)} in the file but {tuple(expected[key].shape)} here "
                                 f"(module {module}); was it trained on another base model?")
        with torch.no_grad():
            for key, value in tensors.items():
                expected[key].copy_(value)  # the state-dict tensors share storage with the live parameters
    except Exception:
        model.delete_adapter(name)
        raise
    if not is_trainable:
        for _, p in model.adapter_parameters(name):
            p.requires_grad_(False)


def load_adapter(base_model, path, adapter_name: str = "default", is_trainable: bool = False):
    """Wrap `base_model` with the adapter saved at `path` (frozen unless is_trainable)."""
    from .model import PeftModel
    if isinstance(base_model, PeftModel):
        raise ValueError("base_model is already wrapped; use model.load_adapter(path, adapter_name)")
    model = PeftModel(base_model)  # no adapter yet: load_into adds it with the file's tensors
    load_into(model, path, adapter_name, is_trainable)
    return model
