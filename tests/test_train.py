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


# ---- gradient checkpointing and bf16 through the Trainer ------------------------------------------------
def _token_data(n=4, T=12):
    ids = torch.randint(0, 64, (n, T), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": ids[i], "attention_mask": torch.ones(T, dtype=torch.long), "labels": ids[i]}
            for i in range(n)]


def _token_collate(exs):
    return {k: torch.stack([e[k] for e in exs]) for k in exs[0]}


def _lora_model(kind):
    import minipeft as mp
    from conftest import tiny_llama

    torch.manual_seed(0)
    if kind == "lm":
        return mp.wrap(tiny_llama(), mp.LoRAConfig(r=4, target=["q_proj", "v_proj"]))
    pooled = mp.PooledModel(tiny_llama(), num_labels=2)
    return mp.wrap(pooled, mp.LoRAConfig(r=4, target=["q_proj", "v_proj"], modules_to_save=["score"]))


def _saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves for backward while `fn()` runs (torch's saved-tensor hooks)."""
    seen = {}

    def pack(t):
        seen[(t.data_ptr(), t.numel(), t.dtype)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@pytest.mark.parametrize("kind", ["lm", "pooled"])
def test_gradient_checkpointing_same_gradients_fewer_saved_activations(kind):
    """Recomputing each block in backward (non-reentrant checkpointing) gives autograd's gradients of the plain
    run, for the adapter and the head, and autograd keeps far fewer bytes from the forward."""
    data = _token_data()
    if kind == "pooled":
        data = [dict(e, labels=torch.tensor(i % 2)) for i, e in enumerate(data)]
    batch = _token_collate(data)
    grads, saved = {}, {}
    for ckpt in (False, True):
        model = _lora_model(kind)
        trainer = Trainer(model, data, collate_fn=_token_collate, max_steps=1, batch_size=4, device="cpu",
                          progress=False, gradient_checkpointing=ckpt)
        model.train()
        loss, saved[ckpt] = _saved_bytes(lambda: trainer.compute_loss(batch))
        loss.backward()
        grads[ckpt] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads[True].keys() == grads[False].keys() and any("score" in n for n in grads[True]) == (kind == "pooled")
    for name, g in grads[False].items():
        assert g.abs().max() > 0 or "lora_A" in name  # A's gradient is 0 while B = 0 (LoRA's init)
        torch.testing.assert_close(grads[True][name], g, msg=name)
    assert saved[True] < 0.5 * saved[False], saved


def test_gradient_checkpointing_needs_a_hugging_face_model():
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        Trainer(Regression(), _data(8), collate_fn=collate, max_steps=1, device="cpu", progress=False,
                gradient_checkpointing=True)


def test_bf16_base_trains_fp32_adapters():
    """A bf16 base (as from_pretrained(torch_dtype=torch.bfloat16)) under bf16 autocast on the CPU: the loss
    falls as in the float32 run of the same model, the adapter tensors (and AdamW's state) stay float32, and
    the base stays bf16 and unchanged."""
    import minipeft as mp
    from conftest import tiny_llama

    data, hist = _token_data(8), {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = mp.wrap(tiny_llama().to(dtype), mp.LoRAConfig(r=4, target=["q_proj", "v_proj"]))
        base0 = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
        trainer = Trainer(model, data, collate_fn=_token_collate, lr=3e-2, max_steps=30, batch_size=8, warmup=0,
                          device="cpu", bf16=dtype == torch.bfloat16, progress=False)
        hist[dtype] = trainer.train()["loss"]
    first, last = sum(hist[torch.bfloat16][:5]) / 5, sum(hist[torch.bfloat16][-5:]) / 5
    assert last < first - 0.1, hist[torch.bfloat16]  # measured: 4.12 -> 3.97
    assert hist[torch.bfloat16][-1] == pytest.approx(hist[torch.float32][-1], rel=1e-2)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(p.dtype == torch.float32 for p in trained.values())
    assert all(s["exp_avg"].dtype == torch.float32 for s in trainer.optimizer.state.values())
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.dtype == torch.bfloat16 and torch.equal(p, base0[n]), n
