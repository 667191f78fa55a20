"""FISH Mask against references nobody here wrote: the diagonal Fisher computed with torch.func (per-example
gradients of Hugging Face's own loss, the Jacobian of the log-probabilities for the expected form), the top k
by torch.sort, and a masked training run that leaves every entry outside the mask bit-identical."""
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, saved_selection, tiny_bert, tiny_llama
from torch.func import functional_call, grad, jacrev, vmap

import minipeft as mp
from minipeft.selective import FISHConfig, fisher_scores

HEAD = ["classifier"]
# vmap over Hugging Face attention falls back to a loop for scaled_dot_product_attention: slower, same values
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


def bert_examples(n=6, length=6):
    g = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(0, VOCAB, (length,), generator=g).tolist(), "label": i % 3}
            for i in range(n)]


def bert_collate(examples):
    return {"input_ids": torch.tensor([e["input_ids"] for e in examples]),
            "labels": torch.tensor([e["label"] for e in examples])}


def lm_examples(n=4, length=8, prompt=3):
    """Causal-LM examples whose first `prompt` tokens are not labelled (-100), as in instruction tuning."""
    g = torch.Generator().manual_seed(4)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def lm_collate(examples):
    return {"input_ids": torch.tensor([e["input_ids"] for e in examples]),
            "labels": torch.tensor([e["labels"] for e in examples])}


def params_of(model, skip=()):
    return {n: p.detach() for n, p in model.named_parameters() if not n.startswith(tuple(skip))}


def max_rel_diff(got: dict, want: dict) -> float:
    """max |got - want| over every entry, relative to the largest reference value."""
    assert got.keys() == want.keys()
    err = max((got[n] - want[n]).abs().max().item() for n in want)
    return err / max(want[n].abs().max().item() for n in want)


def reference_empirical(model, examples, collate, lm: bool):
    """(1/N) Σ_i (∇ log p(y_i|x_i))², with log p(y|x) = -(HF's mean cross-entropy) × (number of labelled
    targets), per-example gradients by torch.func.vmap(grad(...))."""
    params = params_of(model)
    batch = collate(examples)

    def log_p(params, ids, labels):
        ids, labels = ids[None], labels[None]
        loss = functional_call(model, params, (), {"input_ids": ids, "labels": labels}).loss
        n_labelled = (labels[:, 1:] != -100).sum() if lm else 1  # HF shifts LM labels by one
        return -loss * n_labelled

    grads = vmap(grad(log_p), in_dims=(None, 0, 0))(params, batch["input_ids"], batch["labels"])
    return {n: g.square().mean(0) for n, g in grads.items()}


def reference_expected(model, examples, collate):
    """(1/N) Σ_i Σ_c p(c|x_i) (∇ log p(c|x_i))², from the Jacobian of log_softmax (torch.func.jacrev)."""
    params = params_of(model)
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for example in examples:
        ids = collate([example])["input_ids"]

        def log_probs(params):
            return F.log_softmax(functional_call(model, params, (), {"input_ids": ids}).logits[0], dim=-1)

        jac = jacrev(log_probs)(params)  # {name: (classes, *shape)}
        p = log_probs(params).exp().detach()
        for n, j in jac.items():
            total[n] += (p.view(-1, *[1] * (j.dim() - 1)) * j.square()).sum(0)
    return {n: t / len(examples) for n, t in total.items()}


def test_empirical_fisher_matches_per_example_gradients():
    model, examples = tiny_bert(), bert_examples()
    got = fisher_scores(model, examples, bert_collate)
    want = reference_empirical(model, examples, bert_collate, lm=False)
    rel = max_rel_diff(got, want)
    print(f"FISH empirical (BERT) max relative difference to torch.func: {rel:.2e}")
    assert rel < 1e-5
    assert sum(int((s > 0).sum()) for s in got.values()) > 1000  # the scores are not trivially zero


def test_expected_fisher_matches_its_definition():
    model, examples = tiny_bert(), bert_examples(n=3)
    got = fisher_scores(model, examples, bert_collate, fisher="expected")
    want = reference_expected(model, examples, bert_collate)
    rel = max_rel_diff(got, want)
    print(f"FISH expected (BERT) max relative difference to torch.func: {rel:.2e}")
    assert rel < 1e-5
    assert max_rel_diff(fisher_scores(model, examples, bert_collate), want) > 1e-2  # the two forms differ


def test_causal_lm_sums_the_labelled_tokens_and_refuses_expected():
    model, examples = tiny_llama(), lm_examples()
    got = fisher_scores(model, examples, lm_collate)
    want = reference_empirical(model, examples, lm_collate, lm=True)
    rel = max_rel_diff(got, want)
    print(f"FISH empirical (Llama) max relative difference to torch.func: {rel:.2e}")
    assert rel < 1e-5
    # the unlabelled prompt tokens count: labelling every token gives other scores
    every = [{"input_ids": e["input_ids"], "labels": e["input_ids"]} for e in examples]
    assert max_rel_diff(fisher_scores(model, every, lm_collate), want) > 1e-2
    with pytest.raises(ValueError, match="empirical"):
        fisher_scores(model, examples, lm_collate, fisher="expected")


@pytest.mark.parametrize("training", [True, False])
def test_restores_requires_grad_and_mode(training):
    model, examples = tiny_bert(), bert_examples(n=2)
    model.train(training)
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 3 == 0)
    flags = [p.requires_grad for p in model.parameters()]
    fisher_scores(model, examples, bert_collate)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(m.training == training for m in model.modules())


def test_n_samples_takes_the_first_n():
    model, examples = tiny_bert(), bert_examples()
    first_two = fisher_scores(model, examples, bert_collate, n_samples=2)
    want = reference_empirical(model, examples[:2], bert_collate, lm=False)
    assert max_rel_diff(first_two, want) < 1e-5
    assert max_rel_diff(fisher_scores(model, examples[2:4], bert_collate), want) > 1e-2
    everything = fisher_scores(model, examples, bert_collate, n_samples=100)  # more than there are: all
    assert all(torch.equal(everything[n], s) for n, s in fisher_scores(model, examples, bert_collate).items())


def fish_model(density=0.02, **kw):
    config = FISHConfig(density=density, n_samples=4, examples=bert_examples(), collate=bert_collate,
                        modules_to_save=HEAD, **kw)
    return mp.wrap(tiny_bert(), config)


def test_picks_exactly_the_top_k_and_records_how(tmp_path):
    density = 0.02
    model = fish_model(density)
    model.save_adapter(tmp_path)
    chosen = saved_selection(tmp_path)

    base = tiny_bert()
    eligible = params_of(base, skip=[h + "." for h in HEAD])
    k = int(density * sum(p.numel() for p in eligible.values()))
    scores = fisher_scores(base, bert_examples(), bert_collate, n_samples=4, modules_to_save=HEAD)
    assert list(scores) == list(eligible)
    flat = torch.cat([s.flatten() for s in scores.values()])
    ordered = torch.sort(flat, descending=True)
    assert ordered.values[k - 1] > ordered.values[k]  # no tie at the threshold: the top k is well defined
    offsets = dict(zip(scores, torch.tensor([0] + [s.numel() for s in scores.values()]).cumsum(0).tolist()))
    got = torch.cat([offsets[name] + idx for name, idx in chosen.items()])
    assert got.numel() == k
    assert torch.equal(got.sort().values, ordered.indices[:k].sort().values)
    assert not any(name.startswith("classifier") for name in chosen)

    # the head would be chosen if it were scored: excluding it is not a no-op
    all_scores = fisher_scores(base, bert_examples(), bert_collate, n_samples=4)
    threshold = ordered.values[k - 1]
    assert (all_scores["classifier.weight"] > threshold).any()

    meta = json.loads((tmp_path / "adapter_config.json").read_text())["config"]
    assert meta["n_samples"] == 4 and meta["fisher"] == "empirical" and meta["density"] == density
    assert meta["selection"] == {name: idx.numel() for name, idx in chosen.items()}
    assert "examples" not in meta and "collate" not in meta


def test_needs_examples():
    with pytest.raises(ValueError, match="examples"):
        mp.wrap(tiny_bert(), FISHConfig(density=0.01, modules_to_save=HEAD))


def test_save_load_without_examples(tmp_path):
    model = fish_model()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in model.adapter_parameters("default"):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    ids = bert_collate(bert_examples())["input_ids"]
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.save_adapter(tmp_path)
    loaded = mp.load_adapter(tiny_bert(), tmp_path)
    assert loaded.peft_config["default"].examples is None
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, want)


def test_training_moves_only_the_masked_entries(tmp_path):
    model = fish_model()
    model.save_adapter(tmp_path)
    chosen = saved_selection(tmp_path)
    mp.Trainer(model, bert_examples(8), collate_fn=bert_collate, lr=1e-2, max_steps=3, batch_size=4,
               device="cpu", progress=False).train()
    merged = dict(model.merge_and_unload().named_parameters())
    base = dict(tiny_bert().named_parameters())
    assert merged.keys() == base.keys()
    for name, p in base.items():
        if name.startswith("classifier."):  # trained in full
            assert not torch.equal(merged[name], p)
            continue
        outside = torch.ones(p.numel(), dtype=torch.bool)
        if name in chosen:
            outside[chosen[name]] = False
            assert not torch.equal(merged[name].flatten()[chosen[name]], p.flatten()[chosen[name]]), name
        assert torch.equal(merged[name].flatten()[outside], p.flatten()[outside]), name
    assert chosen
