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
