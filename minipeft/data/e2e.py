"""Table-to-text in the E2E NLG format (Novikova et al. 2017), generated from templates.

A meaning representation such as
``name[Clowns] eatType[coffee shop] food[Chinese] area[riverside] near[Clare Hall]``
is the prompt; several reference texts per table are written by different templates, and the
metric is corpus BLEU from ``sacrebleu`` against all references.
"""
from __future__ import annotations

import random

from .corpus import AREAS, EAT_TYPES, FOODS, LANDMARKS, PRICES, RATINGS, VENUES


def _mr(rng):
    mr = {"name": rng.choice(VENUES), "eatType": rng.choice(EAT_TYPES), "food": rng.choice(FOODS),
          "area": rng.choice(AREAS)}
    if rng.random() < 0.5:
        mr["priceRange"] = rng.choice(PRICES)
    if rng.random() < 0.5:
        mr["customer rating"] = rng.choice(RATINGS)
    if rng.random() < 0.5:
        mr["near"] = rng.choice(LANDMARKS)
    if rng.random() < 0.4:
        mr["familyFriendly"] = rng.choice(["yes", "no"])
    return mr


def _extras(mr, style):
    out = []
    if "priceRange" in mr:
        out.append([f"It has {mr['priceRange']} prices .", f"Prices are {mr['priceRange']} ."][style])
    if "customer rating" in mr:
        out.append([f"It has a customer rating of {mr['customer rating']} .",
                    f"Customers rate it {mr['customer rating']} ."][style])
    if "familyFriendly" in mr:
        ff = mr["familyFriendly"] == "yes"
        out.append([f"It is {'' if ff else 'not '}family friendly .",
                    f"It is {'a good' if ff else 'not a'} place for families ."][style])
    return out


def references(mr: dict) -> list[str]:
    """Three reference texts for one table."""
    n, e, f, a = mr["name"], mr["eatType"], mr["food"], mr["area"]
    near = f" near {mr['near']}" if "near" in mr else ""
    r1 = [f"{n} is a {e} serving {f} food in the {a}{near} ."] + _extras(mr, 0)
    r2 = [f"In the {a}{near} , there is a {f} {e} called {n} ."] + _extras(mr, 1)
    r3 = [f"{n} serves {f} food . It is a {e} in the {a}{near} ."] + _extras(mr, 0)
    return [" ".join(r) for r in (r1, r2, r3)]


def make_example(rng: random.Random) -> dict:
    mr = _mr(rng)
    table = " ".join(f"{k}[{v}]" for k, v in mr.items())
    refs = references(mr)
    return {"prompt": f"{table} Text:", "target": " " + refs[rng.randrange(len(refs))],
            "references": refs}


def generate(n: int, seed: int) -> list[dict]:
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        ex = make_example(rng)
        if ex["prompt"] not in seen:
            seen.add(ex["prompt"])
            out.append(ex)
    return out


def bleu(predictions: list[str], examples: list[dict]) -> dict:
    """Corpus BLEU (sacrebleu, default 13a tokenisation) against all references."""
    import sacrebleu

    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    preds = [p.split("\n")[0].strip() for p in predictions]
    k = max(len(ex["references"]) for ex in examples)
    refs = [[ex["references"][i] if i < len(ex["references"]) else ex["references"][0] for ex in examples]
            for i in range(k)]
    # force: our texts put spaces before periods on purpose (the templates are tokenised); without it sacrebleu
    # warns "you forgot to detokenize" on every call. It changes nothing in the score.
    return {"bleu": sacrebleu.corpus_bleu(preds, refs, force=True).score}
