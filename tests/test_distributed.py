"""Many processes: `python -m minipeft.distributed` under torchrun (2 CPU processes, gloo) trains the same adapter
as one process with the same global batch and seed, under DDP and FSDP, for LoRA and for AdaLoRA (an extra loss and
a rank-budget callback); it logs the same losses and evaluates the same; only adapter tensors are synchronised.

The reference is the single-process run of the same script (the Trainer's own one-process path, which
tests/test_train.py checks against autograd). The runs train on 9 examples in global micro-batches of 8: every
other micro-batch is the epoch's 1-example tail, whose empty slice on rank 1 runs with weight 0, and the slices of
the full ones hold different numbers of target tokens (the per-rank loss weights).

Tolerance. The ranks pad their slices to other lengths than one process pads the whole batch, so sums round
differently (~1e-7 relative). AdamW amplifies that where a gradient entry is near its ε: the update g/(|g| + ε)
moves by up to lr·|δg|/(4ε). Measured after 4 steps: max relative difference 3.2e-5 (LoRA) and 2.2e-6 (AdaLoRA),
the same for DDP and FSDP (4.5e-6 on the full training set). Without the per-rank weights it is 0.33.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file

import minipeft as mp
from minipeft import distributed
from conftest import tiny_llama

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")

STEPS, BATCH = 4, 8
METHODS = ["lora", "adalora"]
REL_TOL = 3e-4  # max over tensors of ‖adapter − reference‖ / ‖reference‖ (measured 3.2e-5; no weights: 0.33)


def _args(methods, strategies, out):
    return ["--method", *methods, "--strategy", *strategies, "--steps", str(STEPS), "--batch-size", str(BATCH),
            "--train-n", "9", "--eval-n", "8", "--device", "cpu", "--out", str(out)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(method, strategy) → (run.json, adapter tensors). The single-process references run here; DDP and FSDP
    for LoRA and AdaLoRA (extra loss + rank-budget callback) run one after the other in one torchrun launch
    of 2 processes, made when a test first asks for one of them."""
    root, done = tmp_path_factory.mktemp("distributed"), {}

    def get(method, strategy):
        key = f"{method}-{strategy}"
        if strategy == "none" and key not in done:
            distributed.main(_args([method], ["none"], root / key))
            done[key] = root / key
        if key not in done:
            env = dict(os.environ, OMP_NUM_THREADS="1")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   "-m", "minipeft.distributed", *_args(METHODS, ["ddp", "fsdp"], root / "two")]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            done.update({f"{m}-{s}": root / "two" / f"{m}-{s}" for m in METHODS for s in ("ddp", "fsdp")})
        out = done[key]
        return json.loads((out / "run.json").read_text()), load_file(str(out / "adapter" / "adapter.safetensors"))

    return get


def _compare(got: dict, ref: dict) -> tuple[float, float]:
    assert got.keys() == ref.keys()
    rel = max(((got[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-12)).item() for k in ref)
    return rel, max((got[k] - ref[k]).abs().max().item() for k in ref)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("method", METHODS)
def test_two_processes_save_the_single_process_adapter(runs, method, strategy):
    (ref_run, ref), (run, got) = runs(method, "none"), runs(method, strategy)
    assert run["world_size"] == 2 and run["strategy"] == strategy
    rel, diff = _compare(got, ref)
    assert rel < REL_TOL, f"{method} {strategy}: max relative difference {rel:.3g}, max |Δ| {diff:.3g} vs one process"
    assert any(v.abs().max() > 0 for k, v in ref.items() if "lora_B" in k)  # it trained: B left its zero init
    if method == "adalora":  # the callback pruned the same singular values on every rank as in one process
        pruned = {k: v == 0 for k, v in ref.items() if "lora_E" in k}
        assert any(m.any() for m in pruned.values())
        assert all(torch.equal(got[k] == 0, m) for k, m in pruned.items())
    # the logged loss is the global batch's mean, as one process logs it
    torch.testing.assert_close(torch.tensor(run["loss"]), torch.tensor(ref_run["loss"]), rtol=1e-5, atol=0)
    # evaluation (every rank evaluates everything): the same eval loss and greedy-generation metric
    (ev,), (ref_ev,) = run["eval"], ref_run["eval"]
    assert ev["eval_loss"] == pytest.approx(ref_ev["eval_loss"], rel=1e-5)
    assert abs(ev["exact_match"] - ref_ev["exact_match"]) <= 100 / 8  # at most one greedy answer of 8 differs


def test_ddp_synchronises_only_adapter_tensors(runs):
    (ref_run, ref), (run, _) = runs("lora", "none"), runs("lora", "ddp")
    # DDP's reducer registered the trainable tensors only: LoRA's A and B, float32
    assert run["ddp_reducer"]["num_parameter_tensors"] == len(ref)
    assert run["ddp_reducer"]["total_parameter_size_bytes"] == 4 * ref_run["adapter_params_total"]
    for rank in run["per_rank"]:  # every rank holds the whole base, unchanged to the bit
        assert rank["base_unchanged"]
        assert rank["base_params"] == ref_run["base_params_total"]
        assert rank["adapter_params"] == ref_run["adapter_params_total"]
    assert run["base_digest_rank0"] == ref_run["base_digest_rank0"]


def test_fsdp_shards_the_base_and_keeps_the_adapter_whole(runs):
    ref_run, _ = runs("lora", "none")
    run, _ = runs("lora", "fsdp")
    held = [r["base_params"] for r in run["per_rank"]]
    assert sum(held) == ref_run["base_params_total"] == run["base_params_total"]
    assert max(held) - min(held) <= 0.01 * sum(held)  # about half each
    assert all(r["adapter_params"] == ref_run["adapter_params_total"] for r in run["per_rank"])
    assert all(r["base_unchanged"] for r in run["per_rank"])


def test_loss_items_is_what_the_model_averages_over():
    """The per-rank weight n_r / Σ n_s is right only if n_r is what the model's mean divides by: a causal
    LM's mean loss × loss_items = the summed cross-entropy of the shifted labels (torch's own)."""
    model = tiny_llama()
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, :4] = labels[1, :2] = labels[2, 7:] = -100
    batch = {"input_ids": ids, "labels": labels}
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        mean = model(**batch).loss
    total = F.cross_entropy(logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(mean * distributed.loss_items(batch), total)
    assert distributed.loss_items({"input_ids": ids, "labels": torch.tensor([0, 1, 1])}) == 3


def test_rank_slices_cover_the_batch_in_order():
    for n, world in [(8, 2), (9, 2), (5, 4), (1, 2), (16, 3)]:
        parts = [list(range(n))[distributed.rank_slice(n, r, world)] for r in range(world)]
        assert sum(parts, []) == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_bad_strategy_and_batch_size(monkeypatch):
    model = mp.wrap(tiny_llama(), mp.LoRAConfig(r=2, target=["q_proj"]))
    data = [{"input_ids": torch.zeros(4, dtype=torch.long)}] * 4
    kw = dict(collate_fn=lambda e: e, max_steps=1, device="cpu", progress=False)
    with pytest.raises(ValueError, match="strategy"):
        mp.Trainer(model, data, strategy="zero3", **kw)
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    if not dist.is_initialized():
        with pytest.raises(ValueError, match="torchrun"):
            mp.Trainer(model, data, strategy="ddp", **kw)
    monkeypatch.setattr(distributed, "setup", lambda strategy, device: distributed.DistInfo("ddp", 0, 3))
    with pytest.raises(ValueError, match="batch_size=16 .* world_size=3"):
        mp.Trainer(model, data, batch_size=16, **kw)
