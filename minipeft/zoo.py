"""Tiny pretrained base models that the project builds itself: offline, deterministic, cached.

* ``tiny-llama`` — transformers' ``LlamaForCausalLM`` (no biases, RMSNorm, RoPE, grouped KV heads),
  pretrained with next-token prediction.
* ``tiny-bert``  — transformers' BERT (biases, LayerNorms), pretrained with masked-LM; load it with
  ``num_labels=`` for sequence classification with a fresh head.

Both learn the template corpus of :mod:`minipeft.data.corpus` with a tokenizer trained on it by the
``tokenizers`` library, using the shared :class:`minipeft.train.Trainer`. The result is saved with
``save_pretrained`` so ``AutoModel*.from_pretrained(path)`` and ``AutoTokenizer.from_pretrained(path)``
load it exactly like a hub model. The cache lives in ``$MINIPEFT_CACHE`` (default
``~/.cache/minipeft``); each directory name carries a hash of its recipe, and builds happen under a
file lock with an atomic rename, so parallel processes never see a half-written model.

Any other name is a Hugging Face hub id passed through to the Auto classes.

Measured on a quiet 2-core machine (test split; fine-tuning with :class:`~minipeft.train.Trainer`,
linear schedule, 6% warmup; full tables: ``python -m minipeft.bench --only methods``):

=========================  ============================================  =====================
model / run                 recipe                                        result
=========================  ============================================  =====================
tiny-llama pretraining      1000 steps x 32 x 64 tokens, lr 3e-3          loss 1.086, 75 s (2 threads)
tiny-bert pretraining       900 steps MLM, lr 1e-3                        loss 3.95, 98 s (2 threads)
tiny-llama zero-shot        arithmetic, greedy                            3.3% exact match
tiny-llama full FT          1200 steps x 16, lr 1e-3                      99.7%
tiny-llama full FT          300 / 600 steps x 16, lr 1e-3                 77.3% / 92.3%
tiny-llama LoRA r=8 all     1200 steps x 16, lr 3e-3, alpha 32 / 16       99.7% / 90.0%
tiny-llama zero-shot        e2e, greedy                                   BLEU 0.3
tiny-llama full FT / LoRA   e2e, 600 steps x 16 (lr 1e-3 / 3e-3)          BLEU 99.0 / 93.6
tiny-bert random head       sentiment                                     47.2% accuracy
tiny-bert full FT           300 steps x 32, lr 3e-4                       98.8%
=========================  ============================================  =====================

(Builds always use ``BUILD_THREADS`` = 2 torch threads, so the same recipe gives the same weights on
any machine of the same CPU family: tiny-llama built with OMP_NUM_THREADS 1 and 2 has the same weights,
bit for bit, as the build the chapters were executed with. tiny-bert's vocabulary is learned by
``wordpiece_vocab``; before ZOO_VERSION 2 it came from a trainer that gave a different vocabulary on each
build, so the tiny-bert rows of this table are from such a build: rerun the bench to refresh them.) tiny-bert is weak: its masked-LM loss stays near 3.9 and a fill-mask probe shows
mostly context-free guesses ("the", "=", "+"), so bias-only tuning (BitFit) stays near chance
while adapters and full fine-tuning learn the task. Variants tried, none better (MLM loss 3.94 to
4.16, BitFit 47 to 54%): mask rate 0.3, lr 5e-4 or 2e-3, dropout 0, fewer arithmetic facts, extra
negated-opinion sentences. Sinusoidal initial position embeddings (scaled to the token embeddings)
leave the plateau sooner (MLM loss 3.22) but do not help either (BitFit 57.5%, full FT 83.5% on
validation). Earlier tiny-llama variants that did worse on arithmetic (full FT, 300
steps): ``fact_share=0.65, steps=1200`` 58.0%; ``fact_share=0.5, copy_share=0.3`` 44.7%.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from .data.corpus import CORPUS_VERSION, generate_corpus

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
        max_positions=256, n_docs=8000, block=64, batch_size=32, steps=900, lr=1e-3, seed=0,
        mask_prob=0.15, expected_seconds=170),
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


def _key(name: str, rec: dict) -> str:
    blob = json.dumps({"recipe": rec, "corpus": CORPUS_VERSION, "zoo": ZOO_VERSION}, sort_keys=True)
    return f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def path(name: str, **overrides) -> Path:
    """Directory of a zoo model, pretraining it first if it is not cached."""
    rec = recipe(name, **overrides)
    root = cache_dir()
    final = root / _key(name, rec)
    if (final / "config.json").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; the others wait here, then find it built
        try:
            if not (final / "config.json").exists():
                for stale in root.glob(f".{final.name}.*"):  # left by a build that was killed
                    if stale.is_dir():
                        shutil.rmtree(stale, ignore_errors=True)
                tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
                try:
                    build(name, tmp, **overrides)
                    os.replace(tmp, final)  # atomic: readers see all of it or none of it
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
    from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

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
        tok = _bert_tokenizer(docs, rec["vocab_size"], out_dir)
        ids = []
        for d in docs:
            ids += tok(d, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
        body = rec["block"] - 1  # each block is [CLS] + body
        n = len(ids) // body
        data = [{"input_ids": torch.tensor([tok.cls_token_id] + ids[i * body:(i + 1) * body])} for i in range(n)]
        collate = _MLMCollate(tok, rec["mask_prob"])
        cfg = BertConfig(
            vocab_size=len(tok), hidden_size=rec["hidden"], num_hidden_layers=rec["layers"],
            num_attention_heads=rec["heads"], intermediate_size=rec["intermediate"],
            max_position_embeddings=rec["max_positions"], pad_token_id=tok.pad_token_id)
        model = BertForMaskedLM(cfg)
    else:
        raise ValueError(f"unknown arch {rec['arch']!r}")
    trainer = Trainer(model, data, collate_fn=collate, lr=rec["lr"], max_steps=rec["steps"],
                      batch_size=rec["batch_size"], schedule="cosine", warmup=rec.get("warmup", OPTIONAL["warmup"]),
                      weight_decay=0.01, seed=rec["seed"], device="cpu", bf16=False, progress=False)
    hist = trainer.train()
    k = max(1, len(hist["loss"]) // 20)
    final = sum(hist["loss"][-k:]) / k  # mean of the last 5% of steps
    with _quiet_transformers(bars=False):
        model.save_pretrained(out_dir)  # safetensors + config.json
        tok.save_pretrained(out_dir)
    summary = {"name": name, "recipe": rec, "corpus_version": CORPUS_VERSION, "zoo_version": ZOO_VERSION,
               "train_tokens": len(data) * rec["block"], "final_loss": final,
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
def _quiet_transformers(bars: bool = True):
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


def load(name: str, num_labels: int | None = None, seed: int = 0, **kw):
    """``(model, tokenizer)``. Zoo names build on first use; other names go to the HF hub.

    ``num_labels``: a sequence-classification model with a fresh head, initialised from ``seed``.
    Other keyword arguments go to ``from_pretrained`` (e.g. ``torch_dtype``).
    """
    from transformers import (AutoModelForCausalLM, AutoModelForMaskedLM,
                              AutoModelForSequenceClassification, AutoTokenizer)

    if name in RECIPES:
        where = path(name)
        arch = RECIPES[name]["arch"]
    else:
        where, arch = name, None  # a hub id or a local directory
    tok = AutoTokenizer.from_pretrained(where)
    with _quiet_transformers(bars=name not in RECIPES), torch.random.fork_rng(devices=[]):
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
