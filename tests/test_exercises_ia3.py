"""The (IA)³ chapter's checks pass for different correct solutions and fail, on the right line, for typical
mistakes; a solution that raises gives FAIL lines, never a traceback."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minipeft.exercises import check_ia3_layer, check_ia3_merge


def failing(report):
    return [i for i, (_, ok) in enumerate(report) if not ok]


# -- exercise 1: the (IA)³ layer ------------------------------------------------------------------------
class IA3Linear(nn.Module):
    """A first correct solution: wraps the base layer and calls it; l of shape (n,)."""

    def __init__(self, base, feedforward, init="ones", ff_on_output=False):
        super().__init__()
        self.base, self.feedforward, self.ff_on_output = base.requires_grad_(False), feedforward, ff_on_output
        n = base.in_features if feedforward and not ff_on_output else base.out_features
        self.l = nn.Parameter(torch.ones(n) if init == "ones" else torch.zeros(n) if init == "zeros"
                              else torch.randn(n))

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


class PeftShapedIA3(nn.Module):
    """A third correct solution, with peft's shapes: the vector is (1, d_in) or (d_out, 1), under a name the
    check does not know; einsum for the input scaling, the diagonal of the output scaling folded in."""

    def __init__(self, base, feedforward):
        super().__init__()
        self.base, self.ff = base, feedforward
        for p in base.parameters():
            p.requires_grad = False
        shape = (1, base.in_features) if feedforward else (base.out_features, 1)
        self.ia3_weight = nn.Parameter(torch.ones(shape))

    def forward(self, x):
        if self.ff:
            return torch.einsum("...i,oi->...o", x * self.ia3_weight[0], self.base.weight) + self.base.bias
        return self.base(x) * self.ia3_weight.flatten()


@pytest.mark.parametrize("cls", [IA3Linear, FunctionalIA3, PeftShapedIA3])
def test_correct_layers_pass(cls):
    assert check_ia3_layer(cls)


class BiasNotScaled(IA3Linear):  # scales W0 x but adds the bias afterwards
    def forward(self, x):
        if self.feedforward:
            return self.base(x * self.l)
        return F.linear(x, self.base.weight) * self.l + self.base.bias


class BaseTrains(IA3Linear):  # forgot to freeze the base layer
    def __init__(self, base, ff):
        super().__init__(base, ff)
        base.requires_grad_(True)


class Detached(IA3Linear):  # l read through .detach(): the right numbers, but no gradient reaches it
    def forward(self, x):
        l = self.l.detach()
        return self.base(x * l) if self.feedforward else self.base(x) * l


@pytest.mark.parametrize("cls, fails", [
    (lambda base, ff: IA3Linear(base, ff, ff_on_output=True), [0, 2]),   # FFN scaled on its output
    (lambda base, ff: IA3Linear(base, ff, init="zeros"), [1]),           # starts switched off
    (lambda base, ff: IA3Linear(base, ff, init="randn"), [1]),           # random init
    (BiasNotScaled, [2]),
    (BaseTrains, [0]),
    (Detached, [2]),
])
def test_broken_layers_fail_on_their_line(cls, fails):
    report = check_ia3_layer(cls)
    assert not report and failing(report) == fails


def test_wrong_vector_size_is_named(capsys):
    check_ia3_layer(lambda base, ff: IA3Linear(base, ff, ff_on_output=True))
    assert "feedforward=True: the vector has shape (6,), 6 entries; expected d_in = 10" in capsys.readouterr().out


def test_raising_layer_is_a_fail_not_a_traceback():
    class Typo(IA3Linear):
        def forward(self, x):
            return self.base(x) * self.scale  # no attribute `scale`

    report = check_ia3_layer(Typo)
    assert not report and failing(report) == [1, 2]

    class BadInit(nn.Module):
        def __init__(self, base, ff):
            super().__init__()
            self.l = nn.Parameter(torch.ones(base.out_features, base.in_features)[0, 0])
            raise ValueError("oops")

    report = check_ia3_layer(BadInit)
    assert not report and failing(report) == [0, 1, 2]


# -- exercise 2: merging --------------------------------------------------------------------------------
def merge_rows_cols(W0, b, l, feedforward):
    return (W0 * l[None, :], b) if feedforward else (l[:, None] * W0, l * b)


def merge_with_diag(W0, b, l, feedforward):
    return (W0 @ torch.diag(l), b.clone()) if feedforward else (torch.diag(l) @ W0, torch.diag(l) @ b)


def merge_in_place(W0, b, l, feedforward):
    """In place on the tensors it was given, einsum for the output scaling."""
    if feedforward:
        return W0.mul_(l), b
    return torch.einsum("o,oi->oi", l, W0), b.mul_(l)


@pytest.mark.parametrize("fn", [merge_rows_cols, merge_with_diag, merge_in_place])
def test_correct_merges_pass(fn):
    assert check_ia3_merge(fn)


@pytest.mark.parametrize("fn, fails, kw", [
    # output scaling that forgets the bias
    (lambda W0, b, l, ff: (W0 * l[None, :], b) if ff else (l[:, None] * W0, b), [1], {}),
    # input scaling that also scales the bias (l has d_in entries: the first d_out of them)
    (lambda W0, b, l, ff: (W0 * l[None, :], b * l[:b.numel()]) if ff else (l[:, None] * W0, l * b), [2], {}),
    # the wrong axis: rows for the feedforward layer (square, so that it runs)
    (lambda W0, b, l, ff: (l[:, None] * W0, b) if ff else (l[:, None] * W0, l * b), [2], dict(d_in=5, d_out=5)),
    # the wrong axis: columns for the output scaling (square, so that it runs)
    (lambda W0, b, l, ff: (W0 * l[None, :], b) if ff else (W0 * l[None, :], l * b), [1], dict(d_in=5, d_out=5)),
    # (d_in, d_out): the transposed weight
    (lambda W0, b, l, ff: ((W0 * l[None, :]).T, b) if ff else ((l[:, None] * W0).T, l * b), [0, 1, 2], {}),
])
def test_broken_merges_fail_on_their_line(fn, fails, kw):
    report = check_ia3_merge(fn, **kw)
    assert not report and failing(report) == fails


def test_merge_shape_mistake_is_named(capsys):
    check_ia3_merge(lambda W0, b, l, ff: ((W0 * l[None, :]).T, b) if ff else ((l[:, None] * W0).T, l * b))
    assert "W has shape (7, 5); expected W0's (d_out, d_in) = (5, 7)" in capsys.readouterr().out


def test_raising_merge_is_a_fail_not_a_traceback():
    # columns for the output scaling with d_in != d_out: the learner's own broadcast fails
    report = check_ia3_merge(lambda W0, b, l, ff: (W0 * l[None, :], b) if ff else (W0 * l[None, :], l * b))
    assert not report and failing(report) == [0, 1]


def test_unstarted_stubs_are_invitations():
    class Stub(nn.Module):
        def __init__(self, base, feedforward):
            raise NotImplementedError("your code here")

    def stub(*args):
        raise NotImplementedError("your code here")

    for report in (check_ia3_layer(Stub), check_ia3_merge(stub)):
        assert not report and not report.attempted
