"""Arithmetic word problems in the styles of AddSub, MultiArith and SingleEq.

* ``addsub``     — one addition or subtraction step (AddSub, Hosseini et al. 2014)
* ``singleeq``   — one equation, including multiplication and division (SingleEq, Koncel-Kedziorski 2015)
* ``multiarith`` — two steps (MultiArith, Roy & Roth 2015)

The prompt is ``"Question: <story> Answer:"``; the target states the equation(s) before the number,
e.g. ``" 3 * 4 = 12 , 12 + 5 = 17"``. The metric is exact match of the final number in a greedy
generation. Every number and intermediate result stays in 0..20, the range of the arithmetic facts
in the pretraining corpus, so a model only has to learn the mapping from story to operation.
"""
from __future__ import annotations

import random
import re

from .corpus import CONTAINERS, MAX_NUM, NAMES, OBJECTS, PLACES, PRONOUN

STYLES = ("addsub", "singleeq", "multiarith")


def _people(rng):
    n, m = rng.sample(NAMES, 2)
    return n, m, PRONOUN[n].capitalize()


def _addsub(rng):
    n, m, p = _people(rng)
    obj, place = rng.choice(OBJECTS), rng.choice(PLACES)
    t = rng.randrange(5)
    if t in (0, 1, 2):  # addition
        a = rng.randint(1, MAX_NUM - 1)
        b = rng.randint(1, MAX_NUM - a)
        story = [
            f"{n} has {a} {obj} . {p} buys {b} more {obj} . How many {obj} does {n} have now ?",
            f"There are {a} {obj} in the {place} . {n} puts {b} more {obj} in the {place} . "
            f"How many {obj} are in the {place} now ?",
            f"{n} picked {a} {obj} and {m} picked {b} {obj} . How many {obj} did they pick in total ?",
        ][t]
        return story, [(a, "+", b)]
    a = rng.randint(2, MAX_NUM)
    b = rng.randint(1, a - 1)
    story = [
        f"{n} had {a} {obj} . {p} gave {b} {obj} to {m} . How many {obj} does {n} have left ?",
        f"There were {a} {obj} in the {place} . {n} took {b} of them . "
        f"How many {obj} are in the {place} now ?",
    ][t - 3]
    return story, [(a, "-", b)]


def _singleeq(rng):
    n, m, p = _people(rng)
    obj, cont = rng.choice(OBJECTS), rng.choice(CONTAINERS)
    t = rng.randrange(5)
    if t in (0, 1):  # a * b
        a = rng.randint(2, 10)
        b = rng.randint(2, MAX_NUM // a)
        story = [
            f"{n} buys {a} {cont}s with {b} {obj} in each {cont} . How many {obj} does {n} buy ?",
            f"Each {cont} holds {b} {obj} . How many {obj} are in {a} {cont}s ?",
        ][t]
        return story, [(a, "*", b)]
    if t in (2, 3):  # c / b
        b = rng.randint(2, 10)
        q = rng.randint(1, MAX_NUM // b)
        c = b * q
        story = [
            f"{n} shares {c} {obj} equally among {b} friends . How many {obj} does each friend get ?",
            f"{n} puts {c} {obj} into {b} {cont}s with the same number in each . "
            f"How many {obj} are in each {cont} ?",
        ][t - 2]
        return story, [(c, "/", b)]
    a = rng.randint(2, MAX_NUM)
    b = rng.randint(1, a - 1)
    return (f"{n} has {a} {obj} . {m} has {b} fewer {obj} than {n} . How many {obj} does {m} have ?",
            [(a, "-", b)])


def _multiarith(rng):
    n, m, p = _people(rng)
    obj, cont = rng.choice(OBJECTS), rng.choice(CONTAINERS)
    t = rng.randrange(4)
    if t == 0:  # (a + b) - c
        a = rng.randint(1, MAX_NUM - 1)
        b = rng.randint(1, MAX_NUM - a)
        c = rng.randint(1, a + b)
        return (f"{n} has {a} {obj} . {p} buys {b} more and then gives {c} to {m} . "
                f"How many {obj} does {n} have now ?", [(a, "+", b), ("t", "-", c)])
    if t == 1:  # a * b - c
        a = rng.randint(2, 10)
        b = rng.randint(2, MAX_NUM // a)
        c = rng.randint(1, a * b)
        return (f"{n} buys {a} {cont}s with {b} {obj} in each {cont} . {p} eats {c} of them . "
                f"How many {obj} are left ?", [(a, "*", b), ("t", "-", c)])
    if t == 2:  # a * b + c
        a = rng.randint(2, 10)
        b = rng.randint(2, MAX_NUM // a)
        c = rng.randint(1, MAX_NUM - a * b) if a * b < MAX_NUM else 0
        if c == 0:
            return _multiarith(rng)
        return (f"{n} has {a} {cont}s with {b} {obj} in each {cont} and {c} loose {obj} . "
                f"How many {obj} does {n} have ?", [(a, "*", b), ("t", "+", c)])
    # (a - b) + c
    a = rng.randint(2, MAX_NUM)
    b = rng.randint(1, a - 1)
    c = rng.randint(1, MAX_NUM - (a - b))
    return (f"{n} had {a} {obj} . {p} lost {b} of them and then found {c} more . "
            f"How many {obj} does {n} have now ?", [(a, "-", b), ("t", "+", c)])


_OPS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y,
        "/": lambda x, y: x // y}


def _solve(steps):
    """Write the equation chain, e.g. ' 3 * 4 = 12 , 12 + 5 = 17', and return (target, answer)."""
    parts, t = [], None
    for x, op, y in steps:
        x = t if x == "t" else x
        t = _OPS[op](x, y)
        parts.append(f"{x} {op} {y} = {t}")
    return " " + " , ".join(parts), t


def make_example(rng: random.Random, style: str) -> dict:
    story, steps = {"addsub": _addsub, "singleeq": _singleeq, "multiarith": _multiarith}[style](rng)
    target, answer = _solve(steps)
    return {"prompt": f"Question: {story} Answer:", "target": target, "answer": str(answer),
            "style": style}


def generate(n: int, seed: int) -> list[dict]:
    """``n`` distinct examples, styles in turn (so every split has all three)."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        ex = make_example(rng, STYLES[len(out) % len(STYLES)])
        if ex["prompt"] not in seen:
            seen.add(ex["prompt"])
            out.append(ex)
    return out


_NUM = re.compile(r"-?\d+")


def final_number(text: str) -> str | None:
    """The last integer in ``text`` (stops at a newline or a new 'Question:'), or None."""
    text = text.split("Question:")[0].split("\n")[0]
    nums = _NUM.findall(text)
    return nums[-1] if nums else None


def exact_match(predictions: list[str], examples: list[dict]) -> dict:
    """Exact match of the final number, overall and per style (in %)."""
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    hits = [final_number(p) == ex["answer"] for p, ex in zip(predictions, examples)]
    out = {"exact_match": 100.0 * sum(hits) / max(len(hits), 1)}
    for s in STYLES:
        h = [x for x, ex in zip(hits, examples) if ex["style"] == s]
        if h:
            out[f"exact_match_{s}"] = 100.0 * sum(h) / len(h)
    return out
