"""The (IA)³ chapter's checks pass for two different correct solutions and fail for typical mistakes."""
import torch
import torch.nn.functional as F
from torch import nn

from minipeft.exercises import check_ia3_layer, check_ia3_merge


class IA3Linear(nn.Module):
    """A first correct solution: wraps the base layer and calls it."""

    def __init__(self, base, feedforward, init=1.0, ff_on_output=False):
        super().__init__()
        self.base, self.feedforward, self.ff_on_output = base.requires_grad_(False), feedforward, ff_on_output
        n = base.in_features if feedforward and not ff_on_output else base.out_features
        self.l = nn.Parameter(torch.full((n,), init))

    def forward(self, x):
        if self.feedforward and not self.ff_on_output:
            return self.base(x * self.l)
        return self.base(x) * self.l


class FunctionalIA3(nn.Module):
    """A second correct solution: keeps W0 and b as buffers and writes the matmul itself."""

    def __init__(self, base, feedforward):
        super().__init__()
        self.register_buffer("W0", base.weight.detach().clone())
        self.register_buffer("b", base.bias.detach().clone())
        self.feedforward = feedforward
        self.scale = nn.Parameter(torch.ones(self.W0.shape[1] if feedforward else self.W0.shape[0]))

    def forward(self, x):
        if self.feedforward:
            return (x * self.scale) @ self.W0.T + self.b
        return (x @ self.W0.T + self.b) * self.scale


def test_correct_layers_pass():
    assert check_ia3_layer(IA3Linear)
    assert check_ia3_layer(FunctionalIA3)


def test_broken_layers_fail():
    # the FFN down projection scaled on its output instead of its input
    report = check_ia3_layer(lambda base, ff: IA3Linear(base, ff, ff_on_output=True))
    assert not report and dict(report)["one trainable vector of the right size"] is False
    # init zeros: the layer starts switched off
    report = check_ia3_layer(lambda base, ff: IA3Linear(base, ff, init=0.0))
    assert not report and dict(report)["starts at ones (the base model)"] is False

    class BiasNotScaled(IA3Linear):  # scales W0 x but adds the bias afterwards
        def forward(self, x):
            if self.feedforward:
                return self.base(x * self.l)
            return F.linear(x, self.base.weight) * self.l + self.base.bias
    report = check_ia3_layer(BiasNotScaled)
    assert not report and dict(report)["forward matches minipeft's IA3Layer"] is False

    class BaseTrains(IA3Linear):  # forgot to freeze the base layer
        def __init__(self, base, ff):
            super().__init__(base, ff)
            base.requires_grad_(True)
    assert not check_ia3_layer(BaseTrains)


def merge_rows_cols(W0, b, l, feedforward):
    return (W0 * l[None, :], b) if feedforward else (l[:, None] * W0, l * b)


def merge_with_diag(W0, b, l, feedforward):
    return (W0 @ torch.diag(l), b.clone()) if feedforward else (torch.diag(l) @ W0, torch.diag(l) @ b)


def test_correct_merges_pass():
    assert check_ia3_merge(merge_rows_cols)
    assert check_ia3_merge(merge_with_diag)


def test_broken_merges_fail():
    # output scaling that forgets the bias
    report = check_ia3_merge(lambda W0, b, l, ff: (W0 * l[None, :], b) if ff else (l[:, None] * W0, b))
    assert not report and dict(report)["output scaling: rows and bias"] is False
    assert dict(report)["input scaling: columns, bias unchanged"] is True
    # input scaling that also scales the bias (a size mismatch, or wrong values) — l has d_in entries
    report = check_ia3_merge(lambda W0, b, l, ff: (W0 * l[None, :], b * l[: b.numel()]) if ff
                             else (l[:, None] * W0, l * b))
    assert not report and dict(report)["input scaling: columns, bias unchanged"] is False
    # the wrong axis: rows for the feedforward layer (needs d_in = d_out to even run: the shapes check says so)
    report = check_ia3_merge(lambda W0, b, l, ff: (l[:, None] * W0, b) if ff else (l[:, None] * W0, l * b),
                             d_in=5, d_out=5)
    assert not report and dict(report)["input scaling: columns, bias unchanged"] is False
