"""Checks for the (IA)³ chapter's exercises.

    from minipeft.exercises import check_ia3_layer, check_ia3_merge
    check_ia3_layer(MyIA3Linear)   # MyIA3Linear(base: nn.Linear, feedforward: bool): a trained vector l, init 1;
                                   #   feedforward=False (keys, values): y = l ⊙ (W0 x + b),  l ∈ R^{d_out}
                                   #   feedforward=True (FFN down projection): y = W0 (l ⊙ x) + b,  l ∈ R^{d_in}
    check_ia3_merge(my_merge)      # my_merge(W0, b, l, feedforward) -> (W, b_new): the plain layer that computes it

Shapes follow PyTorch: a weight is (d_out, d_in). The references inside the checks are minipeft's IA3Layer
(itself tested against peft) and plain tensor formulas.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._runner import find_param, run_checks

_NAMES = ["l", "ia3_l", "scale", "vector"]


def check_ia3_layer(cls, d_in: int = 10, d_out: int = 6):
    """Property checks for a learner's (IA)³ wrapper `cls(base_linear, feedforward)`, in both modes: its one
    trainable vector (attribute `l`, `ia3_l`, `scale` or `vector`, or the only trainable parameter of the right
    size) starts at ones, the base stays frozen, and the forward equals minipeft's IA3Layer with the same vector."""
    from ..additive.ia3 import IA3Config, IA3Layer

    def build(ff: bool, seed: int = 0):
        torch.manual_seed(seed)
        base = nn.Linear(d_in, d_out)
        layer = cls(base, ff)
        lvec = find_param(layer, _NAMES, (d_in,) if ff else (d_out,))
        return base, layer, lvec

    x = torch.randn(4, 3, d_in, generator=torch.Generator().manual_seed(5))

    def sizes():
        for ff, n, side in ((False, d_out, "d_out (the output)"), (True, d_in, "d_in (the input)")):
            _, layer, lvec = build(ff)
            assert lvec.numel() == n, f"feedforward={ff}: the vector has {lvec.numel()} entries, expected {side}"
            trainable = [p for p in layer.parameters() if p.requires_grad]
            assert len(trainable) == 1 and trainable[0] is lvec, \
                f"feedforward={ff}: exactly one tensor, the vector, must require grad (freeze the base layer)"

    def init_ones():
        for ff in (False, True):
            base, layer, lvec = build(ff)
            assert torch.equal(lvec.detach(), torch.ones_like(lvec)), \
                f"feedforward={ff}: the vector does not start at ones (first entries {lvec.detach()[:3].tolist()})"
            assert torch.allclose(layer(x), base(x), atol=1e-6), f"feedforward={ff}: at init the output differs " \
                                                                  f"from the base layer's"

    def forward():
        for ff in (False, True):
            base, layer, lvec = build(ff, seed=1)
            with torch.no_grad():
                lvec.copy_(1 + 0.5 * torch.randn(lvec.shape, generator=torch.Generator().manual_seed(2)))
            ref = IA3Layer(base, "fc")
            ref.add_adapter("x", IA3Config(feedforward=["fc"] if ff else []))
            ref.active_adapter = "x"
            with torch.no_grad():
                ref.ia3_l["x"].copy_(lvec.detach().reshape(-1))
            what = "W0 (l ⊙ x) + b: the input is scaled" if ff else "l ⊙ (W0 x + b): the output, bias included"
            assert torch.allclose(layer(x), ref(x), atol=1e-5), f"feedforward={ff}: forward is not {what}"

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
        lvec = 1 + 0.3 * torch.randn(d_in if ff else d_out, generator=torch.Generator().manual_seed(1 + ff))
        W, b2 = fn(W0.clone(), b.clone(), lvec.clone(), ff)
        return lvec, W, b2

    def shapes():
        for ff in (False, True):
            _, W, b2 = run(ff)
            assert tuple(W.shape) == (d_out, d_in) and tuple(b2.shape) == (d_out,), \
                f"feedforward={ff}: got W {tuple(W.shape)}, b {tuple(b2.shape)}; expected {(d_out, d_in)}, ({d_out},)"

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
