"""Find the modules a method wraps.

`target` is one of
  - a list of suffixes: ["q_proj", "v_proj"] matches "model.layers.0.self_attn.q_proj" (whole dotted parts);
  - a regex string, matched against the full dotted module name with re.fullmatch;
  - "all-linear": every nn.Linear / GPT-2 Conv1D except the output head (lm_head, or a classifier's
    `classifier` / `score`), as in peft.
A target that matches nothing is an error that lists the module names that do exist.
"""
from __future__ import annotations

import re
from collections import Counter

from torch import nn

from .layer import AdapterLayer
from .weights import Conv1D

LINEAR_TYPES: tuple[type, ...] = (nn.Linear, Conv1D)

# Architecture defaults, keyed by `model.config.model_type`.
DEFAULT_TARGETS = {
    # the LoRA paper's choice: the query and value projections
    "attention_qv": {"llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
                     "bert": ["query", "value"], "roberta": ["query", "value"], "gpt2": ["c_attn"]},
    # Houlsby's placement: after the attention output projection and after the FFN output projection
    "sublayer_outputs": {"llama": ["o_proj", "down_proj"], "mistral": ["o_proj", "down_proj"],
                         "qwen2": ["o_proj", "down_proj"], "bert": ["output.dense"],
                         "roberta": ["output.dense"], "gpt2": ["c_proj"]},
    # the same, one sublayer only (He et al.'s "placement"; BERT's FFN output module is layer.N.output)
    "attention_sublayer_outputs": {"llama": ["o_proj"], "mistral": ["o_proj"], "qwen2": ["o_proj"],
                                   "bert": ["attention.output.dense"], "roberta": ["attention.output.dense"],
                                   "gpt2": ["attn.c_proj"]},
    "ffn_sublayer_outputs": {"llama": ["down_proj"], "mistral": ["down_proj"], "qwen2": ["down_proj"],
                             "bert": r".*\.layer\.\d+\.output\.dense", "roberta": r".*\.layer\.\d+\.output\.dense",
                             "gpt2": ["mlp.c_proj"]},
    # whole sublayers, for adapters that read a sublayer's input (He et al.'s parallel adapter); BERT: the
    # output modules that add the sublayer's input back (BertSelfOutput, BertOutput)
    "sublayers": {"llama": ["self_attn", "mlp"], "mistral": ["self_attn", "mlp"], "qwen2": ["self_attn", "mlp"],
                  "bert": ["output"], "roberta": ["output"], "gpt2": ["attn", "mlp"]},
    "attention_sublayers": {"llama": ["self_attn"], "mistral": ["self_attn"], "qwen2": ["self_attn"],
                            "bert": ["attention.output"], "roberta": ["attention.output"], "gpt2": ["attn"]},
    "ffn_sublayers": {"llama": ["mlp"], "mistral": ["mlp"], "qwen2": ["mlp"], "bert": r".*\.layer\.\d+\.output",
                      "roberta": r".*\.layer\.\d+\.output", "gpt2": ["mlp"]},
    # (IA)³ (peft's defaults): keys, values and the FFN down projection; "ia3_feedforward": the input-scaled ones
    "ia3": {"llama": ["k_proj", "v_proj", "down_proj"], "mistral": ["k_proj", "v_proj", "down_proj"],
            "qwen2": ["k_proj", "v_proj", "down_proj"], "bert": ["key", "value", "output.dense"],
            "roberta": ["key", "value", "output.dense"], "gpt2": ["c_attn", "mlp.c_proj"]},
    "ia3_feedforward": {"llama": ["down_proj"], "mistral": ["down_proj"], "qwen2": ["down_proj"],
                        "bert": ["output.dense"], "roberta": ["output.dense"], "gpt2": ["mlp.c_proj"]},
}


def register_linear_type(cls: type) -> None:
    """Let linear-like layers (e.g. minipeft.quant.Linear4bit) count as linear for targeting."""
    global LINEAR_TYPES
    if cls not in LINEAR_TYPES:
        LINEAR_TYPES = LINEAR_TYPES + (cls,)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES)


def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def default_target(model: nn.Module, kind: str, method: str) -> list[str]:
    table = DEFAULT_TARGETS[kind]
    mt = model_type(model)
    if mt not in table:
        raise ValueError(f"{method}: no default target for model type {mt!r}; pass target=[...] "
                         f"(module-name suffixes), a regex, or 'all-linear'. Modules: {describe_modules(model)}")
    return table[mt]


def named_base_modules(model: nn.Module):
    """named_modules() that does not descend into adapter layers (their insides are not targets)."""
    def walk(module, prefix):
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            yield path, child
            if not isinstance(child, AdapterLayer):
                yield from walk(child, path)

    yield from walk(model, "")


def unwrap(module: nn.Module) -> nn.Module:
    """The frozen module under any adapter layers."""
    while isinstance(module, AdapterLayer):
        module = module.base_layer
    return module


def describe_modules(model: nn.Module, limit: int = 40) -> str:
    """A compact list of what exists: leaf names with counts and one full example each."""
    leaves = [(n, m) for n, m in named_base_modules(model) if not list(m.children()) or isinstance(m, AdapterLayer)]
    counts = Counter(n.rsplit(".", 1)[-1] for n, _ in leaves)
    example = {}
    for n, m in leaves:
        example.setdefault(n.rsplit(".", 1)[-1], (n, type(unwrap(m)).__name__))
    parts = [f"{k} ({type_}, x{counts[k]}, e.g. {full})" for k, (full, type_) in list(example.items())[:limit]]
    return "; ".join(parts) + (" ..." if len(example) > limit else "")


def output_head_names(model: nn.Module) -> set[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {n for n, m in named_base_modules(model) if head is not None and unwrap(m) is head}
    # no output embeddings (a classification model): its new head, named like peft's SEQ_CLS heads
    return names or {n for n, _ in named_base_modules(model) if n.rsplit(".", 1)[-1] == "lm_head"
                     or n in ("classifier", "score")}


def _matcher(spec):
    """A predicate on dotted names: a list of suffixes (whole dotted parts) or a regex (full match)."""
    if isinstance(spec, str):
        pattern = re.compile(spec)
        return lambda n: pattern.fullmatch(n) is not None
    return lambda n: any(n == t or n.endswith("." + t) for t in spec)


def within(path: str, roots) -> bool:
    """Is `path` one of `roots` or inside one of them?"""
    return any(path == r or path.startswith(r + ".") for r in roots)


def find_targets(model: nn.Module, target, *, method: str, allowed: tuple[type, ...] | None = None,
                 exclude=None, inside=()) -> list[str]:
    """Dotted names of the modules `target` selects, less those `exclude` selects and those within a
    module in `inside` (modules trained in full get no adapter, on them or in them). Raises ValueError
    if none is left, or if a match has a type the method cannot wrap (`allowed`)."""
    modules = [(n, m) for n, m in named_base_modules(model) if not within(n, inside)]
    if target == "all-linear":
        heads = output_head_names(model)
        names = [n for n, m in modules if is_linear(unwrap(m)) and n not in heads]
    elif isinstance(target, str):
        try:
            pattern = re.compile(target)
        except re.error as e:
            raise ValueError(f"{method}: target {target!r} is not a valid regex ({e})") from None
        names = [n for n, _ in modules if pattern.fullmatch(n)]
    else:
        names = [n for n, _ in modules if any(n == t or n.endswith("." + t) for t in target)]
        missing = [t for t in target if not any(n == t or n.endswith("." + t) for n, _ in modules)]
        if names and missing:
            raise ValueError(f"{method}: target {missing} matched no module. Modules: {describe_modules(model)}")
    if exclude is not None:
        try:
            excluded = _matcher(exclude)
        except re.error as e:
            raise ValueError(f"{method}: exclude {exclude!r} is not a valid regex ({e})") from None
        names = [n for n in names if not excluded(n)]
    if not names:
        hint = ""
        if inside or exclude is not None:
            hint = f" once modules_to_save {list(inside)} and exclude={exclude!r} are left out"
        if isinstance(target, str) and target != "all-linear" and any(n.endswith("." + target) for n, _ in modules):
            hint += f" (a string is a regex on the full name; for a suffix pass a list: target=[{target!r}])"
        raise ValueError(f"{method}: target {target!r} matched no module{hint}. Modules: {describe_modules(model)}")
    if allowed is not None:
        by_name = dict(modules)
        bad = [(n, type(unwrap(by_name[n])).__name__) for n in names if not isinstance(unwrap(by_name[n]), allowed)]
        if bad:
            raise ValueError(f"{method} can only wrap {[t.__name__ for t in allowed]}; target {target!r} also "
                             f"matched {bad[:5]}{' ...' if len(bad) > 5 else ''}")
    return names


CONTAINERS = (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)


def find_modules_to_save(model: nn.Module, names) -> list[str]:
    """Dotted names of the modules trained in full (`modules_to_save`). A container (ModuleList, ...)
    has no forward of its own to train through: name the modules in it instead."""
    if not names:
        return []
    paths = find_targets(model, names, method="modules_to_save")
    bad = [(p, type(unwrap(model.get_submodule(p))).__name__) for p in paths
           if isinstance(unwrap(model.get_submodule(p)), CONTAINERS)]
    if bad:
        raise ValueError(f"modules_to_save names containers {bad[:5]}, which have no forward; name the "
                         f"modules inside them")
    return [p for p in paths if not within(p, [q for q in paths if q != p])]  # the outermost of nested ones
