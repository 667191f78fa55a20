"""Two-class sentiment of short template sentences (label 1 = positive, 0 = negative).

Variety comes from many frames, adjectives, intensifiers and negation ("was not good" is negative,
"was not bad" is positive, "did not like" flips a verb), so a bag of words is not enough.
The pretraining corpus has these words in context but never a label.
"""
from __future__ import annotations

import random

from .corpus import DISHES, NAMES, NEG_VERBS, NEGATIVE, POS_VERBS, POSITIVE, THINGS, VENUES

LABELS = ("negative", "positive")
_BASE = {"loved": "love", "enjoyed": "enjoy", "liked": "like", "adored": "adore", "hated": "hate",
         "disliked": "dislike", "regretted": "regret", "avoided": "avoid"}
_INTENS = ["", "", "really ", "very ", "quite ", "truly "]


def make_example(rng: random.Random) -> dict:
    label = rng.randrange(2)
    negate = rng.random() < 0.35
    # the words carry the opposite polarity when the sentence negates them
    word_pos = bool(label) != negate
    adj = rng.choice(POSITIVE if word_pos else NEGATIVE)
    verb = rng.choice(POS_VERBS if word_pos else NEG_VERBS)
    thing, dish, venue, name = rng.choice(THINGS), rng.choice(DISHES), rng.choice(VENUES), rng.choice(NAMES)
    inten = "" if negate else rng.choice(_INTENS)
    neg = "not " if negate else ""
    t = rng.randrange(6)
    if t == 0:
        text = f"the {thing} was {neg}{inten}{adj} ."
    elif t == 1:
        text = f"{name} {'did not ' + _BASE[verb] if negate else verb} the {dish} at {venue} ."
    elif t == 2:
        text = f"i think the {dish} at {venue} is {neg}{inten}{adj} ."
    elif t == 3:
        text = f"overall , {venue} was {neg}{inten}{adj} and i would {'' if label else 'not '}go back ."
    elif t == 4:
        text = f"our {thing} was {neg}{inten}{adj} , said {name} ."
    else:
        text = f"the {thing} and the {rng.choice(THINGS)} were {neg}{inten}{adj} ."
    return {"text": text, "label": label}


def generate(n: int, seed: int) -> list[dict]:
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        ex = make_example(rng)
        if ex["text"] not in seen:
            seen.add(ex["text"])
            out.append(ex)
    return out


def accuracy(predictions: list[int], examples: list[dict]) -> dict:
    """Accuracy in % (predictions are class ids)."""
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    hits = [int(p) == ex["label"] for p, ex in zip(predictions, examples)]
    return {"accuracy": 100.0 * sum(hits) / max(len(hits), 1)}


# ---- the same sentences with the label as words to generate ------------------------------------------
# The label words a causal LM generates: words of the pretraining corpus, one token each in the zoo's
# tokenizer (" positive" / " negative" never occur there and take six character pieces each).
WORDS = ("bad", "good")


def as_words(example: dict) -> dict:
    """The example with a generation prompt and the label's word as target: "Sentence: ... Sentiment:" →
    " good" / " bad" (the label as a token, for a causal LM; the pooled-head comparison)."""
    return dict(example, prompt=f"Sentence: {example['text']} Sentiment:", target=" " + WORDS[example["label"]])


def generate_words(n: int, seed: int) -> list[dict]:
    """The same examples as `generate(n, seed)`, in the same order (so the same splits), as `as_words`."""
    return [as_words(ex) for ex in generate(n, seed)]


def label_word(text: str) -> int | None:
    """The class whose word starts a generation (" good ..." → 1), or None."""
    words = text.strip().split()
    return WORDS.index(words[0]) if words and words[0] in WORDS else None


def word_accuracy(predictions: list[str], examples: list[dict]) -> dict:
    """Accuracy in % of generated label words (the first word must be the label's word)."""
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    hits = [label_word(p) == ex["label"] for p, ex in zip(predictions, examples)]
    return {"accuracy": 100.0 * sum(hits) / max(len(hits), 1)}
