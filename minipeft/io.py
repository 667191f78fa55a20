"""The adapter file format: `adapter_config.json` (the config + which base it was trained on) and
`adapter.safetensors` (the adapter's tensors only, keyed by module path; never the base weights).

This module knows files, not models: `PeftModel.save_adapter` / `load_adapter` (in model.py) call it.
peft's format (adapter_config.json with a `peft_type` + adapter_model.safetensors) is translated in
peft_format.py; `detect_format` tells the two apart from the files.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import __version__, peft_format
from .targeting import model_type, named_base_modules, unwrap

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter.safetensors"


def base_model_info(base) -> dict:
    cfg = getattr(base, "config", None)
    return {"model_type": model_type(base), "name_or_path": getattr(cfg, "_name_or_path", None) or None,
            "class": type(base).__name__}


def base_module_types(base) -> dict[str, str]:
    """{dotted name: class name} of every module of the base (under adapter layers, the base module's class):
    what peft_format needs to resolve peft's target rules, without knowing models."""
    return {n: type(unwrap(m)).__name__ for n, m in named_base_modules(base)}


def detect_format(path) -> str:
    """"minipeft" or "peft", from the files in the folder; ValueError if it is neither."""
    path = Path(path)
    if (path / CONFIG_NAME).exists() and (path / WEIGHTS_NAME).exists():
        return "minipeft"
    if peft_format.is_peft_dir(path):
        return "peft"
    files = sorted(p.name for p in path.iterdir())[:10] if path.is_dir() else "no such folder"
    raise ValueError(f"{path} is not a minipeft adapter folder (needs {CONFIG_NAME} and {WEIGHTS_NAME}) nor a "
                     f"peft one ({CONFIG_NAME} with a peft_type and {peft_format.WEIGHTS_NAME}); found {files}")


def write_adapter(path, config: dict, base_info: dict, state: dict[str, torch.Tensor]) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {"config": config, "base_model": base_info, "minipeft_version": __version__}
    (path / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    state = {k: v.contiguous() for k, v in state.items()}
    save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt", "method": config["method"]})


def read_adapter(path) -> tuple[dict, dict[str, torch.Tensor]]:
    path = Path(path)
    if not (path / CONFIG_NAME).exists() or not (path / WEIGHTS_NAME).exists():
        raise ValueError(f"{path} is not a minipeft adapter folder (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    meta = json.loads((path / CONFIG_NAME).read_text())
    return meta, load_file(str(path / WEIGHTS_NAME))


def check_fits(path, meta: dict, tensors: dict[str, torch.Tensor], base) -> None:
    """Refuse an adapter saved for another kind of base model, or holding nan/inf."""
    saved_type, here_type = meta.get("base_model", {}).get("model_type"), model_type(base)
    if saved_type and here_type and saved_type != here_type:
        raise ValueError(f"adapter at {path} was trained on a {saved_type!r} model; this base is {here_type!r}")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"adapter at {path} has non-finite values (nan/inf) in {bad[:5]}")


def check_tensors_match(path, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """The file's tensors must be exactly the ones the freshly added adapter has, with the same shapes."""
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
