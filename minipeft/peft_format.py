"""peft's adapter format, both ways: what `peft.PeftModel.from_pretrained(base, dir)` reads and what
`peft_model.save_pretrained(dir)` writes, translated to and from minipeft's config and tensor names.

    dir/adapter_config.json          {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": [...], ...}
    dir/adapter_model.safetensors    {"base_model.model.<module path>.lora_A.weight": (r, d_in), ...}

(peft may also write `adapter_model.bin`, a pickle: never read here, a pickle can run code.)

The methods whose tensors mean the same thing in both libraries, and how the names map
(P = "base_model.model.", path = the module's dotted name in the base model, the same in both):

    minipeft                         peft (peft_type)        tensors, ours → peft
    lora (+ rslora, rank/alpha       LORA                    path.lora_A.weight, path.lora_B.weight → P + same
      patterns, embeddings)                                  embedding: path.lora_A.weight → P path.lora_embedding_A
    dora                             LORA, use_dora=True     + path.lora_magnitude_vector → P + same
    adalora                          ADALORA                 path.lora_A.weight, .lora_B.weight, .lora_E → P path
                                                             .lora_A, .lora_B, .lora_E (peft keeps only the rank
                                                             rank_pattern leaves: rows sliced out, zeros read back)
    ia3                              IA3                     path.ia3_l (n,) → P path.ia3_l (n, 1), feedforward (1, n)
    vera                             VERA                    path.vera_lambda_b/_d → P + same;
                                                             shared.vera_A/_B → base_model.vera_A/_B
    prompt_tuning                    PROMPT_TUNING           input_adapter.prompt (L, d) → prompt_embeddings
    prefix_tuning                    PREFIX_TUNING           input_adapter.prefix (L, 2·layers·d) → same name
    (peft's P_TUNING is read as prompt tuning: its file holds only the encoder's output P, used as is)
    modules_to_save                  modules_to_save         path.weight → P path.weight (prompt methods:
                                                             base_model.path.weight)

Everything else is refused with a ValueError naming the method or the field: minipeft methods peft has no
exact format for (bottleneck adapters, LoRA-FA, MELoRA, MoSLoRA, MonteCLoRA, Propulsion, QLoRA on our NF4 base,
the selective methods, P-tuning's encoder), and peft options we do not implement set to anything but their
neutral value (`NEUTRAL`). A peft field we do not know at all is accepted only when it is off (None, False, {} or
[]), so a newer peft's unused options load and a used one does not load silently.

Targets are written as the exact module names (peft matches a list entry against the end of a module name, so a
full name picks that module alone); peft's own target lists, regexes and "all-linear" are read with peft's rules.

This module knows files and names, not models: `PeftModel.save_adapter(format="peft")` and `load_adapter` (in
model.py) pass it the adapter's tensors and the names and types of the base's modules.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
PREFIX = "base_model.model."  # peft's key prefix for the wrapped model's tensors
SHARED_PREFIX = "base_model."  # VeRA's shared A, B sit on peft's tuner itself
PROMPT_KEY = "prompt_embeddings"
ANY = object()  # a field that only matters together with another one (checked there)

# peft bookkeeping: no effect on the adapter's computation
METADATA = {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
            "inference_mode", "runtime_config"}

# peft options minipeft does not implement, at the value that makes them do nothing. Any other value → ValueError.
NEUTRAL = {
    "LORA": {"bias": "none", "lora_bias": False, "layers_to_transform": None, "layers_pattern": None,
             "megatron_config": None, "megatron_core": ANY, "trainable_token_indices": None, "loftq_config": {},
             "eva_config": None, "corda_config": None, "lora_ga_config": None, "velora_config": None,
             "alora_invocation_tokens": None, "use_qalora": False, "qalora_group_size": ANY,
             "monteclora_config": None, "layer_replication": None, "target_parameters": None, "use_bdlora": None,
             "arrow_config": None, "kasa_config": None, "ensure_weight_tying": False, "fan_in_fan_out": ANY},
    "IA3": {"init_ia3_weights": ANY, "fan_in_fan_out": ANY},
    "VERA": {"bias": "none", "layers_to_transform": None, "layers_pattern": None, "init_weights": ANY,
             "fan_in_fan_out": ANY},
    "PROMPT_TUNING": {"num_transformer_submodules": 1, "prompt_tuning_init": ANY, "prompt_tuning_init_text": ANY,
                      "tokenizer_name_or_path": ANY, "tokenizer_kwargs": ANY, "token_dim": ANY,
                      "num_attention_heads": ANY, "num_layers": ANY},
    "PREFIX_TUNING": {"num_transformer_submodules": 1, "token_dim": ANY, "num_attention_heads": ANY,
                      "num_layers": ANY, "init_weights": None, "encoder_hidden_size": ANY, "prefix_projection": ANY},
    "P_TUNING": {"num_transformer_submodules": 1, "token_dim": ANY, "num_attention_heads": ANY, "num_layers": ANY,
                 "encoder_reparameterization_type": ANY, "encoder_hidden_size": ANY, "encoder_num_layers": ANY,
                 "encoder_dropout": ANY},
}
NEUTRAL["ADALORA"] = {**NEUTRAL["LORA"], "r": ANY, "use_dora": False, "use_rslora": False, "alpha_pattern": {},
                     "init_lora_weights": ANY}  # AdaLoRA's r is unused (every matrix starts at init_r)
# the peft fields each type translates (read by from_peft)
MAPPED = {
    "LORA": {"r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern",
             "init_lora_weights", "target_modules", "exclude_modules", "modules_to_save"},
    "IA3": {"target_modules", "exclude_modules", "feedforward_modules", "modules_to_save"},
    "ADALORA": {"init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step",
                "lora_alpha", "lora_dropout", "rank_pattern", "target_modules", "exclude_modules", "modules_to_save"},
    "VERA": {"r", "target_modules", "projection_prng_key", "save_projection", "vera_dropout", "d_initial",
             "modules_to_save"},
    "PROMPT_TUNING": {"num_virtual_tokens", "modules_to_save"},
    "PREFIX_TUNING": {"num_virtual_tokens", "modules_to_save"},
    "P_TUNING": {"num_virtual_tokens", "modules_to_save"},
}
LAYER_TENSORS = {"lora": ("lora_A.weight", "lora_B.weight"), "dora": ("lora_A.weight", "lora_B.weight",
                 "lora_magnitude_vector"), "ia3": ("ia3_l",), "vera": ("vera_lambda_b", "vera_lambda_d")}
EMBEDDING_NAMES = {"lora_A.weight": "lora_embedding_A", "lora_B.weight": "lora_embedding_B"}  # ours → peft
TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "LMHeadModel": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
              "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS"}
ADALORA_SCHEDULE = ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                    "total_step")  # the same names and meanings in both
REFUSED = {  # why a minipeft method has no peft file
    "lora_fa": "peft has no LoRA-FA adapter (A frozen); save it as a LoRA with mp.LoRAConfig if that is meant",
    "qlora": "our NF4 base is not bitsandbytes': the adapter would meet another base in peft",
    "p_tuning": "peft saves P-tuning as the encoder's output P; use to_prompt_tuning(model) and save that",
}


# ---- files ----------------------------------------------------------------------------------------------
def is_peft_dir(path) -> bool:
    """A folder peft saved: adapter_config.json with a peft_type (and its tensors, checked on reading)."""
    path = Path(path)
    config = path / CONFIG_NAME
    if not config.exists() or not ((path / WEIGHTS_NAME).exists() or (path / PICKLE_NAME).exists()):
        return False
    try:
        return "peft_type" in json.loads(config.read_text())
    except json.JSONDecodeError:
        return False


def read_peft(path) -> tuple[dict, dict[str, torch.Tensor]]:
    path = Path(path)
    if not (path / WEIGHTS_NAME).exists():
        if (path / PICKLE_NAME).exists():
            raise ValueError(f"{path} holds {PICKLE_NAME}, a pickle; minipeft never unpickles (it can run code). "
                             f"Convert it once where you trust it: peft_model.save_pretrained(dir, "
                             f"safe_serialization=True) writes {WEIGHTS_NAME}")
        raise ValueError(f"{path} has no {WEIGHTS_NAME}")
    return json.loads((path / CONFIG_NAME).read_text()), load_file(str(path / WEIGHTS_NAME))


def write_peft(path, peft_config: dict, tensors: dict[str, torch.Tensor]) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / WEIGHTS_NAME), metadata={"format": "pt"})


# ---- minipeft → peft ----------------------------------------------------------------------------------------
def to_peft(config: dict, state: dict[str, torch.Tensor], layers: dict[str, dict], base_class: str
            ) -> tuple[dict, dict[str, torch.Tensor]]:
    """(peft's adapter_config.json, peft's tensors) for one minipeft adapter.

    config: our config's to_dict(); state: our adapter_state_dict(); layers: {module path: {"layer": our layer
    class name, "base": the base module's class name, plus the layer's per-adapter values (is_feedforward...)}}
    for every module carrying the adapter; base_class: the base model's class name (peft's task_type)."""
    method = config["method"]
    if method in REFUSED:
        raise ValueError(f"{method} cannot be saved in peft's format: {REFUSED[method]}")
    writers = {"lora": lora_to_peft, "dora": lora_to_peft, "adalora": adalora_to_peft, "ia3": ia3_to_peft,
               "vera": vera_to_peft, "prompt_tuning": prompt_to_peft, "prefix_tuning": prompt_to_peft}
    if method not in writers:
        raise ValueError(f"{method} cannot be saved in peft's format: peft has no method that stores it exactly "
                         f"(format='peft' supports {sorted(writers)})")
    adapted = {p: info for p, info in layers.items() if info["layer"] != "ModulesToSave"}
    peft_config, tensors = writers[method](config, state, adapted)
    copies = sorted(p for p, info in layers.items() if info["layer"] == "ModulesToSave")
    peft_config["modules_to_save"] = copies or None
    prefix = SHARED_PREFIX if method in ("prompt_tuning", "prefix_tuning") else PREFIX  # where peft keeps them
    tensors.update({prefix + k: v for k, v in state.items() if any(k.startswith(c + ".") for c in copies)})
    task = next((t for suffix, t in TASK_TYPES.items() if base_class.endswith(suffix)), None)
    peft_config.update(task_type=task, base_model_name_or_path=None, inference_mode=True)
    return peft_config, tensors


def layer_tensors(state, adapted, names, rename=lambda path, key, value: (key, value)) -> dict:
    """Our per-layer tensors under peft's keys: P + path + name (renamed/reshaped by `rename`)."""
    out = {}
    for path in adapted:
        for key in names:
            if f"{path}.{key}" in state:
                k, v = rename(path, key, state[f"{path}.{key}"])
                out[f"{PREFIX}{path}.{k}"] = v
    return out


def conv1d_targets(adapted) -> bool:
    """peft's fan_in_fan_out: True for GPT-2's Conv1D (weights stored (d_in, d_out))."""
    return any(info["base"] == "Conv1D" for info in adapted.values())


def lora_to_peft(config, state, adapted):
    if config["method"] == "dora" and not config.get("detach_norm", True):
        raise ValueError("dora with detach_norm=False cannot be saved in peft's format: peft's DoRA always "
                         "detaches the norm (set model.peft_config[name].detach_norm = True to save it anyway)")
    embeddings = {p for p, info in adapted.items() if info["base"] == "Embedding"}
    peft_config = {"peft_type": "LORA", "r": config["r"], "lora_alpha": config["alpha"],
                   "lora_dropout": config["dropout"], "use_rslora": config["rslora"],
                   "use_dora": config["method"] == "dora", "rank_pattern": config["rank_pattern"] or {},
                   "alpha_pattern": config["alpha_pattern"] or {},
                   "init_lora_weights": "gaussian" if config["init"] == "gaussian" else True,
                   "target_modules": sorted(adapted), "fan_in_fan_out": conv1d_targets(adapted), "bias": "none"}

    def rename(path, key, value):
        return (EMBEDDING_NAMES[key], value) if path in embeddings else (key, value)

    return peft_config, layer_tensors(state, adapted, LAYER_TENSORS[config["method"]], rename)


def adalora_to_peft(config, state, adapted):
    """P = lora_B (d_out, r_init), Q = lora_A (r_init, d_in), λ = lora_E (r_init, 1); s = α / (r_init + 1e-5) in
    both. peft saves only the triplets rank_pattern keeps (and keeps s): pruned rows are cut out here too."""
    if config.get("total_step") is None:
        raise ValueError("adalora with total_step=None cannot be saved in peft's format (peft needs the schedule's "
                         "length): set model.peft_config[name].total_step")
    masks = config.get("rank_pattern") or {}
    peft_config = {"peft_type": "ADALORA", **{k: config[k] for k in ADALORA_SCHEDULE}, "lora_alpha": config["alpha"],
                   "lora_dropout": config["dropout"], "target_modules": sorted(adapted),
                   "rank_pattern": {f"{p}.lora_E": m for p, m in masks.items()} or None,
                   "fan_in_fan_out": conv1d_targets(adapted), "bias": "none"}
    tensors = {}
    for path in adapted:
        keep = torch.tensor(masks[path]) if path in masks else slice(None)
        A, B, E = (state[f"{path}.{k}"] for k in ("lora_A.weight", "lora_B.weight", "lora_E"))
        tensors.update({f"{PREFIX}{path}.lora_A": A[keep], f"{PREFIX}{path}.lora_B": B[:, keep],
                        f"{PREFIX}{path}.lora_E": E[keep]})
    return peft_config, tensors


def ia3_to_peft(config, state, adapted):
    ff = sorted(p for p, info in adapted.items() if info.get("is_feedforward"))
    peft_config = {"peft_type": "IA3", "target_modules": sorted(adapted), "feedforward_modules": ff,
                   "fan_in_fan_out": conv1d_targets(adapted)}

    def rename(path, key, value):  # peft's l: (d_out, 1) scales outputs, (1, d_in) inputs
        return key, (value[None, :] if path in ff else value[:, None])

    return peft_config, layer_tensors(state, adapted, LAYER_TENSORS["ia3"], rename)


def vera_to_peft(config, state, adapted):
    peft_config = {"peft_type": "VERA", "r": config["r"], "target_modules": sorted(adapted),
                   "projection_prng_key": config["projection_prng_key"], "vera_dropout": config["dropout"],
                   "d_initial": config["d_initial"], "save_projection": config["save_projection"],
                   "fan_in_fan_out": conv1d_targets(adapted), "bias": "none"}
    tensors = layer_tensors(state, adapted, LAYER_TENSORS["vera"])
    tensors.update({SHARED_PREFIX + k.removeprefix("shared."): v for k, v in state.items() if k.startswith("shared.")})
    return peft_config, tensors


def prompt_to_peft(config, state, adapted):
    key = "input_adapter.prompt" if config["method"] == "prompt_tuning" else "input_adapter.prefix"
    P = state[key]  # (L, d) or (L, 2·layers·d)
    if config["method"] == "prompt_tuning":
        peft_config = {"peft_type": "PROMPT_TUNING", "prompt_tuning_init": "RANDOM", "token_dim": P.shape[1]}
    else:  # P is saved as computed (our to_dict folds the MLP); peft reads it without one
        peft_config = {"peft_type": "PREFIX_TUNING", "prefix_projection": False}
    peft_config.update(num_virtual_tokens=config["num_virtual_tokens"], num_transformer_submodules=1)
    return peft_config, {PROMPT_KEY: P}


# ---- peft → minipeft ----------------------------------------------------------------------------------------
def from_peft(peft_config: dict, tensors: dict[str, torch.Tensor], modules: dict[str, str]
              ) -> tuple[dict, dict[str, torch.Tensor]]:
    """(our config dict, our tensors) from a peft folder's config and tensors. `modules`: {dotted name: class
    name} of every module of the base (to resolve peft's targets with peft's rules, and find embeddings)."""
    peft_type = peft_config.get("peft_type")
    readers = {"LORA": lora_from_peft, "ADALORA": adalora_from_peft, "IA3": ia3_from_peft, "VERA": vera_from_peft,
               "PROMPT_TUNING": prompt_from_peft, "PREFIX_TUNING": prompt_from_peft, "P_TUNING": prompt_from_peft}
    if peft_type not in readers:
        raise ValueError(f"peft_type {peft_type!r} is not supported by minipeft's peft reader "
                         f"(supported: {sorted(readers)})")
    check_fields(peft_type, peft_config)
    return readers[peft_type](peft_config, tensors, modules)


def check_fields(peft_type: str, peft_config: dict) -> None:
    """Every field is translated, bookkeeping, or an option we lack at its neutral value; else ValueError."""
    for field, value in peft_config.items():
        if field in METADATA or field in MAPPED[peft_type]:
            continue
        if field in NEUTRAL[peft_type]:
            neutral = NEUTRAL[peft_type][field]
            if neutral is not ANY and value != neutral:
                raise ValueError(f"peft {peft_type} option {field}={value!r} is not supported by minipeft "
                                 f"(only {neutral!r}); the adapter would compute something else here")
        elif not (value is None or value is False or value == {} or value == []):
            raise ValueError(f"peft {peft_type} field {field!r}={value!r} is unknown to minipeft; refusing rather "
                             f"than ignoring it")


def peft_matches(spec, name: str) -> bool:
    """peft's target rule: a regex string full-matches the name; a list entry equals it or ends it after a dot."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def resolve_targets(peft_config: dict, modules: dict[str, str], saved: list[str]) -> dict:
    """peft's target_modules less exclude_modules, as our `target` (and `exclude`): "all-linear" stays, with
    exclude_modules as our exclude (the same rules in both); anything else becomes the exact module names peft
    would pick."""
    spec, exclude = peft_config.get("target_modules"), peft_config.get("exclude_modules")
    if not spec:
        raise ValueError("peft adapter_config.json has no target_modules")
    if spec == "all-linear":
        return {"target": spec, "exclude": exclude or None}
    names = [n for n in modules if peft_matches(spec, n) and not (exclude and peft_matches(exclude, n))
             and not any(n == s or n.startswith(s + ".") for s in saved)]
    if not names:
        raise ValueError(f"peft target_modules {spec!r} matches no module of this base")
    return {"target": names}


def modules_to_save(peft_config: dict, modules: dict[str, str]) -> list[str] | None:
    """peft's modules_to_save names that exist in this base: peft's SEQ_CLS task lists both "classifier" and
    "score" whatever the model has. A listed module that exists needs its tensors (else: missing key error)."""
    names = peft_config.get("modules_to_save") or []
    found = sorted({n for n in modules if peft_matches(list(names), n)} if names else set())
    outer = [n for n in found if not any(n.startswith(o + ".") for o in found if o != n)]
    return outer or None


def strip_prefix(tensors: dict) -> dict:
    bad = [k for k in tensors if not k.startswith(PREFIX)]
    if bad:
        raise ValueError(f"peft adapter has tensors outside the model ({PREFIX}...): {bad[:5]}")
    return {k.removeprefix(PREFIX): v for k, v in tensors.items()}


def lora_from_peft(peft_config, tensors, modules):
    saved = modules_to_save(peft_config, modules)
    targets = resolve_targets(peft_config, modules, saved or [])
    init = peft_config.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):
        raise ValueError(f"peft LORA option init_lora_weights={init!r} is not supported by minipeft (methods such "
                         f"as PiSSA, OLoRA, LoftQ, CorDA also change the base weights)")
    dora = bool(peft_config.get("use_dora", False))
    if dora and any(modules.get(n) == "Embedding" for n in targets["target"] if targets["target"] != "all-linear"):
        raise ValueError("peft LORA option use_dora=True on an embedding is not supported by minipeft's DoRA")
    config = {"method": "dora" if dora else "lora", **targets, "modules_to_save": saved,
              "r": peft_config.get("r", 8), "alpha": peft_config.get("lora_alpha", 8),
              "dropout": peft_config.get("lora_dropout", 0.0), "rslora": bool(peft_config.get("use_rslora")),
              "init": "gaussian" if init == "gaussian" else "kaiming",
              "rank_pattern": peft_config.get("rank_pattern") or None,
              "alpha_pattern": peft_config.get("alpha_pattern") or None}
    check_fan_in_fan_out(peft_config, targets["target"], modules)
    ours = {}
    for key, value in strip_prefix(tensors).items():
        path, _, name = key.rpartition(".")
        if name in ("lora_embedding_A", "lora_embedding_B"):
            key = f"{path}.lora_{name[-1]}.weight"
        elif key.endswith(".base_layer.weight") and modules.get(key.removesuffix(".base_layer.weight")) == \
                "Embedding":  # peft saves a targeted embedding's base matrix too
            raise ValueError(f"peft adapter holds a whole embedding matrix ({PREFIX}{key}, peft's "
                             f"save_embedding_layers); minipeft loads adapter tensors only: save it with "
                             f"save_embedding_layers=False if the base's embeddings did not change")
        ours[key] = value
    return config, ours


def adalora_from_peft(peft_config, tensors, modules):
    saved = modules_to_save(peft_config, modules)
    targets = resolve_targets(peft_config, modules, saved or [])
    check_fan_in_fan_out(peft_config, targets["target"], modules)
    init_r = peft_config.get("init_r", 12)
    pattern = peft_config.get("rank_pattern") or {}  # {"<path>.lora_E": [bool] * init_r}
    masks = {k.removesuffix(".lora_E"): [bool(b) for b in m] for k, m in pattern.items()}
    bad = [k for k, m in masks.items() if len(m) != init_r]
    if bad:
        raise ValueError(f"peft ADALORA rank_pattern entries {bad[:5]} do not have init_r={init_r} entries")
    config = {"method": "adalora", **targets, "modules_to_save": saved, "alpha": peft_config.get("lora_alpha", 8),
              "dropout": peft_config.get("lora_dropout", 0.0), "rank_pattern": masks or None,
              **{k: peft_config[k] for k in ADALORA_SCHEDULE if k in peft_config}}
    ours = {}
    for key, value in strip_prefix(tensors).items():
        path, _, name = key.rpartition(".")
        if name in ("lora_A", "lora_B", "lora_E"):
            if path in masks and value.shape[name == "lora_B"] == sum(masks[path]) != init_r:  # back to init_r rows
                value = unslice(value, masks[path], dim=int(name == "lora_B"))
            key = f"{path}.{name}" + (".weight" if name != "lora_E" else "")
        ours[key] = value
    return config, ours


def unslice(value: torch.Tensor, mask: list[bool], dim: int) -> torch.Tensor:
    """The kept rows (dim 0) or columns (dim 1) put back among zeros: init_r of them, pruned ones 0."""
    shape = list(value.shape)
    shape[dim] = len(mask)
    full = value.new_zeros(shape)
    keep = torch.tensor(mask)
    if dim == 0:
        full[keep] = value
    else:
        full[:, keep] = value
    return full


def check_fan_in_fan_out(peft_config, target, modules) -> None:
    """peft's fan_in_fan_out says the targets store W as (d_in, d_out) (GPT-2's Conv1D): it must fit the base."""
    flag = peft_config.get("fan_in_fan_out", False)
    names = target if isinstance(target, list) else []
    conv = any(modules.get(n) == "Conv1D" for n in names)
    if names and flag != conv:
        raise ValueError(f"peft option fan_in_fan_out={flag!r} does not fit this base: its targets "
                         f"{'are' if conv else 'are not'} GPT-2 Conv1D layers; was it saved for another model?")


def ia3_from_peft(peft_config, tensors, modules):
    saved = modules_to_save(peft_config, modules)
    targets = resolve_targets(peft_config, modules, saved or [])
    ff_spec = peft_config.get("feedforward_modules") or []
    if isinstance(ff_spec, str):
        ff = [n for n in modules if re.fullmatch(ff_spec, n)]
    else:  # peft's IA3 rule for feedforward_modules: a plain endswith
        ff = [n for n in modules if any(n.endswith(f) for f in ff_spec)]
    if targets["target"] != "all-linear":
        ff = [n for n in ff if n in targets["target"]]
    check_fan_in_fan_out(peft_config, targets["target"], modules)
    config = {"method": "ia3", **targets, "modules_to_save": saved, "feedforward": ff}
    ours = {}
    for key, value in strip_prefix(tensors).items():
        if key.endswith(".ia3_l"):
            if value.dim() != 2 or 1 not in value.shape:
                raise ValueError(f"peft tensor {PREFIX}{key} has shape {tuple(value.shape)}; (IA)³ vectors are "
                                 f"(d_out, 1) or (1, d_in)")
            value = value.reshape(-1)
        ours[key] = value
    return config, ours


def vera_from_peft(peft_config, tensors, modules):
    saved = modules_to_save(peft_config, modules)
    targets = resolve_targets(peft_config, modules, saved or [])
    check_fan_in_fan_out(peft_config, targets["target"], modules)
    config = {"method": "vera", **targets, "modules_to_save": saved, "r": peft_config.get("r", 256),
              "projection_prng_key": peft_config.get("projection_prng_key", 0),
              "save_projection": peft_config.get("save_projection", True),
              "dropout": peft_config.get("vera_dropout", 0.0), "d_initial": peft_config.get("d_initial", 0.1)}
    shared = {k: v for k, v in tensors.items() if k in (SHARED_PREFIX + "vera_A", SHARED_PREFIX + "vera_B")}
    ours = strip_prefix({k: v for k, v in tensors.items() if k not in shared})
    ours.update({"shared." + k.removeprefix(SHARED_PREFIX): v for k, v in shared.items()})
    return config, ours


def prompt_from_peft(peft_config, tensors, modules):
    """Prompt tuning, P-tuning (its saved P is a soft prompt) and prefix tuning: one tensor, prompt_embeddings."""
    peft_type = peft_config["peft_type"]
    saved = modules_to_save(peft_config, modules)  # a classifier head: base_model.<path>.<tensor>
    copies = {k.removeprefix(SHARED_PREFIX): v for k, v in tensors.items()
              if k.startswith(SHARED_PREFIX) and any(k.startswith(f"{SHARED_PREFIX}{m}.") for m in saved or [])}
    unknown = sorted(set(tensors) - {PROMPT_KEY} - {SHARED_PREFIX + k for k in copies})
    if unknown or PROMPT_KEY not in tensors:
        raise ValueError(f"peft {peft_type} adapter must hold exactly {PROMPT_KEY!r} (and its modules_to_save "
                         f"{saved}); it has {sorted(tensors)[:5]} (unknown: {unknown[:5]})")
    L = peft_config.get("num_virtual_tokens")
    if tensors[PROMPT_KEY].shape[0] != L:
        raise ValueError(f"peft {PROMPT_KEY} has {tensors[PROMPT_KEY].shape[0]} rows, num_virtual_tokens is {L}")
    if peft_type == "PREFIX_TUNING":  # the saved P was computed by the MLP if prefix_projection: read it as is
        folded = bool(peft_config.get("prefix_projection"))
        config = {"method": "prefix_tuning", "num_virtual_tokens": L, "projection_folded": folded}
        key = "input_adapter.prefix"
    else:
        config, key = {"method": "prompt_tuning", "num_virtual_tokens": L}, "input_adapter.prompt"
    return {**config, "modules_to_save": saved}, {key: tensors[PROMPT_KEY], **copies}


__all__ = ["is_peft_dir", "read_peft", "write_peft", "to_peft", "from_peft", "CONFIG_NAME", "WEIGHTS_NAME",
           "PICKLE_NAME"]
