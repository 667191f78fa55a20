"""Tiny pretrained base models that the project builds itself: offline, deterministic, cached.

* ``tiny-llama`` — transformers' ``LlamaForCausalLM`` (no biases, RMSNorm, RoPE, grouped KV heads),
  pretrained with next-token prediction.
* ``tiny-bert``  — transformers' BERT (biases, LayerNorms), pretrained with masked LM plus a next-clause
  objective that trains its pooler (see ``_BertPretraining``); load it with ``num_labels=`` for sequence
  classification with a fresh head on top of the trained pooler.

Both learn the template corpus of :mod:`minipeft.data.corpus` with a tokenizer trained on it, using the
shared :class:`minipeft.train.Trainer`. The result is saved with ``save_pretrained`` so
``AutoModel*.from_pretrained(path)`` and ``AutoTokenizer.from_pretrained(path)`` load it exactly like a hub
model. The cache lives in ``$MINIPEFT_CACHE`` (default ``~/.cache/minipeft``); each directory name carries a
hash of its recipe, and builds happen under a file lock with an atomic rename (``build_once``), so parallel
processes never see a half-written model. Any other name is a Hugging Face hub id passed to the Auto classes.

Why tiny-bert has a sentence objective. Masked LM never trains BERT's pooler (the dense + tanh layer over
[CLS] that the classification head reads); BERT's own recipe trains it with next-sentence prediction. Before
its recipe gained tune_steps) tiny-bert had MLM only: its pooler stayed random, a linear probe on frozen features scored
about 60% on sentiment and BitFit stayed at chance. Two sentence objectives were tried: next-sentence
prediction with polarity-flipped continuations as negatives never left chance (telling a fitting from a
clashing continuation is a parity of three polarities), while predicting the next clause's content words
from the pooled clause (a small relative of Skip-Thought) learns polarity once the learning rate is small,
hence the second, gentler phase of the recipe. What the fine-tuning runs score on it is measured by
:mod:`minipeft.runs` and printed in the chapters, not written here.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
import types
from collections import Counter
from pathlib import Path

import torch

from .data.corpus import CORPUS_VERSION, NAMES, generate_corpus, opinion_pair

ZOO_VERSION = 2  # bump when the build code changes what a recipe produces (2: 2 threads, own WordPiece)
# Float sums depend on how a matmul splits its work between threads: the same recipe built with 1 and with 2
# threads gives different weights (seen: loss 1.0885 vs 1.0862, zero-shot arithmetic 3.3% vs 0.3%). The
# build therefore always runs with this many threads, whatever the machine or OMP_NUM_THREADS say, so that
# every reader (laptop, CI, Colab) gets the same weights from the same recipe. Different CPU instruction
# sets (AVX2 vs AVX-512) can still round differently: then numbers agree within noise, not bit for bit.
BUILD_THREADS = 2

RECIPES = {
    "tiny-llama": dict(
        arch="llama", vocab_size=768, hidden=128, layers=4, heads=4, kv_heads=2, intermediate=352,
        max_positions=256, n_docs=8000, block=64, batch_size=32, steps=1000, lr=3e-3, seed=0,
        expected_seconds=75),
    "tiny-bert": dict(
        arch="bert", vocab_size=768, hidden=128, layers=4, heads=4, intermediate=512,
        max_positions=256, n_docs=8000, block=64, batch_size=32, steps=1000, lr=1e-3, seed=0,
        mask_prob=0.15, tune_steps=500, tune_lr=3e-4, expected_seconds=170),
}


def names() -> list[str]:
    return list(RECIPES)


def cache_dir() -> Path:
    return Path(os.environ.get("MINIPEFT_CACHE", Path.home() / ".cache" / "minipeft")).expanduser()


# Optional recipe keys and their defaults. A recipe only names (and hashes) them when it changes
# them, so adding a key here leaves every cached model valid.
OPTIONAL = {"fact_share": 0.45, "copy_share": 0.0, "warmup": 0.05}


def recipe(name: str, **overrides) -> dict:
    if name not in RECIPES:
        raise ValueError(f"unknown zoo model {name!r}; choose from {names()}")
    bad = set(overrides) - set(RECIPES[name]) - set(OPTIONAL)
    if bad:
        raise ValueError(f"unknown recipe keys {sorted(bad)} for {name}")
    return {**RECIPES[name], **overrides}


def key(name: str, rec: dict) -> str:
    """The cache directory name of zoo model `name` built from recipe `rec` (name + hash of recipe and code)."""
    blob = json.dumps({"recipe": rec, "corpus": CORPUS_VERSION, "zoo": ZOO_VERSION}, sort_keys=True)
    return f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def path(name: str, **overrides) -> Path:
    """Directory of a zoo model, pretraining it first if it is not cached."""
    rec = recipe(name, **overrides)
    return build_once(cache_dir() / key(name, rec), lambda tmp: build(name, tmp, **overrides))


def build_once(final: Path, build_into) -> Path:
    """``final`` if it holds a finished build, else ``build_into(tmp)`` and rename ``tmp`` to ``final``.

    One process builds under a file lock while the others wait, then find it built; the rename is atomic,
    so no reader ever sees a half-written directory. A build's marker file is ``done.json`` or
    ``config.json`` (the zoo's models)."""
    def finished():
        return (final / "config.json").exists() or (final / "done.json").exists()

    if finished():
        return final
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not finished():
                for stale in root.glob(f".{final.name}.*"):  # left by a build that was killed
                    if stale.is_dir():
                        shutil.rmtree(stale, ignore_errors=True)
                tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
                try:
                    build_into(tmp)
                    os.replace(tmp, final)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final


# ---- tokenizers -------------------------------------------------------------------------------
def _llama_tokenizer(docs, vocab_size):
    """Byte-level BPE (no unknown tokens), every digit its own token, bos added on encode."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r" ?[0-9]"), behavior="isolated"),  # "Ġ1", "2": one token a digit
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tok.train_from_iterator(docs, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="right")


def _bert_tokenizer(docs, vocab_size, workdir):
    """WordPiece like BERT's (lowercased), loaded as a real ``BertTokenizerFast``.

    The vocabulary is learned here, not by the ``tokenizers`` library's WordPiece trainer: that trainer
    breaks ties between equally frequent merges in a different order on every run (three runs on the same
    corpus gave three different vocabularies), so tiny-bert's token ids, and with them its weights and
    every number of the BERT chapters, changed from one build to the next."""
    from tokenizers import normalizers, pre_tokenizers
    from transformers import BertTokenizerFast

    norm, pretok = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = Counter(w for d in docs for w, _ in pretok.pre_tokenize_str(norm.normalize_str(d)))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + wordpiece_vocab(words, vocab_size - 5)
    (Path(workdir) / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast.from_pretrained(str(workdir), do_lower_case=True)


def wordpiece_vocab(words: Counter, size: int) -> list[str]:
    """Greedy merges as WordPiece's trainer makes them, with ties broken by the pair's spelling.

    Each word starts as its characters, the non-initial ones marked "##" ("cat" → c ##a ##t); the most
    frequent adjacent pair is merged (c ##a → ca) until the vocabulary has `size` entries or nothing is
    left to merge."""
    split = {w: [w[0]] + ["##" + c for c in w[1:]] for w in words}
    vocab = sorted({piece for pieces in split.values() for piece in pieces})
    known = set(vocab)
    while len(vocab) < size:
        pairs = Counter()
        for w, pieces in split.items():
            for a, b in zip(pieces, pieces[1:]):
                pairs[a, b] += words[w]
        if not pairs:
            break
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        merged = a + b[2:]
        for w, pieces in split.items():
            i, out = 0, []
            while i < len(pieces):
                if i + 1 < len(pieces) and pieces[i] == a and pieces[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(pieces[i])
                    i += 1
            split[w] = out
        if merged not in known:
            known.add(merged)
            vocab.append(merged)
    return vocab


# ---- pretraining data -------------------------------------------------------------------------
def _blocks(ids: list[int], block: int) -> list[dict]:
    n = len(ids) // block
    t = torch.tensor(ids[: n * block]).view(n, block)
    return [{"input_ids": row} for row in t]


def _causal_collate(examples):
    x = torch.stack([e["input_ids"] for e in examples])
    return {"input_ids": x, "labels": x}  # HF shifts labels inside the model


_FUNCTION_WORDS = [".", ",", ":", "so", "was", "is", "the", "a", "an", "he", "she", "it", "to", "for", "all", "and", "of", "in", "at"]


def _next_clause_pairs(tok, docs, opinions, rng) -> list[dict]:
    """(clause, words of the next clause) token ids: consecutive sentences of the corpus, and opinion pairs.

    The targets are the next clause's content words: names, pronouns, articles and punctuation are dropped
    (they say nothing about what happened next, and would drown the words that do)."""
    def enc(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    stop = set(tok.convert_tokens_to_ids([w.lower() for w in NAMES] + _FUNCTION_WORDS))

    pairs = [(a, b) for a, b in opinions]
    for d in docs:
        parts = [p.strip() + " ." for p in d.split(" . ") if p.strip(" .")]
        pairs += list(zip(parts, parts[1:]))
    rng.shuffle(pairs)
    out = [{"clause": [tok.cls_token_id] + enc(a)[:30] + [tok.sep_token_id],
            "next": [t for t in enc(b) if t not in stop]} for a, b in pairs]
    return [p for p in out if p["next"]]


class _MLMCollate:
    """BERT's masking: 15% of tokens are targets; of those 80% [MASK], 10% random, 10% kept."""

    def __init__(self, tokenizer, p):
        self.tok, self.p = tokenizer, p
        self.special = torch.tensor(sorted(tokenizer.all_special_ids))

    def __call__(self, examples):
        x = torch.stack([e["input_ids"] for e in examples])
        labels = x.clone()
        target = (torch.rand(x.shape) < self.p) & ~torch.isin(x, self.special)
        labels[~target] = -100
        r = torch.rand(x.shape)
        x = x.clone()
        x[target & (r < 0.8)] = self.tok.mask_token_id
        rand = target & (r >= 0.8) & (r < 0.9)
        x[rand] = torch.randint(len(self.tok), x.shape)[rand]
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": labels}


class _BertPretraining(torch.nn.Module):
    """Masked LM on corpus blocks plus a next-clause objective that trains the pooler.

    The next-clause objective reads one clause alone (``[CLS] clause [SEP]``, the shape a sentence
    classifier sees) and predicts the words of the clause that followed it from the pooled [CLS] vector,
    through the masked-LM output layer: cross-entropy against the next clause's bag of words. It is a small
    relative of Skip-Thought (Kiros et al., 2015); here it is what teaches the pooler, which masked LM never
    touches, and what gives polarity a reason to be in it (an opinion predicts its consequence)."""

    def __init__(self, model, blocks, pairs, mlm_collate):
        super().__init__()
        self.model, self.blocks, self.pairs, self.mlm = model, blocks, pairs, mlm_collate

    def collate(self, indices):
        batch = self.mlm([self.blocks[i % len(self.blocks)] for i in indices])
        pairs = [self.pairs[i % len(self.pairs)] for i in indices]
        pad = torch.nn.utils.rnn.pad_sequence
        clause = pad([torch.tensor(p["clause"]) for p in pairs], batch_first=True, padding_value=self.mlm.tok.pad_token_id)
        bow = torch.zeros(len(pairs), self.model.config.vocab_size)
        for row, p in enumerate(pairs):
            bow[row].index_add_(0, torch.tensor(p["next"]), torch.ones(len(p["next"])))
        batch.update(clause=clause, clause_mask=(clause != self.mlm.tok.pad_token_id).long(),
                     next_words=bow / bow.sum(-1, keepdim=True))
        return batch

    def forward(self, input_ids, attention_mask, labels, clause, clause_mask, next_words):
        bert, head = self.model.bert, self.model.cls.predictions
        mlm = head(bert(input_ids, attention_mask=attention_mask).last_hidden_state)
        mlm_loss = torch.nn.functional.cross_entropy(mlm.flatten(0, 1), labels.flatten(), ignore_index=-100)
        pooled = bert(clause, attention_mask=clause_mask).pooler_output
        next_loss = -(next_words * head(pooled).log_softmax(-1)).sum(-1).mean()
        return types.SimpleNamespace(loss=mlm_loss + next_loss, mlm_loss=mlm_loss, next_loss=next_loss)


def build(name: str, out_dir, **overrides) -> dict:
    """Pretrain one zoo model into ``out_dir``; returns a summary (also saved as zoo_build.json)."""
    rec = recipe(name, **overrides)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"pretraining {name} (first use; took {rec['expected_seconds']} s on a quiet 2-core CPU)...", flush=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)  # the same weights on every machine (see BUILD_THREADS)
    try:
        return _build(name, rec, out_dir)
    finally:
        torch.set_num_threads(threads)


def _build(name: str, rec: dict, out_dir: Path) -> dict:
    from transformers import BertConfig, BertForPreTraining, LlamaConfig, LlamaForCausalLM

    from .train import Trainer, set_seed

    t0 = time.perf_counter()
    set_seed(rec["seed"])
    docs = generate_corpus(rec["n_docs"], seed=rec["seed"], fact_share=rec.get("fact_share", OPTIONAL["fact_share"]),
                           copy_share=rec.get("copy_share", OPTIONAL["copy_share"]))
    if rec["arch"] == "llama":
        tok = _llama_tokenizer(docs, rec["vocab_size"])
        ids = []
        for d in docs:
            ids += tok(d)["input_ids"] + [tok.eos_token_id]
        data, collate = _blocks(ids, rec["block"]), _causal_collate
        cfg = LlamaConfig(
            vocab_size=len(tok), hidden_size=rec["hidden"], num_hidden_layers=rec["layers"],
            num_attention_heads=rec["heads"], num_key_value_heads=rec["kv_heads"],
            intermediate_size=rec["intermediate"], max_position_embeddings=rec["max_positions"],
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            tie_word_embeddings=True, attention_bias=False, mlp_bias=False)
        model = LlamaForCausalLM(cfg)
    elif rec["arch"] == "bert":
        rng = random.Random(rec["seed"])
        opinions = [opinion_pair(rng) for _ in range(rec["n_docs"] * 3)]
        texts = docs + [f"{a} {b}" for a, b in opinions]  # masked LM reads the opinions in context too
        tok = _bert_tokenizer(texts, rec["vocab_size"], out_dir)
        ids = []
        for d in texts:
            ids += tok(d, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
        body = rec["block"] - 1  # each block is [CLS] + body
        blocks = [{"input_ids": torch.tensor([tok.cls_token_id] + ids[i * body:(i + 1) * body])}
                  for i in range(len(ids) // body)]
        cfg = BertConfig(
            vocab_size=len(tok), hidden_size=rec["hidden"], num_hidden_layers=rec["layers"],
            num_attention_heads=rec["heads"], intermediate_size=rec["intermediate"],
            max_position_embeddings=rec["max_positions"], pad_token_id=tok.pad_token_id)
        model = BertForPreTraining(cfg)  # its encoder, pooler and masked-LM head are trained and saved
        objectives = _BertPretraining(model, blocks, _next_clause_pairs(tok, docs, opinions, rng),
                                      _MLMCollate(tok, rec["mask_prob"]))
        data, collate = list(range(max(len(blocks), len(objectives.pairs)))), objectives.collate
    else:
        raise ValueError(f"unknown arch {rec['arch']!r}")
    trainee = objectives if rec["arch"] == "bert" else model
    trainer = Trainer(trainee, data, collate_fn=collate, lr=rec["lr"], max_steps=rec["steps"],
                      batch_size=rec["batch_size"], schedule="cosine", warmup=rec.get("warmup", OPTIONAL["warmup"]),
                      weight_decay=0.01, seed=rec["seed"], device="cpu", bf16=False, progress=False)
    hist = trainer.train()
    if rec.get("tune_steps"):  # a second, gentler phase: the next-clause objective needs a small learning rate
        tune = Trainer(trainee, data, collate_fn=collate, lr=rec["tune_lr"], max_steps=rec["tune_steps"],
                       batch_size=rec["batch_size"], schedule="cosine", warmup=0.1, weight_decay=0.01,
                       seed=rec["seed"] + 1, device="cpu", bf16=False, progress=False).train()
        hist = {k: hist[k] + tune[k] for k in ("loss", "step_time")}
    k = max(1, len(hist["loss"]) // 20)
    final = sum(hist["loss"][-k:]) / k  # mean of the last 5% of steps
    extra = {}
    if rec["arch"] == "bert":  # the two objectives apart, on 8 batches (the saved weights are final already)
        with torch.no_grad():
            outs = [trainee(**collate(range(i * 32, (i + 1) * 32))) for i in range(8)]
        final = sum(o.mlm_loss.item() for o in outs) / len(outs)
        extra["next_clause_loss"] = sum(o.next_loss.item() for o in outs) / len(outs)
    with quiet_transformers(bars=False):
        model.save_pretrained(out_dir)  # safetensors + config.json
        tok.save_pretrained(out_dir)
    summary = {"name": name, "recipe": rec, "corpus_version": CORPUS_VERSION, "zoo_version": ZOO_VERSION,
               "final_loss": final, **extra,  # next-token or masked-LM loss
               "final_perplexity": float(torch.tensor(final).exp()),
               "seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__,
               # the fastest steps are the best guess of a quiet machine's speed when it is busy
               "step_seconds_min": min(hist["step_time"]),
               "step_seconds_median": sorted(hist["step_time"])[len(hist["step_time"]) // 2],
               "threads": torch.get_num_threads()}
    (out_dir / "zoo_build.json").write_text(json.dumps(summary, indent=2))
    print(f"pretrained {name} in {summary['seconds']} s: final loss {final:.3f} "
          f"(perplexity {summary['final_perplexity']:.2f})", flush=True)
    return summary


@contextlib.contextmanager
def quiet_transformers(bars: bool = True):
    """Warnings off; progress bars off too unless ``bars`` (keep them for hub downloads)."""
    from transformers.utils import logging

    old, had_bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    if not bars:
        logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" for a local file
    try:
        yield
    finally:
        logging.set_verbosity(old)
        if had_bars and not bars:
            logging.enable_progress_bar()


def is_masked_lm(config) -> bool:
    """Whether a hub/local model was saved as an encoder with a masked-LM head (BERT, RoBERTa), read from the
    ``architectures`` its config.json names. Such a model loads with ``AutoModelForMaskedLM``: the causal-LM
    Auto class would also accept BERT, but gives ``BertLMHeadModel``, a decoder head it was not trained as."""
    return any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in getattr(config, "architectures", None) or [])


def load(name: str, num_labels: int | None = None, seed: int = 0, **kw):
    """``(model, tokenizer)``. Zoo names build on first use; any other name is a hub id or a local directory
    written by ``save_pretrained`` (tests/test_hub_passthrough.py saves the zoo's models and loads them back
    this way). A model whose config names a masked-LM architecture loads as one (see ``is_masked_lm``).

    ``num_labels``: a sequence-classification model with a fresh head, initialised from ``seed``.
    Other keyword arguments go to ``from_pretrained`` (e.g. ``torch_dtype``).
    """
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM,
                              AutoModelForSequenceClassification, AutoTokenizer)

    if name in RECIPES:
        where = path(name)
        arch = RECIPES[name]["arch"]
    else:
        where = name  # a hub id or a local directory
        arch = "bert" if is_masked_lm(AutoConfig.from_pretrained(where)) else None
    tok = AutoTokenizer.from_pretrained(where)
    with quiet_transformers(bars=name not in RECIPES), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if num_labels is not None:
            model = AutoModelForSequenceClassification.from_pretrained(where, num_labels=num_labels, **kw)
        elif arch == "bert":
            model = AutoModelForMaskedLM.from_pretrained(where, **kw)
        else:
            model = AutoModelForCausalLM.from_pretrained(where, **kw)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    if name in RECIPES:  # record the zoo name, not this machine's cache path (it ends up in adapter files)
        model.config._name_or_path = name
    return model, tok
