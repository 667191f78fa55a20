r"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko, Blankevoort & Asano, ICLR 2024, arXiv:2310.11454).

LoRA's update with both factors frozen, random, and shared by every adapted layer; each layer trains only two
scaling vectors (the paper's update, in PyTorch layout):

    y = W0 x + Λ_b B Λ_d A x,     A ∈ R^{r×d_in}, B ∈ R^{d_out×r} frozen and shared,
                                  Λ_b = diag(b), b ∈ R^{d_out};  Λ_d = diag(d), d ∈ R^r   trained per layer

Code names (peft's): A = `vera_A`, B = `vera_B` (buffers of one model-level module, `PeftModel.shared[name]`,
created once by `VeRAConfig.make_shared` and handed to every layer), b = `vera_lambda_b[name]`,
d = `vera_lambda_d[name]`. There is no α/r scale: b and d set the size of the update.

Shapes: layers differ (q_proj 128→128, up_proj 128→352, ...), so the shared A is (r, max d_in) and B is
(max d_out, r) over the adapted layers, and each layer slices what it needs: A[:, :d_in], B[:d_out, :], as peft.
Init: A and B kaiming-uniform (bound √(6 / fan_in), fan_in = a row's length) from a generator seeded with
`projection_prng_key`, A drawn first (as peft, so the same key gives peft's tensors); b = 0 (the model starts
at the base) and d = `d_initial` = 0.1 (peft's default).
Merge: W = W0 + (b ⊙ B)(d ⊙ A) = W0 + Λ_b B Λ_d A. Trainable parameters per layer: d_out + r.
Saving: the shared A, B are saved once per model (keys "shared.vera_A", "shared.vera_B"); with
`save_projection=False` they are left out of the file and rebuilt from the seed on loading (smaller files;
exact only with the same PyTorch random generator, as peft warns).

Differences from the paper: none in the forward pass. The paper also studies other inits of d; we keep
peft's. With dropout > 0 it applies to the branch's input x only (peft's `vera_dropout`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import targeting
from ..config import PeftConfig, check_positive_int, check_probability, register
from ..layer import AdapterLayer
from ..weights import base_weight, linear_dims, set_base_weight


@register
@dataclass
class VeRAConfig(PeftConfig):
    r: int = 256  # rank of the shared A, B; cheap (it adds r per layer), so larger than LoRA's (peft: 256)
    projection_prng_key: int = 0  # seed of the shared random A and B (peft's name and default)
    save_projection: bool = True  # save A and B with the adapter (else rebuilt from the seed on loading)
    dropout: float = 0.0  # dropout on the branch's input (peft's vera_dropout)
    d_initial: float = 0.1  # initial value of every entry of d (peft's default); b starts at 0

    method = "vera"

    def validate(self):
        check_positive_int("r", self.r)
        if isinstance(self.projection_prng_key, bool) or not isinstance(self.projection_prng_key, int):
            raise ValueError(f"projection_prng_key must be an integer seed, got {self.projection_prng_key!r}")
        if not isinstance(self.save_projection, bool):
            raise ValueError(f"save_projection must be True or False, got {self.save_projection!r}")
        check_probability("dropout", self.dropout)
        if isinstance(self.d_initial, bool) or not isinstance(self.d_initial, (int, float)) \
                or not math.isfinite(self.d_initial):
            raise ValueError(f"d_initial must be a finite number, got {self.d_initial!r}")

    @property
    def base_types(self):
        return targeting.LINEAR_TYPES

    def default_target(self, model):
        return targeting.default_target(model, "attention_qv", self.method)

    @property
    def layer_class(self):
        return VeRALinear

    def make_shared(self, model) -> "VeRAShared":
        """The shared A (r, max d_in) and B (max d_out, r) over the layers this config will adapt."""
        target = self.target if self.target is not None else self.default_target(model)
        inside = targeting.find_modules_to_save(model, self.modules_to_save)
        paths = targeting.find_targets(model, target, method=self.method, allowed=self.base_types,
                                       exclude=self.exclude, inside=inside)
        dims = [linear_dims(targeting.unwrap(model.get_submodule(p))) for p in paths]
        d_in, d_out = max(d for d, _ in dims), max(d for _, d in dims)
        tensors = [*model.parameters(), *model.buffers()]
        device = tensors[0].device if tensors else torch.device("cpu")
        return VeRAShared(self.r, d_in, d_out, self.projection_prng_key, self.save_projection).to(device)


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-√(6/fan_in), √(6/fan_in)) with fan_in = shape[1] (a row's length): kaiming-uniform for ReLU gain."""
    bound = math.sqrt(6.0 / shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRAShared(nn.Module):
    """The frozen random pair one VeRA adapter shares across all its layers (buffers: they never train)."""

    def __init__(self, r: int, d_in: int, d_out: int, seed: int, persistent: bool = True):
        super().__init__()
        g = torch.Generator(device="cpu").manual_seed(seed)  # on the CPU: the same numbers on every device
        self.register_buffer("vera_A", kaiming_uniform((r, d_in), g), persistent=persistent)  # (r, max d_in)
        self.register_buffer("vera_B", kaiming_uniform((d_out, r), g), persistent=persistent)  # (max d_out, r)


class VeRALinear(AdapterLayer):
    adapter_dicts = ("vera_lambda_b", "vera_lambda_d", "vera_dropout")
    adapter_values = ("shared_basis",)  # the adapter's VeRAShared module (a reference, not a submodule)
    can_merge = True

    def __init__(self, base_layer: nn.Module, path: str = ""):
        super().__init__(base_layer, path)
        self.in_features, self.out_features = linear_dims(base_layer)
        self.vera_lambda_b, self.vera_lambda_d = nn.ParameterDict(), nn.ParameterDict()
        self.vera_dropout = nn.ModuleDict()
        self.shared_basis: dict[str, VeRAShared] = {}  # a plain dict: A, B stay out of this layer's state

    def add_adapter(self, name: str, config: VeRAConfig, shared: VeRAShared | None = None) -> None:
        if shared is None:
            raise ValueError("VeRALinear needs the model's shared A, B (PeftModel passes config.make_shared(model))")
        r, max_in = shared.vera_A.shape
        if max_in < self.in_features or shared.vera_B.shape[0] < self.out_features:
            raise ValueError(f"{self.path}: the shared A, B ({tuple(shared.vera_A.shape)}, "
                             f"{tuple(shared.vera_B.shape)}) are smaller than this layer "
                             f"({self.out_features}×{self.in_features})")
        device, dtype = self.base_device_dtype()
        self.vera_lambda_b[name] = nn.Parameter(torch.zeros(self.out_features, device=device, dtype=dtype))
        self.vera_lambda_d[name] = nn.Parameter(torch.full((r,), float(config.d_initial), device=device,
                                                           dtype=dtype))
        self.vera_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.shared_basis[name] = shared

    def sliced(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's A (r, d_in) and B (d_out, r): the top-left corners of the shared matrices."""
        shared, dtype = self.shared_basis[name], self.vera_lambda_d[name].dtype
        return shared.vera_A[:, :self.in_features].to(dtype), shared.vera_B[:self.out_features, :].to(dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = Λ_b B Λ_d A = (b ⊙ B)(d ⊙ A), shape (d_out, d_in)."""
        A, B = self.sliced(name)
        b, d = self.vera_lambda_b[name], self.vera_lambda_d[name]
        return (b[:, None] * B) @ (d[:, None] * A)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        name = self.active
        if name is None:
            return y
        A, B = self.sliced(name)
        b, d = self.vera_lambda_b[name], self.vera_lambda_d[name]
        h = F.linear(self.vera_dropout[name](x.to(b.dtype)), A)  # (..., r)  A x
        return y + (b * F.linear(d * h, B)).to(y.dtype)  # (..., d_out)  b ⊙ B (d ⊙ A x)

    def merge_weights(self, name: str) -> None:
        W0 = base_weight(self.base_layer).float()
        set_base_weight(self.base_layer, W0 + self.delta_weight(name).float())


__all__ = ["VeRAConfig", "VeRALinear", "VeRAShared", "kaiming_uniform"]
