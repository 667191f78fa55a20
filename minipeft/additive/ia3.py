r"""(IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al., NeurIPS 2022,
"Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning", arXiv:2205.05638).

Three trained vectors per transformer block rescale activations element by element:

    attention:  softmax(Q (l_k ⊙ K)ᵀ / √d_k) (l_v ⊙ V)          l_k ∈ R^{d_k}, l_v ∈ R^{d_v}
    FFN:        (l_ff ⊙ γ(W_1 x)) W_2                            l_ff ∈ R^{d_ff}

init l = 1 (the model starts exactly at the base). As in peft, the vectors sit on linear layers:

    output scaling (keys, values):  y = l ⊙ (W0 x + b)          l ∈ R^{d_out}   (l_k on k_proj, l_v on v_proj)
    input scaling (feedforward):    y = W0 (l ⊙ x) + b          l ∈ R^{d_in}    (l_ff on the FFN down projection,
                                                                                 whose input is γ(W_1 x))

Which target is which: `feedforward` lists the targets whose *input* is scaled (peft's `feedforward_modules`);
every other target has its output scaled. Code names: l = `ia3_l[name]` (peft's name), a 1-D tensor of
d_out (output scaling) or d_in (input scaling) entries; `is_feedforward[name]` says which.

Defaults per architecture (peft's): Llama / Mistral k_proj, v_proj, down_proj with down_proj feedforward;
GPT-2 c_attn, mlp.c_proj with mlp.c_proj feedforward; BERT / RoBERTa key, value, output.dense with
output.dense feedforward. Qwen2: k_proj, v_proj, down_proj (the paper's keys and values; peft's table
has q_proj, v_proj there).

Merge (exact math, rounding aside): output scaling  W ← diag(l) W0, b ← l ⊙ b0 (the bias is scaled too);
input scaling  W ← W0 diag(l), b unchanged. Unmerge restores the base bit for bit (the spine keeps it; peft
divides by l + 1e-8 instead). Trainable parameters: Σ d_out over output-scaled targets + Σ d_in over
feedforward targets; for a Llama block d_kv + d_kv + d_ff.

Differences from the paper and from peft, honestly: (1) GPT-2's fused c_attn computes q, k and v in one
layer, so its output scaling also rescales the queries (as in peft); (2) on BERT the suffix "output.dense"
also names the attention output projection (attention.output.dense), so peft's default scales its input
(the attention's output) as well — kept, to match peft; (3) `feedforward` suffixes match whole dotted parts
(as `target` does), while peft's `feedforward_modules` uses a plain `endswith`; (4) an explicit
`feedforward` module that is not among the targets is an error here (peft only checks that the lists of
names are subsets); `feedforward=None` takes the architecture's default, restricted to the targets.
T-Few's other ingredients (the unlikelihood and length-normalised losses, pre-training the vectors on
multitask data) belong to the training recipe, not to the layer, and are not here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .. import targeting
from ..config import PeftConfig, register
from ..layer import AdapterLayer
from ..weights import base_weight, linear_dims, set_base_weight


def _matches(path: str, spec) -> bool:
    """Does module `path` match `spec`: a list of suffixes (whole dotted parts) or a regex (full match)?"""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == t or path.endswith("." + t) for t in spec)


@register
@dataclass
class IA3Config(PeftConfig):
    # targets whose INPUT is scaled (l_ff before the FFN down projection); the other targets scale their output.
    # A list of module-name suffixes or a regex; None: the architecture's default (peft's feedforward_modules)
    feedforward: str | list[str] | None = None

    method = "ia3"

    def validate(self):
        ff = self.feedforward
        if isinstance(ff, tuple):
            ff = self.feedforward = list(ff)
        if ff is None:
            return
        if isinstance(ff, str):
            try:
                re.compile(ff)
            except re.error as e:
                raise ValueError(f"feedforward {ff!r} is not a valid regex ({e})") from None
        elif not isinstance(ff, list) or not all(isinstance(t, str) for t in ff):
            raise ValueError(f"feedforward must be a list of module-name suffixes or a regex string, got {ff!r}")

    @property
    def base_types(self):
        return targeting.LINEAR_TYPES

    def default_target(self, model):
        return targeting.default_target(model, "ia3", self.method)

    @property
    def layer_class(self):
        return IA3Layer

    def prepare_model(self, model):
        """Resolve which targets are feedforward (input-scaled); an explicit one that is no target is an error."""
        target = self.target if self.target is not None else self.default_target(model)
        inside = targeting.find_modules_to_save(model, self.modules_to_save)
        targets = set(targeting.find_targets(model, target, method=self.method, allowed=self.base_types,
                                             exclude=self.exclude, inside=inside))
        if self.feedforward is None:
            mt = targeting.model_type(model)
            spec = targeting.DEFAULT_TARGETS["ia3_feedforward"].get(mt)
            if spec is None and self.target is not None:
                raise ValueError(f"feedforward: no default for model type {mt!r}; pass feedforward=[...] "
                                 f"(module-name suffixes among the targets, or [] for none)")
            self._feedforward_paths = {n for n in targets if _matches(n, spec)}
            return
        named = [n for n, _ in targeting.named_base_modules(model)]
        ff = [n for n in named if _matches(n, self.feedforward)]
        if self.feedforward and not ff:
            raise ValueError(f"feedforward {self.feedforward!r} matched no module. "
                             f"Modules: {targeting.describe_modules(model)}")
        outside = [n for n in ff if n not in targets]
        if outside:
            raise ValueError(f"feedforward {self.feedforward!r} names modules that are not (IA)³ targets: "
                             f"{outside[:5]}{' ...' if len(outside) > 5 else ''}; add them to target or leave "
                             f"them out of feedforward")
        self._feedforward_paths = set(ff)

    def is_feedforward(self, path: str) -> bool:
        """Is the module at `path` input-scaled? (Resolved against the model by prepare_model; a layer built
        by hand, outside a model, falls back to matching `feedforward` against its path.)"""
        resolved = getattr(self, "_feedforward_paths", None)
        return path in resolved if resolved is not None else _matches(path, self.feedforward)


class IA3Layer(AdapterLayer):
    """A linear layer (nn.Linear, GPT-2 Conv1D, 4-bit) whose output (keys, values) or input (feedforward)
    is multiplied element-wise by a trained vector l, init 1."""

    adapter_dicts = ("ia3_l",)
    adapter_values = ("is_feedforward",)
    can_merge = True

    def __init__(self, base_layer: nn.Module, path: str = ""):
        super().__init__(base_layer, path)
        self.in_features, self.out_features = linear_dims(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward: dict[str, bool] = {}

    def add_adapter(self, name: str, config: IA3Config) -> None:
        device, dtype = self.base_device_dtype()
        ff = config.is_feedforward(self.path)
        n = self.in_features if ff else self.out_features
        self.ia3_l[name] = nn.Parameter(torch.ones(n, device=device, dtype=dtype))  # l = 1: starts at the base
        self.is_feedforward[name] = ff

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self.active
        if name is None:
            return self.base_layer(x, *args, **kwargs)
        lvec = self.ia3_l[name]
        if self.is_feedforward[name]:  # y = W0 (l ⊙ x) + b
            return self.base_layer((x.to(lvec.dtype) * lvec).to(x.dtype), *args, **kwargs)
        y = self.base_layer(x, *args, **kwargs)  # y = l ⊙ (W0 x + b)
        return (y.to(lvec.dtype) * lvec).to(y.dtype)

    def merge_weights(self, name: str) -> None:
        lvec = self.ia3_l[name].float()
        W0 = base_weight(self.base_layer).float()  # (d_out, d_in)
        if self.is_feedforward[name]:
            set_base_weight(self.base_layer, W0 * lvec[None, :])  # columns: the bias is not touched
            return
        set_base_weight(self.base_layer, lvec[:, None] * W0)  # rows, and the bias with them
        bias = getattr(self.base_layer, "bias", None)
        if bias is not None:
            bias.copy_((bias.float() * lvec).to(bias.dtype))


@torch.no_grad()
def ia3_vectors(model, adapter_name: str | None = None) -> dict[str, tuple[torch.Tensor, bool]]:
    """{module path: (l (float32, CPU), is_feedforward)} for every (IA)³ layer of the adapter."""
    name = adapter_name or model.active_adapter
    model.check_adapter_name(name)
    return {path: (layer.ia3_l[name].detach().float().cpu(), layer.is_feedforward[name])
            for path, layer in model.adapter_layers() if isinstance(layer, IA3Layer) and name in layer.adapter_names()}


__all__ = ["IA3Config", "IA3Layer", "ia3_vectors"]
