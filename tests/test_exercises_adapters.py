"""The Adapters chapter's checks pass for correct implementations and fail for broken ones, on the right line."""
import torch
from torch import nn

from minipeft.exercises import check_adapter_count, check_bottleneck_adapter


def results(report):
    return [ok for _, ok in report]


class Adapter(nn.Module):
    def __init__(self, d, m, residual=True, act=nn.GELU, std=1e-2, zero_up=False, zero_down=False):
        super().__init__()
        self.down, self.up, self.act, self.residual = nn.Linear(d, m), nn.Linear(m, d), act(), residual
        for lin in (self.down, self.up):
            nn.init.trunc_normal_(lin.weight, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(lin.bias)
        if zero_up:
            nn.init.zeros_(self.up.weight)
        if zero_down:
            nn.init.zeros_(self.down.weight)

    def forward(self, h):
        z = self.up(self.act(self.down(h)))
        return h + z if self.residual else z


class Functional(nn.Module):
    """A second correct adapter: its own names, F.gelu, W_up zero (exactly the identity at init)."""

    def __init__(self, d, m):
        super().__init__()
        self.adapter_down = nn.Linear(d, m)
        self.adapter_up = nn.Linear(m, d)
        nn.init.normal_(self.adapter_down.weight, std=0.02)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, h):
        return torch.nn.functional.gelu(self.adapter_down(h)) @ self.adapter_up.weight.T + self.adapter_up.bias + h


class Raises(nn.Module):
    def __init__(self, d, m):
        super().__init__()
        self.down = nn.Linear(d, m, bias="yes")
        raise RuntimeError("a learner's typo")


def test_correct_adapters_pass():
    assert check_bottleneck_adapter(Adapter)
    assert check_bottleneck_adapter(Functional)
    assert check_bottleneck_adapter(lambda d, m: Adapter(d, m, zero_up=True))  # exactly the identity: fine


def test_broken_adapters_fail_on_the_right_line():
    assert results(check_bottleneck_adapter(lambda d, m: Adapter(d, m, residual=False)))[3] is False  # no skip
    assert results(check_bottleneck_adapter(lambda d, m: Adapter(d, m, act=nn.ReLU)))[4] is False  # not GELU
    assert results(check_bottleneck_adapter(lambda d, m: Adapter(d, m, std=1.0)))[1] is False  # not near identity
    dead = results(check_bottleneck_adapter(lambda d, m: Adapter(d, m, zero_up=True, zero_down=True)))
    assert dead[1] is True and dead[2] is False  # the identity, but it can never train

    class NoBias(Adapter):
        def __init__(self, d, m):
            super().__init__(d, m)
            self.down = nn.Linear(d, m, bias=False)
    report = check_bottleneck_adapter(NoBias)
    assert not report and dict(report)["parameter count 2md + d + m"] is False


def test_a_raising_adapter_is_a_fail_not_a_traceback(capsys):
    assert not any(results(check_bottleneck_adapter(Raises)))
    assert "RuntimeError" in capsys.readouterr().out


def test_count():
    assert check_adapter_count(lambda d, m, n: n * 2 * (2 * m * d + d + m))
    assert check_adapter_count(lambda d, m, n: 2 * n * (m * (2 * d + 1) + d))  # the same, factored
    wrong = [lambda d, m, n: n * (2 * m * d + d + m),      # one adapter per block
             lambda d, m, n: n * 2 * (2 * m * d),          # biases forgotten
             lambda d, m, n: n * 2 * (2 * m * d + 2 * d),  # the down bias counted with d entries
             lambda d, m, n: {}[d]]                        # raises
    for fn in wrong:
        assert not check_adapter_count(fn)
