r"""Bottleneck adapters: Houlsby et al. (2019, arXiv:1902.00751) and He et al.'s parallel / scaled parallel
adapter (2022, "Towards a Unified View of Parameter-Efficient Transfer Learning", arXiv:2110.04366).

One layer class covers the design space He et al. draw. A small two-layer network

    Δ(u) = W_up f(W_down u + b_down) + b_up,      W_down ∈ R^{m×d}, b_down ∈ R^m, W_up ∈ R^{d×m}, b_up ∈ R^d

is added, times a scale s, to the output h of a wrapped module whose input is x:

    form="sequential" (Houlsby):  h ← h + s·Δ(h)     the adapter reads the module's output
    form="parallel"   (He et al.): h ← h + s·Δ(x)     the adapter reads the module's input

`placement` picks the default targets: "attention", "ffn" or "both" sublayers of each block. The sequential
form wraps the sublayer's output projection (Llama o_proj/down_proj, GPT-2 attn.c_proj/mlp.c_proj, BERT
attention.output.dense/output.dense: `targeting.DEFAULT_TARGETS["sublayer_outputs"]`), as before. The parallel
form needs the sublayer's input, so it wraps the whole sublayer (`targeting.DEFAULT_TARGETS["sublayers"]`):
Llama self_attn/mlp, GPT-2 attn/mlp (attention returns a tuple: s·Δ(x) is added to its first element).
BERT splits a sublayer over two modules; its output module computes LayerNorm(dropout(dense(a)) + x) with
x = `input_tensor`, the sublayer's input (the residual). We wrap that output module (BertSelfOutput, BertOutput)
and pass x + s·Δ(x) as its residual, which is exactly LayerNorm(dropout(dense(a)) + s·Δ(x) + x): the adapter
is added to the sublayer's output before the residual add and LayerNorm, as in He et al.'s code for BART.
Any module whose forward has an `input_tensor` argument is treated this way; for the others x is the
forward's first argument. A parallel adapter on a single linear layer (target=["q_proj"]) reads that
layer's input: with f = identity, zero biases and s = α/r it is LoRA (book/unified_view.md checks it).

He et al.'s scaled parallel adapter on the FFN (their best point, METHODS.md): h_ffn ← FFN(x) + 4·Δ(x),
ReLU, m = 512, W_down kaiming-uniform, W_up and biases zero: `AdapterConfig.scaled_parallel()`.

Code names: W_down, b_down = `adapter_down[name].weight/.bias` (m, d_in), (m,); W_up, b_up =
`adapter_up[name].weight/.bias` (d_out, m), (d_out,); f = `act[name]`; m = `config.bottleneck`;
s = `scaling[name]` (`config.scale`). d_in = d_out = d except for a parallel adapter on one linear layer.

Init: "houlsby" (the default, near identity): weights ~ N(0, σ²) truncated to ±2σ with σ = 1e-2 (the paper's
text; the released adapter-bert code defaults to 1e-3), biases 0 — so the adapter adds only a tiny
W_up f(W_down u) at start. "lora" (He et al., following LoRA): W_down kaiming-uniform (as nn.Linear,
a = √5), W_up and both biases 0 — the adapter adds exactly 0 at start.
Trainable parameters per wrapped module: 2md + d + m (m·d_in + m + d_out·m + d_out in general).
Not mergeable: f is nonlinear, so the adapter cannot be folded into W (model.merge() raises).
Inference cost: two extra small matmuls per wrapped module and token, m·(d_in + d_out) multiply-adds;
see `adapter_macs_per_token`. Time it in a chapter with `with model.disable_adapter():` as the baseline.

Defaults (form="sequential", placement="both", scale=1, activation="gelu", init="houlsby") are Houlsby's
adapter exactly as before this refactor: same targets, same init, same saved tensors.

Differences from the papers, honestly: (1) wrapping the projection puts the sequential adapter before the
block's dropout (adapter-bert applies it after), which only matters in training mode; the parallel adapter
wraps the sublayer, so on GPT-2 it is added after the sublayer's dropout; (2) Houlsby also trains the
LayerNorms and the task head: pass `modules_to_save=["LayerNorm", "classifier"]` (BERT) for that; (3) a
parallel adapter cannot wrap a module that already carries adapter layers (minipeft does not nest them):
on one model, a sequential adapter on attention and a parallel one on the FFN can live together, but not
both forms on the same sublayer.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import targeting
from ..config import PeftConfig, check_choice, check_positive, check_positive_int, register
from ..layer import AdapterLayer, gather_rows, pick_rows
from ..weights import linear_dims

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU, "identity": nn.Identity}
FORMS = ("sequential", "parallel")
PLACEMENTS = ("attention", "ffn", "both")
INITS = ("houlsby", "lora")


@register
@dataclass
class AdapterConfig(PeftConfig):
    bottleneck: int = 16  # m; Houlsby sweep m ∈ {8, 64, 256} on GLUE, He et al. use m = 512 on the FFN
    activation: str = "gelu"  # f; GELU as in BERT and adapter-bert (Houlsby leaves f open), ReLU in He et al.
    init_std: float = 1e-2  # σ of the truncated-normal weight init of init="houlsby" (the paper's 10^-2)
    form: str = "sequential"  # "sequential": the adapter reads the module's output h (Houlsby); "parallel": its input x
    placement: str = "both"  # default targets: the "attention" or "ffn" sublayers, or "both" (unused with target)
    scale: float = 1.0  # s in h ← h + s·Δ; Houlsby 1, He et al.'s scaled parallel adapter 4
    init: str = "houlsby"  # "houlsby": truncated normal σ=init_std, biases 0; "lora": W_down kaiming, the rest 0

    method = "adapter"

    def validate(self):
        check_positive_int("bottleneck", self.bottleneck)
        check_choice("activation", self.activation, set(ACTIVATIONS))
        check_positive("init_std", self.init_std)
        check_choice("form", self.form, set(FORMS))
        check_choice("placement", self.placement, set(PLACEMENTS))
        check_positive("scale", self.scale)
        check_choice("init", self.init, set(INITS))

    @classmethod
    def scaled_parallel(cls, bottleneck: int = 512, placement: str = "ffn", scale: float = 4.0, **kw):
        """He et al.'s scaled parallel adapter (their recommended point): parallel, FFN, s = 4, ReLU, m = 512,
        LoRA-style init."""
        kw = {"activation": "relu", "init": "lora", **kw}
        return cls(bottleneck=bottleneck, form="parallel", placement=placement, scale=scale, **kw)

    @property
    def base_types(self):
        return None  # linear layers or whole sublayers; BottleneckAdapter raises on a module it cannot read dims of

    def default_target(self, model):
        kind = {"sequential": "sublayer_outputs", "parallel": "sublayers"}[self.form]
        if self.placement != "both":
            kind = f"{self.placement}_{kind}"
        return targeting.default_target(model, kind, self.method)

    @property
    def layer_class(self):
        return BottleneckAdapter


def module_dims(module: nn.Module, path: str = "") -> tuple[int, int]:
    """(d_in, d_out) of a linear layer, or of a sublayer: the input dim of its first linear layer and the
    output dim of its last one (Llama self_attn q_proj…o_proj, mlp gate_proj…down_proj; GPT-2 c_attn…c_proj)."""
    if targeting.is_linear(module):
        return linear_dims(module)
    linears = [m for m in module.modules() if targeting.is_linear(m)]
    if not linears:
        raise ValueError(f"adapter: cannot wrap {type(module).__name__} at {path!r}: target a linear layer or a "
                         f"sublayer that contains linear layers (self_attn, mlp)")
    return linear_dims(linears[0])[0], linear_dims(linears[-1])[1]


class BottleneckAdapter(AdapterLayer):
    adapter_dicts = ("adapter_down", "adapter_up", "act")
    adapter_values = ("scaling", "form")
    can_merge = False  # W_up f(W_down u) is not linear in u

    def __init__(self, base_layer: nn.Module, path: str = ""):
        super().__init__(base_layer, path)
        inner = [n for n, m in base_layer.named_modules() if isinstance(m, AdapterLayer)]
        if inner:
            raise ValueError(f"adapter: {path or type(base_layer).__name__} already contains adapter layers "
                             f"{inner[:3]}; adapters cannot be nested (use another placement or another model)")
        self.in_features, self.out_features = module_dims(base_layer, path)
        params = inspect.signature(base_layer.forward).parameters
        self._arg_names = list(params)
        # BERT-style output modules: forward(hidden_states, input_tensor) → LayerNorm(dense(hidden_states) + input)
        self.residual_arg = "input_tensor" in params
        if self.residual_arg:
            self.in_features = self.out_features  # the parallel adapter reads the residual, of width d
        self.adapter_down, self.adapter_up, self.act = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.form: dict[str, str] = {}

    def add_adapter(self, name: str, config: AdapterConfig) -> None:
        device, dtype = self.base_device_dtype()
        m = config.bottleneck
        d_in = self.in_features if config.form == "parallel" else self.out_features
        self.adapter_down[name] = nn.Linear(d_in, m, device=device, dtype=dtype)  # W_down (m, d_in), b_down (m,)
        self.adapter_up[name] = nn.Linear(m, self.out_features, device=device, dtype=dtype)  # W_up, b_up
        self.act[name] = ACTIVATIONS[config.activation]()
        self.scaling[name] = float(config.scale)
        self.form[name] = config.form
        self.reset_adapter(name, config.init_std, config.init)

    @torch.no_grad()
    def reset_adapter(self, name: str, std: float = 1e-2, init: str = "houlsby") -> None:
        down, up = self.adapter_down[name], self.adapter_up[name]
        if init == "houlsby":
            for lin in (down, up):
                nn.init.trunc_normal_(lin.weight, mean=0.0, std=std, a=-2 * std, b=2 * std)
                nn.init.zeros_(lin.bias)
        else:  # "lora": as LoRA's A (kaiming-uniform, a=√5) and B = 0; He et al. also zero the biases
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            for t in (down.bias, up.weight, up.bias):
                nn.init.zeros_(t)

    def delta(self, name: str, u: torch.Tensor) -> torch.Tensor:
        """s·Δ(u) = s·(W_up f(W_down u + b_down) + b_up) in the adapter's dtype."""
        down, up = self.adapter_down[name], self.adapter_up[name]
        return self.scaling[name] * up(self.act[name](down(u.to(down.weight.dtype))))

    def forward(self, *args, **kwargs):
        name = self.active
        if name is None:
            return self.base_layer(*args, **kwargs)
        if self.form[name] == "parallel":
            if self.residual_arg:  # LayerNorm(dense(a) + x) → LayerNorm(dense(a) + s·Δ(x) + x)
                args, kwargs, x = self._shift_residual(name, args, kwargs)
                return self.base_layer(*args, **kwargs)
            x = args[0] if args else kwargs[self._arg_names[0]]  # the module's input
            return self._add(self.base_layer(*args, **kwargs), self.delta(name, x))
        out = self.base_layer(*args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        return self._add(out, self.delta(name, h))  # h + W_up f(W_down h + b_down) + b_up (times s)

    def mixed_forward(self, *args, **kwargs):
        """A mixed-adapter batch with a single call of the wrapped module (a whole attention sublayer takes a KV
        cache, which the shared path cannot split by row): the residual form shifts each group's rows of the
        residual before the call, the other forms add each group's s·Δ to its rows of the output after it."""
        x = args[0] if args else kwargs[self._arg_names[0]]
        groups = self.row_groups(x.shape[0])
        if len(groups) == 1:  # every row with one adapter (or none)
            return self.forward_as(groups[0][0], *args, **kwargs)
        if self.residual_arg:  # LayerNorm(dense(a) + x + s·Δ(x)), row by row
            args, kwargs = self._routed_residual(groups, args, kwargs)
        out = self.base_layer(*args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out  # (B, T, d)
        parts = []
        for name, rows in groups:
            h_rows = pick_rows(h, rows)
            if name is None or (self.residual_arg and self.form[name] == "parallel"):
                parts.append(h_rows)  # base rows, or rows whose change went in through the residual
            else:
                u = pick_rows(x if self.form[name] == "parallel" else h, rows)  # what Δ reads: input or output
                parts.append(h_rows + self.delta(name, u).to(h.dtype))
        h = gather_rows(parts, groups)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def _routed_residual(self, groups, args, kwargs):
        """args/kwargs with input_tensor x replaced by x + s·Δ(x) on the rows of each parallel adapter."""
        args, kwargs = list(args), dict(kwargs)
        i = self._arg_names.index("input_tensor")
        x = args[i] if len(args) > i else kwargs["input_tensor"]
        parts = [pick_rows(x, rows) + self.delta(name, pick_rows(x, rows)).to(x.dtype)
                 if name is not None and self.form[name] == "parallel" else pick_rows(x, rows)
                 for name, rows in groups]
        shifted = gather_rows(parts, groups)
        if len(args) > i:
            args[i] = shifted
        else:
            kwargs["input_tensor"] = shifted
        return args, kwargs

    @staticmethod
    def _add(out, delta):
        if isinstance(out, tuple):  # attention modules return (output, weights, ...)
            return (out[0] + delta.to(out[0].dtype), *out[1:])
        return out + delta.to(out.dtype)

    def _shift_residual(self, name, args, kwargs):
        args, kwargs = list(args), dict(kwargs)
        i = self._arg_names.index("input_tensor")
        if len(args) > i:
            x = args[i]
            args[i] = x + self.delta(name, x).to(x.dtype)
        else:
            x = kwargs["input_tensor"]
            kwargs["input_tensor"] = x + self.delta(name, x).to(x.dtype)
        return args, kwargs, x


def adapter_macs_per_token(model, adapter_name: str | None = None) -> dict[str, int]:
    """Multiply-adds per token added by adapter `adapter_name` next to those of the base's linear layers.

    {"adapter": Σ m·(d_in + d_out) over wrapped modules (2·m·d when d_in = d_out), "base_linear": Σ d_in·d_out
    over all linear layers, "layers": number of wrapped modules}. A count, not a timing: time it with and without
    `model.disable_adapter()` to see what the extra small matmuls cost on your hardware.
    """
    name = adapter_name or model.active_adapter
    model.check_adapter_name(name)
    layers = [layer for _, layer in model.adapter_layers()
              if isinstance(layer, BottleneckAdapter) and name in layer.adapter_names()]
    extra = sum(layer.adapter_down[name].weight.numel() + layer.adapter_up[name].weight.numel() for layer in layers)
    inside = {id(m) for _, layer in model.adapter_layers() for attr in layer.adapter_dicts
              for m in getattr(layer, attr).modules()}  # adapter tensors and trained copies are not the base
    base = sum(math.prod(linear_dims(m)) for m in model.base_model.modules()
               if targeting.is_linear(m) and id(m) not in inside)
    return {"adapter": extra, "base_linear": base, "layers": len(layers)}


__all__ = ["AdapterConfig", "BottleneckAdapter", "adapter_macs_per_token", "module_dims"]
