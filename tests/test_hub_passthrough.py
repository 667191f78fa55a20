"""A hub model goes through the same code as the zoo's tiny ones, tested offline on a locally saved directory.

The chapters' Colab cell says: swap ``mp.zoo.load("tiny-llama")`` for ``mp.zoo.load("HuggingFaceTB/SmolLM2-135M")``.
A hub id and a local directory take the same path in ``zoo.load`` (the Auto classes' ``from_pretrained``), so
here the zoo's models are written with ``save_pretrained`` (model + tokenizer) and loaded back by directory
name, with the hub switched off: same logits as the original, LoRA with its default targets, a few Trainer
steps, then the adapter saved and loaded onto a fresh ``zoo.load(dir)`` gives the trained model's logits.
"""
import pytest
import torch

import minipeft as mp
from minipeft.zoo import quiet_transformers

TEXTS = ["Tom has 3 apples . 1 + 2 = 3 .", "The food was not good .", "Anna was happy ."]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No network: huggingface_hub reads HF_HUB_OFFLINE once, at import, so its constant is set as well (then
    every HTTP request it would make raises instead)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def save_locally(model, tok, where):
    with quiet_transformers(bars=False):
        model.save_pretrained(where)
        tok.save_pretrained(where)
    return str(where)


def load_quietly(where, **kw):
    with quiet_transformers(bars=False):
        return mp.zoo.load(where, **kw)


def batch(tok, labels=None):
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if labels is None:  # language modelling: padding ignored in the loss
        out["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    else:
        out["labels"] = torch.tensor(labels)
    return out


def train_save_reload(model, where, data, config, tmp_path, **load_kw):
    """Wrap with `config`, train 3 Trainer steps on `data`, save the adapter, load it onto a fresh base."""
    before = model(**data).logits.detach()
    peft_model = mp.wrap(model, config)
    hist = mp.Trainer(peft_model, [0, 1, 2], collate_fn=lambda _: data, lr=1e-2, max_steps=3, batch_size=3,
                      warmup=0.0, device="cpu", bf16=False, progress=False).train()
    assert len(hist["loss"]) == 3 and hist["loss"][-1] < hist["loss"][0]  # it learns
    peft_model.eval()
    trained = peft_model(**data).logits.detach()
    assert (trained - before).abs().max() > 1e-3  # training changed the function
    peft_model.save_adapter(tmp_path / "adapter")
    fresh, _ = load_quietly(where, **load_kw)
    reloaded = mp.load_adapter(fresh, tmp_path / "adapter")
    return trained, reloaded(**data).logits.detach()


def test_llama_directory_loads_like_the_hub_and_trains(tmp_path):
    model, tok = mp.zoo.load("tiny-llama")
    where = save_locally(model, tok, tmp_path / "llama")
    again, tok2 = load_quietly(where)
    assert type(again) is type(model) and again.config.tie_word_embeddings == model.config.tie_word_embeddings
    assert tok2(TEXTS)["input_ids"] == tok(TEXTS)["input_ids"]
    data = batch(tok)
    model.eval(), again.eval()
    torch.testing.assert_close(again(**data).logits, model(**data).logits, rtol=0, atol=0)
    config = mp.LoRAConfig(r=4, alpha=8)  # default targets: q_proj, v_proj, found by name as on SmolLM2
    trained, reloaded = train_save_reload(again, where, data, config, tmp_path)
    torch.testing.assert_close(reloaded, trained, rtol=0, atol=1e-6)


def test_bert_directory_with_a_classification_head(tmp_path):
    model, tok = mp.zoo.load("tiny-bert", num_labels=2)
    where = save_locally(model, tok, tmp_path / "bert")
    again, _ = load_quietly(where, num_labels=2)
    assert type(again).__name__ == "BertForSequenceClassification"
    data = batch(tok, labels=[1, 0, 1])
    model.eval(), again.eval()
    # the saved head is read back (not a fresh one)
    torch.testing.assert_close(again(**data).logits, model(**data).logits, rtol=0, atol=0)
    config = mp.LoRAConfig(r=4, alpha=8, modules_to_save=["classifier"])  # default targets: query, value
    trained, reloaded = train_save_reload(again, where, data, config, tmp_path, num_labels=2)
    torch.testing.assert_close(reloaded, trained, rtol=0, atol=1e-6)


def test_a_masked_lm_directory_loads_as_a_masked_lm(tmp_path):
    """bert-base-uncased's config names BertForMaskedLM; the causal-LM Auto class would give BertLMHeadModel."""
    model, tok = mp.zoo.load("tiny-bert")
    where = save_locally(model, tok, tmp_path / "bert-mlm")
    again, _ = load_quietly(where)
    assert type(again).__name__ == "BertForMaskedLM"
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    model.eval(), again.eval()
    torch.testing.assert_close(again(**enc).logits, model(**enc).logits, rtol=0, atol=0)


def test_a_missing_directory_fails_offline_without_downloading(tmp_path):
    with pytest.raises(OSError):
        mp.zoo.load(str(tmp_path / "no-such-model"))
