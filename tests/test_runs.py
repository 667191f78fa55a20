"""Reference runs (minipeft.runs): recipes are checked, a run is trained once, its checkpoints load back."""
import json

import pytest
import torch

import minipeft as mp
from minipeft import runs


@pytest.mark.parametrize("percent,n", [(50.0, 10), (80.0, 500), (97.4, 300)])
def test_interval_is_the_score_tests_acceptance_region(percent, n):
    # Wilson's interval is every p the score test does not reject: |p_hat - p| = 1.96 sqrt(p(1-p)/n) at its ends
    p_hat = percent / 100
    for end in mp.interval(percent, n):
        p = end / 100
        assert abs(p_hat - p) == pytest.approx(1.96 * (p * (1 - p) / n) ** 0.5, rel=1e-9)
    assert mp.interval(100.0, 500)[1] == pytest.approx(100.0) and mp.interval(0.0, 500)[0] == pytest.approx(0.0)
    assert 0.0 <= mp.interval(0.0, 5)[0] and mp.interval(100.0, 5)[1] <= 100.0
    with pytest.raises(ValueError, match="n must be positive"):
        mp.interval(50.0, 0)


def test_recipes_are_checked():
    with pytest.raises(ValueError, match="arithmetic/lora"):
        runs.recipe("arithmetic/nope")
    with pytest.raises(ValueError, match="unknown recipe keys"):
        runs.recipe("sentiment/full", learning_rate=1e-3)
    with pytest.raises(ValueError, match="checkpoints"):
        runs.recipe("sentiment/full", checkpoints=(600,))
    assert runs._key("sentiment/full", runs.recipe("sentiment/full")) != \
        runs._key("sentiment/full", runs.recipe("sentiment/full", lr=1e-4))


def test_a_run_trains_once_and_its_checkpoints_load(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "runs_dir", lambda: tmp_path)
    small = dict(steps=4, batch_size=4, checkpoints=(2,))
    run = runs.get("sentiment/bitfit", **small)
    assert sorted(run.scores) == [2, 4] and run.metrics["n"] == len(mp.data.load("sentiment", "test"))
    assert len(run.loss) == 4 and run.score == run.metrics["accuracy"]
    stamp = (run.path / "done.json").stat().st_mtime_ns
    again = runs.get("sentiment/bitfit", **small)  # cached: not trained again
    assert (again.path / "done.json").stat().st_mtime_ns == stamp
    model, tok = run.load()
    assert mp.evaluate(model, tok, "sentiment")["accuracy"] == pytest.approx(run.score)
    early, _ = run.load(step=2)
    changed = [n for n, p in model.named_parameters() if "bias" in n
               and not torch.equal(p, early.get_parameter(n))]
    assert changed, "the checkpoint after 2 steps should differ from the end of training"
    with pytest.raises(ValueError, match="checkpoints at steps"):
        run.load(step=3)
    assert json.loads((run.path / "done.json").read_text())["recipe"]["steps"] == 4


@pytest.mark.parametrize("name", ["heads/arithmetic/lora/regression/0", "heads/sentiment_words/full/classification/1"])
def test_a_pooled_head_run_loads_back_with_its_head(tmp_path, monkeypatch, name):
    # a pooled readout: the head is trained (modules_to_save, or in full) and comes back with the weights
    monkeypatch.setattr(runs, "runs_dir", lambda: tmp_path)
    run = runs.get(name, steps=3, batch_size=4)
    model, tok = run.load()
    pooled = mp.heads.pooled_of(model)
    assert pooled is not None and pooled.kind == run.recipe["head"]
    metric = mp.data.get_task(run.recipe["task"]).metric_name
    again = mp.evaluate(model, tok, run.recipe["task"])
    assert again[metric] == pytest.approx(run.metrics[metric])
    if pooled.kind == "regression":
        assert again["mae"] == pytest.approx(run.metrics["mae"], rel=1e-4)
    fresh = runs._base(run.recipe)[0].score.weight  # the head's init from the seed, before training
    assert not torch.equal(pooled.score.weight.detach().cpu(), fresh), "the trained head was not saved/loaded"


def test_every_head_recipe_has_a_seed_spread():
    # each (task, method, readout) is trained with every seed in HEAD_SEEDS, on one budget per task
    names = [n for n in runs.names() if n.startswith("heads/")]
    groups = {}
    for n in names:
        _, task, method, head, seed = n.split("/")
        groups.setdefault((task, method, head), set()).add(int(seed))
        rec = runs.recipe(n)
        assert rec["head"] == head and rec["seed"] == int(seed)
    assert all(seeds == set(runs.HEAD_SEEDS) for seeds in groups.values()) and len(runs.HEAD_SEEDS) >= 2
    steps = {(t, runs.recipe(f"heads/{t}/{m}/{h}/0")["steps"]) for t, m, h in groups}
    assert len(steps) == len({t for t, _, _ in groups}), f"one budget per task, got {steps}"
