"""Pooled heads against references nobody here wrote: transformers' LlamaForSequenceClassification (its
last-non-pad-token pooling, its score head, its cross-entropy / MSE), plain loops over positions, and the
one-example-at-a-time forward pass for evaluation. Then every PEFT method's machinery on a pooled model:
LoRA and prompt tuning through mp.Trainer, save_adapter / load_adapter with the head."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, tiny_gpt2, tiny_llama
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForSequenceClassification, PreTrainedTokenizerFast

import minipeft as mp
from minipeft import data
from minipeft.heads import PooledCollator, PooledModel, pool, pooled_of, task_label, task_num_labels


def masks():
    right = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    left = right.flip(1)
    return right, left


def loop_pool(h, mask, how):
    """The pooling written position by position."""
    out = []
    for b in range(h.shape[0]):
        real = [t for t in range(h.shape[1]) if mask[b, t] == 1]
        if how == "mean":
            out.append(sum(h[b, t] for t in real) / len(real))
        else:
            out.append(h[b, real[-1] if how == "last" else real[0]])
    return torch.stack(out)


@pytest.mark.parametrize("how", ["last", "mean", "first"])
def test_pool_matches_loops(how):
    h = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(0))
    for mask in masks():
        assert torch.allclose(pool(h, mask, how), loop_pool(h, mask, how), atol=1e-6)
    stacked = torch.stack([h, 2 * h])  # leading dimensions (layers) share the mask
    assert torch.allclose(pool(stacked, masks()[1], how)[1], 2 * loop_pool(h, masks()[1], how), atol=1e-6)
    if how != "mean":  # a one-hot pooling copies the hidden state bit for bit
        assert torch.equal(pool(h, masks()[0], how), loop_pool(h, masks()[0], how))


def test_pool_errors():
    h = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="pooling"):
        pool(h, torch.ones(2, 3), "max")
    with pytest.raises(ValueError, match="no real token"):
        pool(h, torch.tensor([[1, 1, 1], [0, 0, 0]]), "last")
    with pytest.raises(ValueError, match="shape"):
        pool(h, torch.ones(2, 4), "mean")


def hf_classifier(llama, num_labels):
    """transformers' own sequence classifier with the same body: pad id 0, score = our head's weight."""
    cfg = llama.config.__class__(**{**llama.config.to_dict(), "num_labels": num_labels, "pad_token_id": 0})
    hf = LlamaForSequenceClassification(cfg).eval()
    hf.model.load_state_dict(llama.model.state_dict())
    return hf


def batch(padding):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (3, 6), generator=g)  # real tokens are never the pad id 0
    mask = masks()[0] if padding == "right" else masks()[1]
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("padding", ["right", "left"])
def test_last_token_classifier_is_transformers(padding):
    llama = tiny_llama()
    ours = PooledModel(llama, num_labels=3, pooling="last", bias=False).eval()
    hf = hf_classifier(llama, 3)
    hf.score.weight.data.copy_(ours.score.weight.data)
    ids, mask = batch(padding)
    labels = torch.tensor([0, 2, 1])
    a, b = ours(input_ids=ids, attention_mask=mask, labels=labels), hf(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.allclose(a.logits, b.logits, atol=1e-5)
    assert torch.allclose(a.loss, b.loss, atol=1e-5)


def test_regressor_is_transformers_mse():
    llama = tiny_llama()
    ours = PooledModel(llama, kind="regression", bias=False).eval()
    hf = hf_classifier(llama, 1)  # num_labels = 1 and float labels: transformers' regression (MSE)
    hf.score.weight.data.copy_(ours.score.weight.data)
    ids, mask = batch("right")
    y = torch.tensor([0.5, -1.0, 2.0])
    a, b = ours(input_ids=ids, attention_mask=mask, labels=y), hf(input_ids=ids, attention_mask=mask, labels=y)
    assert a.logits.shape == (3,)
    assert torch.allclose(a.logits, b.logits.squeeze(-1), atol=1e-5)
    assert torch.allclose(a.loss, b.loss, atol=1e-5)


def test_regressor_standardises_the_target():
    llama = tiny_llama()
    plain = PooledModel(llama, kind="regression").eval()
    torch.manual_seed(0)
    scaled = PooledModel(llama, kind="regression", target_mean=10.0, target_std=4.0).eval()
    scaled.score.load_state_dict(plain.score.state_dict())
    ids, mask = batch("right")
    y = torch.tensor([9.0, 12.0, 7.0])
    a, b = plain(input_ids=ids, attention_mask=mask, labels=(y - 10) / 4), scaled(input_ids=ids, attention_mask=mask, labels=y)
    assert torch.allclose(b.logits, 10 + 4 * a.logits, atol=1e-5)  # ŷ in the label's units
    assert torch.allclose(b.loss, F.mse_loss(b.logits, y) / 16, atol=1e-5)  # MSE / σ²


@pytest.mark.parametrize("how", ["mean", "first"])
def test_other_poolings_read_the_body(how):
    llama = tiny_llama()
    ours = PooledModel(llama, num_labels=2, pooling=how).eval()
    ids, mask = batch("left")
    h = llama(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    want = ours.score(loop_pool(h, mask, how))
    out = ours(input_ids=ids, attention_mask=mask)
    assert torch.allclose(out.logits, want, atol=1e-5)
    assert torch.allclose(out.pooled, loop_pool(h, mask, how), atol=1e-5)


def test_gpt2_body():
    gpt2 = tiny_gpt2()
    ours = PooledModel(gpt2, num_labels=2).eval()
    ids, mask = batch("right")
    h = gpt2(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    assert torch.allclose(ours(input_ids=ids, attention_mask=mask).logits, ours.score(loop_pool(h, mask, "last")),
                          atol=1e-5)


def test_errors():
    llama = tiny_llama()
    with pytest.raises(ValueError, match="pooling"):
        PooledModel(llama, num_labels=2, pooling="cls")
    with pytest.raises(ValueError, match="num_labels"):
        PooledModel(llama, num_labels=1)
    with pytest.raises(ValueError, match="one number"):
        PooledModel(llama, num_labels=3, kind="regression")
    with pytest.raises(ValueError, match="kind"):
        PooledModel(llama, num_labels=2, kind="ranking")
    clf, reg = PooledModel(llama, num_labels=3), PooledModel(llama, kind="regression")
    ids, mask = batch("right")
    with pytest.raises(ValueError, match="float labels"):
        clf(input_ids=ids, attention_mask=mask, labels=torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="0..2"):
        clf(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="shape"):
        clf(input_ids=ids, attention_mask=mask, labels=torch.tensor([[0], [1], [2]]))
    with pytest.raises(ValueError, match="float labels"):
        reg(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="plain model"):
        PooledModel(mp.wrap(tiny_llama(), mp.LoRAConfig(r=2, target=["q_proj"])), num_labels=2)


# ---- every method's machinery on a pooled model --------------------------------------------------------
def toy_examples(n=64, seed=0):
    """Label = whether token 5 occurs in a random sequence (lengths 3..8, right padded by the collator)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        T = int(torch.randint(3, 9, (1,), generator=g))
        ids = torch.randint(6, VOCAB, (T,), generator=g)
        y = int(torch.rand(1, generator=g) < 0.5)
        if y:
            ids[int(torch.randint(0, T, (1,), generator=g))] = 5
        out.append({"ids": ids, "label": y})
    return out


def toy_collate(examples, kind="classification"):
    T = max(len(e["ids"]) for e in examples)
    ids = torch.zeros(len(examples), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, e in enumerate(examples):
        ids[b, :len(e["ids"])], mask[b, :len(e["ids"])] = e["ids"], 1
    dtype = torch.long if kind == "classification" else torch.float32
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e["label"] for e in examples], dtype=dtype)}


HEAD = dict(modules_to_save=["score"])
CONFIGS = {  # one of each family: the head trains in full next to every kind of adapter (BitFit: Llama has no bias)
    "lora": lambda: mp.LoRAConfig(r=4, alpha=8, target=["q_proj", "v_proj"], **HEAD),
    "dora": lambda: mp.DoRAConfig(r=4, alpha=8, target=["q_proj", "v_proj"], **HEAD),
    "melora": lambda: mp.MELoRAConfig(r=2, n=2, alpha=8, target=["q_proj", "v_proj"], **HEAD),
    "rocoft": lambda: mp.RoCoFTConfig(k=2, **HEAD),
    "ia3": lambda: mp.IA3Config(**HEAD),
    "adapter": lambda: mp.AdapterConfig(bottleneck=4, **HEAD),
    "prompt_tuning": lambda: mp.PromptTuningConfig(num_virtual_tokens=4, **HEAD),
    "prefix_tuning": lambda: mp.PrefixTuningConfig(num_virtual_tokens=4, **HEAD),
}


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_trainer_and_adapter_files(method, kind, tmp_path):
    torch.manual_seed(0)
    pooled = PooledModel(tiny_llama(), num_labels=2 if kind == "classification" else None, kind=kind,
                         pooling="mean")
    model = mp.wrap(pooled, CONFIGS[method]())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".score.copies.default." in n for n in trainable)  # the head trains in full ...
    adapter = {id(p) for _, p in model.adapter_parameters("default")}
    assert all(id(p) in adapter or ".score.copies.default." in n  # ... next to the adapter, and nothing else
               for n, p in model.named_parameters() if p.requires_grad)
    assert pooled_of(model) is pooled
    exs = toy_examples()
    trainer = mp.Trainer(model, exs, collate_fn=lambda b: toy_collate(b, kind), lr=1e-2, max_steps=12,
                         batch_size=16, progress=False, device="cpu", warmup=0.0)
    history = trainer.train()
    assert history["loss"][-1] < history["loss"][0]
    model.eval()
    batch_ = toy_collate(exs[:8], kind)
    before = model(input_ids=batch_["input_ids"], attention_mask=batch_["attention_mask"]).logits
    model.save_adapter(tmp_path)
    torch.manual_seed(1)  # a fresh head is drawn differently: the file must restore it
    fresh = PooledModel(tiny_llama(), num_labels=2 if kind == "classification" else None, kind=kind, pooling="mean")
    loaded = mp.load_adapter(fresh, tmp_path)
    after = loaded(input_ids=batch_["input_ids"], attention_mask=batch_["attention_mask"]).logits
    assert torch.equal(before, after)


# ---- tasks and evaluation -------------------------------------------------------------------------------
def word_tokenizer(names=("sentiment", "arithmetic", "sentiment_words")):
    """A word-level tokenizer over the tasks' words (built here; the zoo is not needed)."""
    words = {w for name in names for s in data.SPLITS for ex in data.load(name, s)
             for w in (ex.get("prompt", "") + " " + ex.get("text", "")).split()}
    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(sorted(words))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def test_task_labels():
    ex = data.load("arithmetic", "test", n=1)[0]
    assert task_label(ex) == int(ex["answer"]) and task_num_labels("arithmetic") == 21
    assert task_num_labels("sentiment") == 2 and task_num_labels("sentiment_words") == 2
    with pytest.raises(ValueError):
        task_num_labels("e2e")
    same = zip(data.load("sentiment", "test"), data.load("sentiment_words", "test"))
    assert all(a["text"] == b["text"] and a["label"] == b["label"] for a, b in same)
    words = data.load("sentiment_words", "test", n=4)
    assert [data.get_task("sentiment_words").metric([ex["target"] for ex in words], words)["accuracy"]] == [100.0]
    assert data.get_task("sentiment_words").metric([" good", " good x", "", "ba"], words)["accuracy"] == \
        100.0 * sum(ex["label"] == 1 for ex in words[:2]) / 4


def build_for_task(task, kind, tok):
    torch.manual_seed(0)
    llama = tiny_llama()
    llama.resize_token_embeddings(len(tok))
    return PooledModel.for_task(llama, task, kind=kind).eval()


@pytest.mark.parametrize("task, kind", [("sentiment", "classification"), ("arithmetic", "classification"),
                                        ("arithmetic", "regression"), ("sentiment", "regression")])
def test_evaluate_pooled_is_one_by_one(task, kind):
    """mp.evaluate on padded batches = each example alone, scored in plain Python."""
    tok = word_tokenizer()
    model = build_for_task(task, kind, tok)
    with torch.no_grad():
        model.score.bias.fill_(0.3)  # move a regressor off the mean so that rounding matters
    exs = data.load(task, "test", n=24)
    res = mp.evaluate(model, tok, task, n=24, batch_size=8, return_predictions=True)
    outs = []
    with torch.no_grad():
        for ex in exs:
            text = ex["prompt"] if task == "arithmetic" else ex["text"]
            ids = torch.tensor([tok(text)["input_ids"]])
            outs.append(model(input_ids=ids).logits[0])
    truth = [int(ex["answer"]) if task == "arithmetic" else ex["label"] for ex in exs]
    if kind == "classification":
        pred = [int(o.argmax()) for o in outs]
    else:
        values = [float(o) for o in outs]
        pred = [round(v) if task == "arithmetic" else min(max(round(v), 0), 1) for v in values]
        assert res["mae"] == pytest.approx(sum(abs(v - t) for v, t in zip(values, truth)) / len(exs), abs=1e-4)
        assert res["rmse"] == pytest.approx(math.sqrt(sum((v - t) ** 2 for v, t in zip(values, truth)) / len(exs)),
                                            abs=1e-4)
    acc = 100.0 * sum(p == t for p, t in zip(pred, truth)) / len(exs)
    key = "exact_match" if task == "arithmetic" else "accuracy"
    assert res[key] == pytest.approx(acc)
    if kind == "regression" and task == "arithmetic":
        assert model.target_mean == pytest.approx(sum(int(e["answer"]) for e in data.load(task, "train")) / 3000)


def test_pooled_collator_and_trainer_on_a_task():
    tok = word_tokenizer()
    model = mp.wrap(build_for_task("sentiment", "classification", tok),
                    mp.LoRAConfig(r=2, target=["q_proj", "v_proj"], modules_to_save=["score"]))
    coll = PooledCollator(tok, "classification")
    b = coll(data.load("sentiment", "train", n=3))
    assert b["labels"].dtype == torch.long and b["input_ids"].shape == b["attention_mask"].shape
    assert PooledCollator(tok, "regression")(data.load("arithmetic", "train", n=2))["labels"].dtype == torch.float32
    hist = mp.Trainer(model, data.load("sentiment", "train", n=32), collate_fn=coll, max_steps=2, batch_size=16,
                      progress=False, device="cpu").train()
    assert len(hist["loss"]) == 2 and all(math.isfinite(x) for x in hist["loss"])
    assert "accuracy" in mp.evaluate(model, tok, "sentiment_words", n=8)  # the pooled head reads the prompt


def test_hidden_states_for_the_heatmap():
    tok = word_tokenizer()
    model = mp.wrap(build_for_task("sentiment", "classification", tok),
                    mp.PromptTuningConfig(num_virtual_tokens=3, modules_to_save=["score"]))
    texts = [ex["text"] for ex in data.load("sentiment", "test", n=5)]
    h, mask = mp.mi.collect_hidden_states(model, tok, texts, batch_size=2)
    T = max(len(tok(t)["input_ids"]) for t in texts)
    assert h.shape == (3, 5, 3 + T, 32) and mask.shape == (5, 3 + T)
    assert (mask[:, :3] == 1).all() and (mask[:, -1] == 1).all()  # virtual tokens, then left-padded texts
