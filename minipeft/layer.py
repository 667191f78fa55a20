"""AdapterLayer: a frozen base module plus any number of named adapters of one method — the layer contract.

A layer method subclasses AdapterLayer and writes two things:

    add_adapter(name, config)   create the adapter's tensors in the dicts named by `adapter_dicts`
                                (`nn.ModuleDict`/`nn.ParameterDict` keyed by adapter name, like peft's
                                `lora_A["default"]`); trainable tensors are Parameters, frozen ones are
                                buffers (so nothing can unfreeze them: "what trains is structural")
    forward(x, ...)             the base output plus the `active` adapter's change (None: base only)

and, if it can be folded into the base weights, sets `can_merge = True` and writes

    merge_weights(name)         change `base_layer` in place so that it computes what the adapter did.

Everything else is shared here: which adapter is active, disabling, deleting, the adapter's state for
saving, and exact unmerge — `merge` keeps the base layer's state from before the merge and `unmerge` puts
it back bit for bit (no method subtracts a recomputed delta). A layer knows its dotted module `path` in the
model (for per-module options such as AdaLoRA's ranks or LoRA's `rank_pattern`), and attributes it does not
have (`weight`, `bias`, `in_features`, ...) are read from the base layer, as code written for the plain
model expects (T5 reads `self.wo.weight.dtype`).

Mixed-adapter batches (peft's `adapter_names`): while `route_rows(names)` is set, row i of every call goes
through adapter names[i] ("__base__": the bare base module). The shared path, `mixed_forward`, runs the
layer's own single-adapter `forward` once per group of rows and puts the outputs back in row order, so every
layer type routes rows with no code of its own; a layer may override it for speed (LoRALinear calls the base
once for the whole batch and adds each group's change to its rows, as peft does).
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def pick_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` of t; a tensor of one row shared by every row of the batch (BERT's position ids (1, T))
    gives that row once for each of `rows`."""
    return t.index_select(0, rows) if t.shape[0] > 1 else t.expand(len(rows), *t.shape[1:])


def take_rows(value, rows: torch.Tensor, batch: int, where: str = ""):
    """`value` with only the batch rows `rows` (a call's argument split for one group of a mixed batch).

    Tensors of 2 or more dims whose first dim is the batch are split; 1-D tensors (a cache position, which can
    be as long as the batch by chance), other tensors, numbers, strings and None pass unchanged; tuples, lists
    and dicts are split item by item. Anything else (a KV cache object) cannot be split by row: ValueError."""
    if isinstance(value, torch.Tensor):
        return pick_rows(value, rows) if value.ndim >= 2 and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(take_rows(v, rows, batch, where) for v in value)
    if isinstance(value, dict):
        return {k: take_rows(v, rows, batch, where) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return value
    raise ValueError(f"{where}: cannot split an argument of type {type(value).__name__} by row for a "
                     f"mixed-adapter batch; this layer needs its own mixed_forward")


def gather_rows(parts: list, groups: list[tuple[str | None, torch.Tensor]]):
    """The groups' outputs (parts[g] holds the rows groups[g][1], in that order) put back in batch order.
    Tensors are concatenated and reordered; tuples item by item (attention modules return tuples); None stays."""
    first = parts[0]
    if first is None:
        return None
    if isinstance(first, tuple):
        return tuple(gather_rows([p[i] for p in parts], groups) for i in range(len(first)))
    if not isinstance(first, torch.Tensor):
        raise ValueError(f"cannot put outputs of type {type(first).__name__} back in row order")
    if len(parts) == 1:
        return first
    order = torch.cat([rows for _, rows in groups])  # batch row of each concatenated row
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)  # where each batch row sits in the concat
    return torch.cat(parts).index_select(0, inverse)


class AdapterLayer(nn.Module):
    adapter_dicts: tuple[str, ...] = ()  # attributes holding per-adapter tensors, keyed by adapter name
    adapter_values: tuple[str, ...] = ()  # plain dicts of per-adapter numbers (e.g. "scaling")
    can_merge: bool = False

    def __init__(self, base_layer: nn.Module, path: str = ""):
        super().__init__()
        self.base_layer = base_layer
        self.path = path  # dotted name of this module in the wrapped model ("model.layers.0.self_attn.q_proj")
        self.active_adapter: str | None = None
        self.merged_adapters: list[str] = []
        self.disabled = False
        self._unmerged_state: dict[str, torch.Tensor] | None = None  # the base layer's state while merged
        self.row_adapters: tuple[str, ...] | None = None  # a mixed-adapter call's adapter per row (route_rows)
        self.row_repeats = False  # may a call's batch be k × len(row_adapters)? (generate's beams / samples)
        self._row_groups: dict[int, list] = {}  # row groups by batch size, for the routing in place
        for p in base_layer.parameters():
            p.requires_grad_(False)

    # anything not found on the layer (weight, bias, in_features, ...) comes from the base layer
    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    # ---- per method ------------------------------------------------------------------------------
    def add_adapter(self, name: str, config) -> None:
        raise NotImplementedError

    def merge_weights(self, name: str) -> None:
        """Fold adapter `name` into `base_layer` in place (mergeable methods override this)."""
        raise ValueError(f"{type(self).__name__} cannot be merged into the base weights")

    # ---- shared ----------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, name: str) -> None:
        if not self.can_merge:
            raise ValueError(f"{type(self).__name__} cannot be merged into the base weights")
        if self._unmerged_state is None:  # keep the exact base (4-bit codes included) for unmerge
            self._unmerged_state = {k: v.clone() for k, v in self.base_layer.state_dict().items()}
        self.merge_weights(name)
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put the base layer's weights back exactly as they were before the first merge."""
        if self._unmerged_state is not None:
            self.base_layer.load_state_dict(self._unmerged_state)
        self._unmerged_state, self.merged_adapters = None, []

    def base_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        """Where new adapter tensors go: the base's device, in float32 unless the base is float64 (as peft:
        adapters on an fp16/bf16 base stay fp32 for stable training). Buffers count too (a 4-bit layer
        without bias keeps its weight only in integer buffers)."""
        tensors = [*self.base_layer.parameters(), *self.base_layer.buffers()]
        device = tensors[0].device if tensors else torch.device("cpu")
        floats = [t.dtype for t in tensors if t.is_floating_point()]
        return device, (torch.float64 if floats and floats[0] == torch.float64 else torch.float32)

    @property
    def active(self) -> str | None:
        """The adapter the forward pass must add, or None (disabled, merged, or not on this layer)."""
        name = self.active_adapter
        if self.disabled or name is None or self.merged_adapters or name not in self.adapter_names():
            return None
        return name

    # ---- mixed-adapter batches ---------------------------------------------------------------------
    def route_rows(self, names: list[str] | None, repeats: bool = False) -> None:
        """From now on, row i of each call goes through adapter names[i] (None: back to the active adapter).
        repeats=True (generation): a batch of k·n rows for n names is n prompts each repeated k times in place
        (how `generate` expands a batch for beams or several samples), row j going with names[j // k]."""
        self.row_adapters = None if names is None else tuple(names)
        self.row_repeats = repeats
        self._row_groups = {}

    def row_groups(self, batch: int) -> list[tuple[str | None, torch.Tensor]]:
        """[(adapter, row indices)] for a call of `batch` rows: the rows of each adapter of the routing, in
        order of first appearance; adapter None for rows this layer leaves to its base module ("__base__", or
        an adapter that does not touch this layer). A call of one row while the routing has n > 1 is an input
        shared by every row (position ids broadcast over the batch): its output gets one row per routed row."""
        if batch not in self._row_groups:
            names, n = self.row_adapters, len(self.row_adapters)
            if batch not in (1, n) and not (self.row_repeats and batch % n == 0):
                raise ValueError(f"{self.path or type(self).__name__}: a call with {batch} rows, but adapter_names "
                                 f"has {n} names (one per row)")
            own, groups, out_rows = set(self.adapter_names()), {}, max(batch, n)
            for row in range(out_rows):
                name = names[row * n // out_rows]  # out_rows = k·n: row j is a copy of prompt j // k
                groups.setdefault(name if name in own else None, []).append(row)
            device = self.base_device_dtype()[0]
            self._row_groups[batch] = [(name, torch.tensor(rows, device=device)) for name, rows in groups.items()]
        return self._row_groups[batch]

    def __call__(self, *args, **kwargs):
        """nn.Module's call; during a mixed-adapter call (route_rows set), `mixed_forward` instead."""
        if self.row_adapters is None:
            return super().__call__(*args, **kwargs)
        return self.mixed_forward(*args, **kwargs)

    def forward_as(self, name: str | None, *args, **kwargs):
        """`forward` with adapter `name` active; None: the base module alone."""
        if name is None:
            return self.base_layer(*args, **kwargs)
        active, self.active_adapter = self.active_adapter, name
        try:
            return self.forward(*args, **kwargs)
        finally:
            self.active_adapter = active

    def mixed_forward(self, *args, **kwargs):
        """Each row with its own adapter: every group's rows (with the batch rows of the other tensor arguments)
        go through `forward_as(adapter)`, and the outputs are put back in row order. Rows do not meet inside a
        layer, so this equals running each row with its adapter alone."""
        tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
        if not tensors:
            raise ValueError(f"{self.path}: a mixed-adapter call needs a tensor input to read the batch size from")
        batch = tensors[0].shape[0]  # the layer's input (x, ids or hidden states) comes first
        groups = self.row_groups(batch)
        if len(groups) == 1:
            return self.forward_as(groups[0][0], *args, **kwargs)
        where = self.path or type(self).__name__
        parts = [self.forward_as(name, *take_rows(args, rows, batch, where), **take_rows(kwargs, rows, batch, where))
                 for name, rows in groups]
        return gather_rows(parts, groups)

    def adapter_names(self) -> list[str]:
        return list(getattr(self, self.adapter_dicts[0]).keys()) if self.adapter_dicts else []

    def adapter_modules(self, name: str) -> dict[str, nn.Module | nn.Parameter]:
        return {attr: getattr(self, attr)[name] for attr in self.adapter_dicts if name in getattr(self, attr)}

    def adapter_parameters(self, name: str):
        """The adapter's trainable tensors (Parameters); its frozen tensors are buffers."""
        for obj in self.adapter_modules(name).values():
            yield from ([obj] if isinstance(obj, nn.Parameter) else obj.parameters())

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors (buffers included) with the adapter name left out ("lora_A.weight")."""
        out = {}
        for attr, obj in self.adapter_modules(name).items():
            if isinstance(obj, nn.Parameter):
                out[attr] = obj.detach()
            else:
                out.update({f"{attr}.{k}": v.detach() for k, v in obj.state_dict().items()})
        return out

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged; unmerge it before deleting")
        for attr in self.adapter_dicts:
            if name in getattr(self, attr):  # ModuleDict.pop takes no default
                del getattr(self, attr)[name]
        for attr in self.adapter_values:
            getattr(self, attr).pop(name, None)
        if self.active_adapter == name:
            self.active_adapter = None

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names()}, active={self.active_adapter!r}, merged={self.merged_adapters}"


class ModulesToSave(AdapterLayer):
    """A base module trained in full for each adapter (e.g. a new classifier head): one copy per adapter.
    Attribute reads (`weight`, ...) go to the copy in use, as with peft's ModulesToSaveWrapper."""

    adapter_dicts = ("copies",)
    can_merge = True

    def __init__(self, base_layer: nn.Module, path: str = ""):
        super().__init__(base_layer, path)
        self.copies = nn.ModuleDict()

    def __getattr__(self, name):
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            if name in ("base_layer", "copies"):
                raise
            return getattr(self.module_in_use, name)

    @property
    def module_in_use(self) -> nn.Module:
        name = self.active
        return self.copies[name] if name else self.base_layer

    def add_adapter(self, name: str, config=None) -> None:
        self.copies[name] = copy.deepcopy(self.base_layer).requires_grad_(True)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """The copy's own keys ("weight", "bias"): saved as "classifier.weight", as peft does."""
        if name not in self.copies:
            return {}
        return {k: v.detach() for k, v in self.copies[name].state_dict().items()}

    def forward(self, *args, **kwargs):
        return self.module_in_use(*args, **kwargs)

    def merge_weights(self, name: str) -> None:
        self.base_layer.load_state_dict(self.copies[name].state_dict())
