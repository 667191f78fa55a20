"""The Trainer: it learns, accumulation equals the big batch (autograd), schedules match transformers'."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from minipeft.train import Trainer, lr_factor


class Regression(nn.Module):
    """y = Wx + b with an MSE loss, returned like an HF model output."""

    def __init__(self, extra=0.0):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 1)
        self.extra = extra

    def forward(self, x, y):
        return SimpleNamespace(loss=((self.lin(x).squeeze(-1) - y) ** 2).mean())


def _data(n=64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1
    return [{"x": x[i], "y": y[i]} for i in range(n)]


def collate(exs):
    return {"x": torch.stack([e["x"] for e in exs]), "y": torch.stack([e["y"] for e in exs])}


def test_trainer_reduces_loss():
    model, data = Regression(), _data()
    hist = Trainer(model, data, collate_fn=collate, lr=0.05, max_steps=150, batch_size=16,
                   device="cpu", progress=False).train()
    assert hist["loss"][-1] < 0.05 * hist["loss"][0]
    assert len(hist["loss"]) == len(hist["lr"]) == len(hist["step_time"]) == 150


class Grabber:
    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer):
        self.grads.append([p.grad.clone() for p in trainer.model.parameters()])


def test_grad_accumulation_equals_big_batch_autograd():
    data = _data(8)
    grabs = {}
    for bs, acc in [(8, 1), (2, 4)]:
        model, g = Regression(), Grabber()
        Trainer(model, data, collate_fn=collate, lr=0.1, max_steps=1, batch_size=bs, grad_accum=acc,
                shuffle=False, max_grad_norm=None, callbacks=[g], device="cpu", progress=False).train()
        grabs[(bs, acc)] = g.grads[0]
    ref = Regression()  # reference: autograd on the full batch, outside the Trainer
    ref(**collate(data)).loss.backward()
    for a, b, r in zip(grabs[(8, 1)], grabs[(2, 4)], [p.grad for p in ref.parameters()]):
        torch.testing.assert_close(a, r)
        torch.testing.assert_close(b, r)


def test_extra_loss_is_added():
    class WithPenalty(Regression):
        def extra_loss(self):
            return 10.0 * self.lin.weight.pow(2).sum()

    data = _data(8)
    m0, m1 = Regression(), WithPenalty()
    g0, g1 = Grabber(), Grabber()
    for m, g in [(m0, g0), (m1, g1)]:
        Trainer(m, data, collate_fn=collate, lr=0.1, max_steps=1, batch_size=8, max_grad_norm=None,
                callbacks=[g], device="cpu", progress=False).train()
    w = Regression().lin.weight.detach()
    torch.testing.assert_close(g1.grads[0][0] - g0.grads[0][0], 20.0 * w)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_schedule_matches_transformers(schedule):
    import transformers

    total, warm = 50, 5
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    ref_fn = {"linear": transformers.get_linear_schedule_with_warmup,
              "cosine": transformers.get_cosine_schedule_with_warmup,
              "constant": lambda o, w, t: transformers.get_constant_schedule_with_warmup(o, w)}[schedule]
    sched = ref_fn(opt, warm, total)
    ref = []
    for _ in range(total):
        ref.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = [lr_factor(s, total, warm, schedule) for s in range(total)]
    assert ours == pytest.approx(ref, abs=1e-12)


def test_trainer_records_schedule_and_callbacks():
    events = []

    class Rec:
        def on_train_begin(self, t): events.append("begin")
        def on_step_end(self, t): events.append("step")
        def on_evaluate(self, t, metrics): events.append(("eval", round(metrics["eval_loss"], 6) >= 0))
        def on_train_end(self, t): events.append("end")

    data = _data(32)
    tr = Trainer(Regression(), data, data[:8], collate_fn=collate, lr=0.01, max_steps=10, batch_size=8,
                 schedule="cosine", warmup=0.2, eval_every=5, callbacks=[Rec()], device="cpu", progress=False)
    hist = tr.train()
    assert hist["lr"] == pytest.approx([0.01 * lr_factor(s, 10, 2, "cosine") for s in range(10)])
    assert events == ["begin"] + ["step"] * 5 + [("eval", True)] + ["step"] * 5 + [("eval", True), "end"]
    assert [e["step"] for e in hist["eval"]] == [5, 10]


def test_param_groups_and_bad_input():
    m = Regression()
    groups = [{"params": [m.lin.weight], "lr": 0.1}, {"params": [m.lin.bias], "lr": 0.4}]
    hist = Trainer(m, _data(8), collate_fn=collate, lr=999.0, max_steps=4, batch_size=8, warmup=0,
                   schedule="constant", param_groups=groups, device="cpu", progress=False).train()
    assert hist["lr"] == [0.1] * 4  # the first group's lr; the global lr does not override it
    with pytest.raises(ValueError):
        Trainer(m, _data(8), collate_fn=collate, batch_size=8)  # neither max_steps nor epochs
    with pytest.raises(ValueError):
        Trainer(m, _data(8), collate_fn=collate, max_steps=1, schedule="step")
    for p in m.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError):
        Trainer(m, _data(8), collate_fn=collate, max_steps=1)
