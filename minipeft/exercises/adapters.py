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
    layer = cls(d, m)
    down = lambda: _linear(layer, ["down", "adapter_down"], (m, d))  # noqa: E731
    up = lambda: _linear(layer, ["up", "adapter_up"], (d, m))  # noqa: E731

    def count():
        n = sum(p.numel() for p in layer.parameters() if p.requires_grad)
        want = 2 * m * d + d + m
        assert n == want, f"{n} trainable parameters, expected 2md + d + m = {want}"

    def near_identity():
        out = layer(h)
        assert out.shape == h.shape, f"output shape {tuple(out.shape)} != input shape {tuple(h.shape)}"
        rel = ((out - h).norm() / h.norm()).item()
        assert 0 < rel < 1e-2, (f"at init ‖adapter(h) − h‖/‖h‖ = {rel:.2e}; expected small but not zero "
                                f"(weights ~ N(0, 0.01²) truncated at ±2σ, biases zero)")

    def residual():
        with torch.no_grad():
            W, b = up()
            W.zero_()
            if b is not None:
                b.zero_()
        assert torch.equal(layer(h), h), "with W_up = 0 and b_up = 0 the output must be exactly h (the skip)"

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
        assert torch.allclose(layer(h), ref(h), atol=1e-5), \
            "forward is not h + W_up·GELU(W_down·h + b_down) + b_up (same weights as minipeft's adapter)"

    return run_checks(f"check_bottleneck_adapter({getattr(cls, '__name__', cls)})", [
        ("parameter count 2md + d + m", "down = nn.Linear(d, m), up = nn.Linear(m, d), both with bias", count),
        ("near identity at init", "trunc_normal_(w, std=1e-2, a=-2e-2, b=2e-2) on both weights, zeros on biases",
         near_identity),
        ("residual connection", "return h + up(act(down(h))), not up(act(down(h)))", residual),
        ("forward = h + W_up f(W_down h + b_down) + b_up", "use nn.GELU() between the projections", forward),
    ])


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
        ("matches a wrapped BERT", "two adapters per block, each 2md + d + m", check),
        ("other sizes", "the formula must hold for any d, m and number of layers", other_sizes),
    ])
