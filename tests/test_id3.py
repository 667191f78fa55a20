"""ID3 against references nobody here wrote: the picks of each step recomputed from the gradients a callback
saw (|g| / (|θ| + ε)^exp, torch.sort), the schedule by an explicit loop, and a trained model whose entries
outside the mask are bit-identical to the base; plus save → load, merge and weight decay refused."""
import copy

import pytest
import torch
from conftest import VOCAB, tiny_bert
from safetensors.torch import load_file

import minipeft as mp
from minipeft.selective import ID3Config, ID3Grower, ID3Layer, SparseDeltaLayer, id3_budget_used
from minipeft.selective.id3 import picks_per_step

HEAD = ["classifier"]


def examples(n=8, length=6):
    g = torch.Generator().manual_seed(5)
    return [{"input_ids": torch.randint(0, VOCAB, (length,), generator=g).tolist(), "label": i % 3}
            for i in range(n)]


def collate(batch):
    return {"input_ids": torch.tensor([e["input_ids"] for e in batch]),
            "labels": torch.tensor([e["label"] for e in batch])}


def id3_tensors(model, attr):
    """{parameter name as in the base: tensor} of every ID3 layer's deltas (attr="id3_delta") or masks."""
    out = {}
    for path, layer in model.adapter_layers():
        if isinstance(layer, ID3Layer):
            items = layer.id3_delta["default"].items() if attr == "id3_delta" else layer.masks("default").items()
            out.update({f"{path}.{key.replace('__', '.')}": t for key, t in items})
    return out


class Recorder:
    """Passed to the Trainer, so it runs before the method's grower: sees each step's full gradients and the
    masks before the step's picks (on_before_optimizer_step), and the masks after them (on_step_end)."""

    def __init__(self, model):
        self.model, self.before, self.after = model, [], []

    def on_before_optimizer_step(self, trainer):
        deltas, masks = id3_tensors(self.model, "id3_delta"), id3_tensors(self.model, "id3_mask")
        self.before.append({n: (d.grad.clone(), d.detach().clone(), masks[n].clone()) for n, d in deltas.items()})

    def on_step_end(self, trainer):
        self.after.append({n: m.clone() for n, m in id3_tensors(self.model, "id3_mask").items()})


def train(config, steps=4, weight_decay=0.0, lr=1e-2):
    model = mp.wrap(tiny_bert(), config)
    recorder = Recorder(model)
    trainer = mp.Trainer(model, examples(), collate_fn=collate, lr=lr, max_steps=steps, batch_size=4,
                         weight_decay=weight_decay, callbacks=[recorder], device="cpu", progress=False)
    trainer.train()
    (grower,) = [cb for cb in trainer.callbacks if isinstance(cb, ID3Grower)]
    return model.eval(), recorder, grower


def schedule(budget, steps):
    """The paper's schedule by an explicit loop: ⌊B/T⌋ each step, one more in each of the first B mod T."""
    out = []
    for t in range(steps):
        out.append(budget // steps + (1 if t < budget % steps else 0))
    return out


@pytest.mark.parametrize("budget,steps", [(10, 4), (12, 4), (3, 5), (7, 1), (100, 7)])
def test_picks_per_step(budget, steps):
    got = picks_per_step(budget, steps)
    assert got == schedule(budget, steps) and sum(got) == budget


def eligible_count():
    return sum(p.numel() for n, p in tiny_bert().named_parameters() if not n.startswith("classifier."))


@pytest.mark.parametrize("how", [{"budget": 50}, {"density": 0.003}])
def test_budget_is_spent_exactly_and_masks_only_grow(how):
    steps = 4
    model, recorder, grower = train(ID3Config(modules_to_save=HEAD, **how), steps=steps)
    budget = how.get("budget") or int(how["density"] * eligible_count())
    assert id3_budget_used(model) == budget
    counts = [sum(int(m.sum()) for m in masks.values()) for masks in recorder.after]
    expected = torch.tensor(schedule(budget, steps)).cumsum(0).tolist()
    assert grower.history == counts == expected  # non-decreasing, by the schedule
    previous = {n: torch.zeros_like(m) for n, m in recorder.after[0].items()}
    for masks in recorder.after:
        assert all(torch.equal(masks[n] | previous[n], masks[n]) for n in masks)  # contains the previous mask
        previous = masks
    assert not any(n.startswith("classifier") for n, m in recorder.after[-1].items() if m.any())


@pytest.mark.parametrize("exp,eps", [(1.0, 1e-3), (0.0, 1e-3), (2.0, 0.05)])
def test_each_step_picks_the_top_d3_scores(exp, eps):
    budget, steps = 30, 3
    _, recorder, _ = train(ID3Config(budget=budget, exp=exp, eps=eps, modules_to_save=HEAD), steps=steps)
    base = dict(tiny_bert().named_parameters())
    for t, (seen, after) in enumerate(zip(recorder.before, recorder.after)):
        names = list(seen)
        scores, new = [], []
        for n in names:
            g, delta, mask = seen[n]
            theta = base[n].detach() + torch.where(mask, delta, torch.zeros_like(delta))  # the weight now
            score = g.abs() / (theta.abs() + eps) ** exp
            scores.append(score.masked_fill(mask, -float("inf")).flatten())  # only unchosen entries compete
            new.append((after[n] & ~mask).flatten())
        scores, new = torch.cat(scores), torch.cat(new)
        k = schedule(budget, steps)[t]
        ordered = torch.sort(scores, descending=True)
        assert ordered.values[k - 1] > ordered.values[k]  # no tie at the threshold
        assert torch.equal(new.nonzero().flatten(), ordered.indices[:k].sort().values), f"step {t}"


def test_entries_outside_the_mask_never_move():
    model, _, _ = train(ID3Config(budget=40, modules_to_save=HEAD))
    masks = {n: m.clone() for n, m in id3_tensors(model, "id3_mask").items()}
    for n, d in id3_tensors(model, "id3_delta").items():  # the optimizer never touched them
        assert torch.equal(d.detach()[~masks[n]], torch.zeros_like(d)[~masks[n]]), n
    merged = dict(model.merge_and_unload().named_parameters())
    base = dict(tiny_bert().named_parameters())
    moved = 0
    for n, p in base.items():
        if n.startswith("classifier."):
            continue
        assert torch.equal(merged[n][~masks[n]], p[~masks[n]]), n
        assert not (merged[n][masks[n]] == p[masks[n]]).any(), n  # every chosen entry moved
        moved += int(masks[n].sum())
    assert moved == 40


def test_weight_decay_is_refused_at_train_start():
    model = mp.wrap(tiny_bert(), ID3Config(budget=10, modules_to_save=HEAD))
    trainer = mp.Trainer(model, examples(), collate_fn=collate, max_steps=2, batch_size=4, weight_decay=0.01,
                         device="cpu", progress=False)
    with pytest.raises(ValueError, match="weight_decay"):
        trainer.train()
    assert trainer.step == 0 and id3_budget_used(model) == 0


def test_save_load_gives_a_sparse_adapter_with_exactly_the_budget(tmp_path):
    budget = 25
    model, _, _ = train(ID3Config(budget=budget, modules_to_save=HEAD))
    ids = collate(examples())["input_ids"]
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.save_adapter(tmp_path)
    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    assert sum(t.numel() for k, t in tensors.items() if ".sparse_values." in k) == budget
    assert sum(t.numel() for k, t in tensors.items() if ".sparse_index." in k) == budget
    loaded = mp.load_adapter(tiny_bert(), tmp_path)
    layers = [layer for path, layer in loaded.adapter_layers() if not path.startswith("classifier")]
    assert layers and all(isinstance(layer, SparseDeltaLayer) for layer in layers)
    assert sum(loaded.peft_config["default"].selection.values()) == budget
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, want)


def test_merge_is_the_same_function_and_unmerge_is_exact():
    model, _, _ = train(ID3Config(budget=40, modules_to_save=HEAD))
    ids = collate(examples())["input_ids"]
    before = copy.deepcopy(model.base_model.state_dict())
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        model.merge()
        torch.testing.assert_close(model(input_ids=ids).logits, want, atol=1e-5, rtol=0)
        assert not torch.allclose(want, base, atol=1e-4)  # the adapter changed the function
        model.unmerge()
    after = model.base_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
