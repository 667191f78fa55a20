"""The Adapters chapter's checks pass for a correct implementation and fail for broken ones."""
from torch import nn

from minipeft.exercises import check_adapter_count, check_bottleneck_adapter


class Adapter(nn.Module):
    def __init__(self, d, m, residual=True, act=nn.GELU, std=1e-2):
        super().__init__()
        self.down, self.up, self.act, self.residual = nn.Linear(d, m), nn.Linear(m, d), act(), residual
        for lin in (self.down, self.up):
            nn.init.trunc_normal_(lin.weight, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(lin.bias)

    def forward(self, h):
        z = self.up(self.act(self.down(h)))
        return h + z if self.residual else z


def test_correct_adapter_passes():
    assert check_bottleneck_adapter(Adapter)


def test_broken_adapters_fail():
    assert not check_bottleneck_adapter(lambda d, m: Adapter(d, m, residual=False))  # no skip
    assert not check_bottleneck_adapter(lambda d, m: Adapter(d, m, act=nn.ReLU))  # other nonlinearity
    assert not check_bottleneck_adapter(lambda d, m: Adapter(d, m, std=1.0))  # not near identity

    class NoBias(Adapter):
        def __init__(self, d, m):
            super().__init__(d, m)
            self.down = nn.Linear(d, m, bias=False)
    report = check_bottleneck_adapter(NoBias)
    assert not report and dict(report)["parameter count 2md + d + m"] is False


def test_count():
    assert check_adapter_count(lambda d, m, n: n * 2 * (2 * m * d + d + m))
    assert not check_adapter_count(lambda d, m, n: n * (2 * m * d + d + m))  # one adapter per block
    assert not check_adapter_count(lambda d, m, n: n * 2 * (2 * m * d))  # biases forgotten
