"""Checks for the (IA)³ chapter's exercises.

    from minipeft.exercises import check_ia3_layer, check_ia3_merge
    check_ia3_layer(MyIA3Linear)   # MyIA3Linear(base: nn.Linear, feedforward: bool): a trained vector l, init 1;
                                   #   feedforward=False (keys, values): y = l ⊙ (W0 x + b),  l ∈ R^{d_out}
                                   #   feedforward=True (FFN down projection): y = W0 (l ⊙ x) + b,  l ∈ R^{d_in}
    check_ia3_merge(my_merge)      # my_merge(W0, b, l, feedforward) -> (W, b_new): the plain layer that computes it

Shapes follow PyTorch: a weight is (d_out, d_in). The references inside the checks are the plain tensor
formulas above (minipeft's IA3Layer, tested against peft, computes the same). Every call into the learner's
code happens inside a check, so an error comes back as a FAIL line with its hint.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._runner import run_checks

_NAMES = ["l", "ia3_l", "scale", "vector"]


def _shape(t) -> tuple:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _find_vector(layer: nn.Module, n: int) -> torch.Tensor:
    """The learner's vector: an attribute named in _NAMES (a tensor or an nn.Linear's weight), else the only
    trainable parameter with n entries (any shape: (n,), (1, n) and (n, 1) are all a vector), else the only
    trainable parameter."""
    for name in _NAMES:
        t = getattr(layer, name, None)
        if isinstance(t, nn.Linear):
            t = t.weight
        if isinstance(t, torch.Tensor):
            return t
    trainable = [p for p in layer.parameters() if p.requires_grad]
    sized = [p for p in trainable if p.numel() == n]
    if len(sized) == 1:
        return sized[0]
    if len(trainable) == 1:
        return trainable[0]
    raise AssertionError(f"no unique trainable vector with {n} entries found (name it l); the trainable tensors "
                         f"have shapes {[tuple(p.shape) for p in trainable]}")


def check_ia3_layer(cls, d_in: int = 10, d_out: int = 6):
    """Property checks for a learner's (IA)³ wrapper `cls(base_linear, feedforward)`, in both modes: its one
    trainable vector (attribute `l`, `ia3_l`, `scale` or `vector`, or the only trainable parameter of the right
    size, of any shape with that many entries) starts at ones, the base stays frozen, and the forward is
    l ⊙ (W0 x + b) (keys, values) or W0 (l ⊙ x) + b (feedforward) with the learner's vector."""
    x = torch.randn(4, 3, d_in, generator=torch.Generator().manual_seed(5))
    side = {False: f"d_out = {d_out} (the output)", True: f"d_in = {d_in} (the input)"}

    def build(ff: bool, seed: int = 0, sized: bool = True):
        torch.manual_seed(seed)
        base = nn.Linear(d_in, d_out)
        W0, b = base.weight.detach().clone(), base.bias.detach().clone()
        layer = cls(base, ff)
        n = d_in if ff else d_out
        lvec = _find_vector(layer, n)
        assert not sized or lvec.numel() == n, f"feedforward={ff}: the vector has shape {_shape(lvec)}, " \
                                               f"{lvec.numel()} entries; expected {side[ff]}"
        return W0, b, layer, lvec

    def out_of(layer, ff):
        y = layer(x)
        assert isinstance(y, torch.Tensor) and tuple(y.shape) == (4, 3, d_out), \
            f"feedforward={ff}: output shape {_shape(y)} for an input {tuple(x.shape)}; expected {(4, 3, d_out)}"
        return y

    def sizes():
        for ff in (False, True):
            _, _, layer, lvec = build(ff)
            trainable = [p for p in layer.parameters() if p.requires_grad]
            assert len(trainable) == 1 and trainable[0] is lvec, \
                f"feedforward={ff}: {len(trainable)} tensors require grad, of shapes " \
                f"{[tuple(p.shape) for p in trainable]}; only the vector may (freeze the base layer)"

    def init_ones():
        for ff in (False, True):
            W0, b, layer, lvec = build(ff, sized=False)  # a wrong size is the first check's to report
            assert torch.equal(lvec.detach(), torch.ones_like(lvec)), \
                f"feedforward={ff}: the vector does not start at ones (first entries " \
                f"{lvec.detach().flatten()[:3].tolist()})"
            assert torch.allclose(out_of(layer, ff), F.linear(x, W0, b), atol=1e-5), \
                f"feedforward={ff}: at init the output differs from the base layer's"

    def forward():
        for ff in (False, True):
            W0, b, layer, lvec = build(ff, seed=1)
            lv = 1 + 0.5 * torch.randn(lvec.numel(), generator=torch.Generator().manual_seed(2))
            with torch.no_grad():
                lvec.copy_(lv.reshape(lvec.shape))
            want = F.linear(x * lv, W0, b) if ff else F.linear(x, W0, b) * lv
            got = out_of(layer, ff)
            what = "W0 (l ⊙ x) + b: the input is scaled" if ff else "l ⊙ (W0 x + b): the output, bias included"
            assert torch.allclose(got, want, atol=1e-5), f"feedforward={ff}: forward is not {what}"
            # the vector must be in the graph (not read through .data or .detach())
            assert got.requires_grad, f"feedforward={ff}: the output does not depend on the vector through " \
                                      f"autograd (was it detached?): nothing would train"
            got.sum().backward()
            assert lvec.grad is not None and lvec.grad.abs().sum() > 0, \
                f"feedforward={ff}: the vector receives no gradient from the output"

    return run_checks(f"check_ia3_layer({getattr(cls, '__name__', cls)})", [
        ("one trainable vector of the right size", "l has d_out entries for keys/values, d_in for the FFN "
         "down projection; base.requires_grad_(False)", sizes),
        ("starts at ones (the base model)", "nn.Parameter(torch.ones(n)): ones, not zeros — 0 would switch the "
         "layer off", init_ones),
        ("forward matches minipeft's IA3Layer", "feedforward: base(l * x); otherwise l * base(x)", forward),
    ], learner=(cls,))


def check_ia3_merge(fn, d_in: int = 7, d_out: int = 5):
    """Check `fn(W0, b, l, feedforward) -> (W, b_new)`: the plain linear layer F.linear(x, W, b_new) that computes
    l ⊙ (W0 x + b) (feedforward=False) or W0 (l ⊙ x) + b (feedforward=True)."""
    torch.manual_seed(0)
    W0, b = torch.randn(d_out, d_in), torch.randn(d_out)
    x = torch.randn(4, d_in)

    def run(ff):
        """The learner's (W, b_new), shapes checked before anything multiplies them."""
        lvec = 1 + 0.3 * torch.randn(d_in if ff else d_out, generator=torch.Generator().manual_seed(1 + ff))
        out = fn(W0.clone(), b.clone(), lvec.clone(), ff)
        assert isinstance(out, (tuple, list)) and len(out) == 2, \
            f"feedforward={ff}: returned {type(out).__name__}; expected a pair (W, b_new)"
        W, b2 = (torch.as_tensor(t).detach().float() if t is not None else t for t in out)
        assert b2 is not None, f"feedforward={ff}: b_new is None; return the bias too (b itself if unchanged)"
        assert tuple(W.shape) == (d_out, d_in), \
            f"feedforward={ff}: W has shape {tuple(W.shape)}; expected W0's (d_out, d_in) = {(d_out, d_in)}"
        assert tuple(b2.shape) == (d_out,), \
            f"feedforward={ff}: b_new has shape {tuple(b2.shape)}; expected b's (d_out,) = ({d_out},)"
        return lvec, W, b2

    def shapes():
        for ff in (False, True):
            run(ff)

    def output_scaling():
        lvec, W, b2 = run(False)
        assert torch.allclose(x @ W.T, (x @ W0.T) * lvec, atol=1e-5), \
            "W x is not l ⊙ (W0 x): output i is row i of W, so scale the rows (l[:, None] * W0)"
        assert torch.allclose(F.linear(x, W, b2), F.linear(x, W0, b) * lvec, atol=1e-5), \
            "the weight is right but the bias is not: an output scaling scales b too (b_new = l ⊙ b)"

    def input_scaling():
        lvec, W, b2 = run(True)
        assert torch.allclose(x @ W.T, (x * lvec) @ W0.T, atol=1e-5), \
            "W x is not W0 (l ⊙ x): input j meets column j of W, so scale the columns (W0 * l[None, :])"
        assert torch.allclose(F.linear(x, W, b2), F.linear(x * lvec, W0, b), atol=1e-5), \
            "the weight is right but the bias is not: scaling the input leaves b unchanged"

    return run_checks("check_ia3_merge", [
        ("shapes", "return (W, b) with W the shape of W0", shapes),
        ("output scaling: rows and bias", "W = l[:, None] * W0, b_new = l * b", output_scaling),
        ("input scaling: columns, bias unchanged", "W = W0 * l[None, :], b_new = b", input_scaling),
    ], learner=(fn,))
