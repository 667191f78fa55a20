"""Checks for the Adapters chapter's exercises.

    from minipeft.exercises import check_bottleneck_adapter, check_adapter_count
    check_bottleneck_adapter(MyAdapter)   # MyAdapter(d, m): forward(h) = h + W_up·GELU(W_down·h + b_down) + b_up
    check_adapter_count(my_count)         # my_count(d, m, n_layers) -> trainable parameters of Houlsby adapters
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from ._runner import run_checks


def _linear(module, names, shape):
    """The (weight, bias) pair of the learner's down or up projection, found by name, else by weight shape."""
    for n in names:
        obj = getattr(module, n, None)
        if isinstance(obj, nn.Linear) and tuple(obj.weight.shape) == shape:
            return obj.weight, obj.bias
    for _, sub in module.named_modules():
        if isinstance(sub, nn.Linear) and tuple(sub.weight.shape) == shape:
            return sub.weight, sub.bias
    raise AssertionError(f"no nn.Linear with weight of shape {shape} found (name it {names[0]})")


def check_bottleneck_adapter(cls, d: int = 24, m: int = 6):
    """Property checks for a learner's bottleneck adapter `cls(d, m)` acting on hidden states h (..., d).

    It must hold two nn.Linear layers, down (d → m) and up (m → d), both with biases, use GELU, and add
    the result to its input. Compared with minipeft's BottleneckAdapter given the same weights.
    """
    from ..additive.adapter import AdapterConfig, BottleneckAdapter

    torch.manual_seed(0)
    h = torch.randn(3, 5, d)
    made = {}

    def layer(fresh=False):  # the learner's module, built inside a check (an error there is a FAIL, not a traceback)
        if fresh or "layer" not in made:
            torch.manual_seed(0)
            made["layer"] = cls(d, m)
        return made["layer"]

    down = lambda: _linear(layer(), ["down", "adapter_down"], (m, d))  # noqa: E731
    up = lambda: _linear(layer(), ["up", "adapter_up"], (d, m))  # noqa: E731

    def count():
        n = sum(p.numel() for p in layer().parameters() if p.requires_grad)
        want = 2 * m * d + d + m
        assert n == want, f"{n} trainable parameters, expected 2md + d + m = {want}"

    def near_identity():
        out = layer()(h)
        assert out.shape == h.shape, f"output shape {tuple(out.shape)} != input shape {tuple(h.shape)}"
        rel = ((out - h).norm() / h.norm()).item()
        assert rel < 1e-2, (f"at init ‖adapter(h) − h‖/‖h‖ = {rel:.2e}; expected near 0 (small weights, e.g. "
                            f"N(0, 0.01²); or W_up = 0 for exactly the identity)")

    def trains():  # from the init, one gradient step must be able to move the output
        lay = layer(fresh=True)
        lay.zero_grad()
        ((lay(h) - h - 1.0) ** 2).mean().backward()
        grads = [p.grad for p in lay.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), \
            "no parameter gets a gradient at init: with W_down and W_up both zero the adapter can never train " \
            "(keep at least the down projection random)"
        Wu, _ = _linear(lay, ["up", "adapter_up"], (d, m))
        assert Wu.grad is not None and Wu.grad.abs().sum() > 0, \
            "W_up gets no gradient at init: the bottleneck's activations are all zero (W_down = 0?)"

    def residual():
        with torch.no_grad():
            W, b = up()
            W.zero_()
            if b is not None:
                b.zero_()
        assert torch.equal(layer()(h), h), "with W_up = 0 and b_up = 0 the output must be exactly h (the skip)"

    def forward():
        torch.manual_seed(1)
        (Wd, bd), (Wu, bu) = down(), up()
        assert bd is not None and bu is not None, "both projections need a bias (b_down, b_up)"
        base = nn.Linear(d, d)
        with torch.no_grad():
            base.weight.copy_(torch.eye(d))
            base.bias.zero_()
        ref = BottleneckAdapter(base)  # the base output is h itself
        ref.add_adapter("x", AdapterConfig(bottleneck=m, activation="gelu"))
        ref.active_adapter = "x"
        with torch.no_grad():
            for p, q in [(Wd, ref.adapter_down["x"].weight), (bd, ref.adapter_down["x"].bias),
                         (Wu, ref.adapter_up["x"].weight), (bu, ref.adapter_up["x"].bias)]:
                p.normal_(0, 0.5)
                q.copy_(p)
        assert torch.allclose(layer()(h), ref(h), atol=1e-5), \
            "forward is not h + W_up·GELU(W_down·h + b_down) + b_up (same weights as minipeft's adapter)"

    return run_checks(f"check_bottleneck_adapter({getattr(cls, '__name__', cls)})", [
        ("parameter count 2md + d + m", "down = nn.Linear(d, m), up = nn.Linear(m, d), both with bias", count),
        ("near identity at init", "start with small weights (the paper: std 1e-2) and zero biases, so that the "
                                  "adapter's output is close to h", near_identity),
        ("trainable from the init", "not both projections zero: the down projection must be random", trains),
        ("residual connection", "the adapter adds its output to its input h (the skip connection)", residual),
        ("forward = h + W_up f(W_down h + b_down) + b_up", "the nonlinearity between the projections is GELU",
         forward),
    ], learner=(cls,))


def check_adapter_count(fn, hidden: int = 40, layers: int = 3, m: int = 8):
    """Check `fn(d, m, n_layers) -> int`, the trainable parameters of Houlsby adapters (two per block)
    against the count minipeft reports for a small BERT wrapped with AdapterConfig(bottleneck=m)."""
    import minipeft as mp

    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=2 * hidden, max_position_embeddings=32, num_labels=2))
    want = mp.wrap(base, mp.AdapterConfig(bottleneck=m)).trainable_summary()["trainable"]

    def check():
        got = fn(hidden, m, layers)
        assert int(got) == want, (f"fn({hidden}, {m}, {layers}) = {got}, but minipeft's wrapped BERT has {want} "
                                  f"trainable adapter parameters")

    def other_sizes():
        for d2, m2, n2 in [(16, 2, 1), (64, 32, 5)]:
            torch.manual_seed(0)
            b2 = BertForSequenceClassification(BertConfig(
                vocab_size=50, hidden_size=d2, num_hidden_layers=n2, num_attention_heads=4,
                intermediate_size=2 * d2, max_position_embeddings=32, num_labels=2))
            ref = mp.wrap(b2, mp.AdapterConfig(bottleneck=m2)).trainable_summary()["trainable"]
            assert int(fn(d2, m2, n2)) == ref, f"fn({d2}, {m2}, {n2}) = {fn(d2, m2, n2)}, expected {ref}"

    return run_checks("check_adapter_count", [
        ("matches a wrapped BERT", "Houlsby puts two adapters in every block; count weights and biases of both "
                                   "projections", check),
        ("other sizes", "the formula must hold for any d, m and number of layers", other_sizes),
    ], learner=(fn,))
