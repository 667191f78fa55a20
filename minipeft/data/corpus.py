"""The pretraining corpus of the zoo models: a template grammar of simple English.

Everything the tiny base models know comes from here: people, objects, food, places and
restaurants, counting sentences, plain arithmetic facts ("7 + 5 = 12 ."), sentences that repeat a
number said earlier (so the model learns to copy numbers from its context, which word problems
need), and sentences with positive and negative words. It deliberately contains none of the downstream formats
(no "Question: ... Answer:" word problems, no sentiment labels, no ``name[...]`` tables), so
fine-tuning has something to learn. Bump ``CORPUS_VERSION`` whenever the output changes: the zoo
cache key includes it, so the models rebuild.
"""
from __future__ import annotations

import random

CORPUS_VERSION = 1

NAMES = ["Tom", "Anna", "Ben", "Mia", "Sam", "Lily", "Jack", "Emma", "Noah", "Zoe", "Leo", "Ruby",
         "Max", "Ella", "Omar", "Nina", "Ravi", "Sara", "Ivan", "Lucy"]
PRONOUN = {n: ("she" if n in {"Anna", "Mia", "Lily", "Emma", "Zoe", "Ruby", "Ella", "Nina", "Sara",
                              "Lucy"} else "he") for n in NAMES}
OBJECTS = ["apples", "pears", "books", "pens", "cards", "stamps", "marbles", "cookies", "eggs",
           "flowers", "balloons", "shells", "stickers", "candies", "toys", "coins"]
CONTAINERS = ["bag", "box", "basket", "jar", "bowl"]
PLACES = ["park", "garden", "kitchen", "school", "library", "market", "house", "yard", "shop",
          "classroom"]
FOODS = ["Chinese", "Italian", "French", "Indian", "Japanese", "English", "fast food"]
DISHES = ["pasta", "soup", "pizza", "curry", "salad", "bread", "cake", "rice", "fish", "noodles"]
EAT_TYPES = ["restaurant", "coffee shop", "pub"]
AREAS = ["riverside", "city centre"]
PRICES = ["cheap", "moderate", "high"]
RATINGS = ["1 out of 5", "3 out of 5", "5 out of 5"]
VENUES = ["The Eagle", "The Mill", "Clowns", "Aromi", "The Phoenix", "Zizzi", "The Punter",
          "Giraffe", "The Wrestlers", "Cotto", "Alimentum", "The Cricketers", "Bibimbap House",
          "The Golden Curry", "Browns Cambridge", "Fitzbillies", "The Olive Grove", "Loch Fyne"]
LANDMARKS = ["Clare Hall", "the river", "Burger King", "the Rice Boat", "Cafe Rouge",
             "Raja Indian Cuisine", "the Crowne Plaza Hotel", "All Bar One", "the Sorrento"]
THINGS = ["food", "service", "movie", "book", "film", "music", "hotel", "room", "pasta", "soup",
          "show", "game", "staff", "coffee", "pizza", "trip", "song", "story", "meal", "view"]
POSITIVE = ["good", "great", "wonderful", "excellent", "lovely", "amazing", "fantastic", "nice",
            "delightful", "superb", "pleasant", "brilliant"]
NEGATIVE = ["bad", "terrible", "awful", "horrible", "poor", "boring", "dreadful", "disappointing",
            "unpleasant", "mediocre", "bland", "rude"]
POS_VERBS = ["loved", "enjoyed", "liked", "adored"]
NEG_VERBS = ["hated", "disliked", "regretted", "avoided"]

MAX_NUM = 20  # every number and every result in the arithmetic facts stays in 0..20


def arithmetic_facts() -> list[str]:
    """All facts a o b = c with operands and result in 0..MAX_NUM (division exact)."""
    facts = []
    for a in range(MAX_NUM + 1):
        for b in range(MAX_NUM + 1):
            if a + b <= MAX_NUM:
                facts.append(f"{a} + {b} = {a + b} .")
            if a - b >= 0:
                facts.append(f"{a} - {b} = {a - b} .")
            if 1 <= a * b <= MAX_NUM and a >= 1 and b >= 1:
                facts.append(f"{a} * {b} = {a * b} .")
                facts.append(f"{a * b} / {b} = {a} .")
    return facts


def _sentence(rng: random.Random, copy_share: float = 0.0) -> str:
    n, m = rng.sample(NAMES, 2)
    p = PRONOUN[n].capitalize()
    obj, place, cont = rng.choice(OBJECTS), rng.choice(PLACES), rng.choice(CONTAINERS)
    k, j = rng.randint(1, MAX_NUM), rng.randint(1, MAX_NUM)
    adj = rng.choice(POSITIVE + NEGATIVE)
    pos, neg = rng.choice(POSITIVE), rng.choice(NEGATIVE)
    thing, dish = rng.choice(THINGS), rng.choice(DISHES)
    venue, land = rng.choice(VENUES), rng.choice(LANDMARKS)
    if copy_share and rng.random() < copy_share:  # repeat a number said earlier: practice at copying
        obj2 = rng.choice([o for o in OBJECTS if o != obj])
        return rng.choice([
            f"{n} has {k} {obj} . {m} has {j} {obj2} . {n} still has {k} {obj} .",
            f"There are {k} {obj} in the {cont} . So the {cont} holds {k} {obj} .",
            f"{n} has {k} {obj} and {j} {obj2} . The {obj2} number {j} .",
            f"{n} counted {k} {obj} in the {place} , and {m} counted {k} {obj} too .",
        ])
    kind = rng.randrange(24)
    if kind == 0:
        return f"{n} has {k} {obj} ."
    if kind == 1:
        return f"There are {k} {obj} in the {place} ."
    if kind == 2:
        return f"{n} keeps {k} {obj} in a {cont} in the {place} ."
    if kind == 3:
        return f"{n} and {m} walk to the {place} together ."
    if kind == 4:
        return f"{n} counts the {obj} : " + " , ".join(str(i) for i in range(1, min(k, 8) + 1)) + " ."
    if kind == 5:
        return f"{n} likes {obj} and {m} likes {rng.choice(OBJECTS)} ."
    if kind == 6:
        return f"{p} went to the {place} with {m} ."
    if kind == 7:
        return f"{n} put the {cont} of {obj} on the table ."
    if kind == 8:
        return f"The {thing} was {adj} ."
    if kind == 9:
        return f"{n} {rng.choice(POS_VERBS)} the {pos} {thing} and smiled ."
    if kind == 10:
        return f"{n} {rng.choice(NEG_VERBS)} the {neg} {thing} and left early ."
    if kind == 11:
        return f"It was a {pos} day , and {n} was happy ."
    if kind == 12:
        return f"It was a {neg} day , and {n} was sad ."
    if kind == 13:
        return f"{n} ate {dish} at {venue} ."
    if kind == 14:
        return f"{venue} is a {rng.choice(EAT_TYPES)} near {land} ."
    if kind == 15:
        return f"{venue} serves {rng.choice(FOODS)} food in the {rng.choice(AREAS)} ."
    if kind == 16:
        return f"The prices at {venue} are {rng.choice(PRICES)} ."
    if kind == 17:
        return f"{venue} has a customer rating of {rng.choice(RATINGS)} ."
    if kind == 18:
        return f"{venue} is {rng.choice(['not ', ''])}family friendly ."
    if kind == 19:
        return f"{m} thinks the {dish} at {venue} is {adj} ."
    if kind == 20:
        return f"{n} has {k} {obj} and {m} has {j} {obj} ."
    if kind == 21:
        return f"Each {cont} holds {k} {obj} ."
    if kind == 22:
        return f"{n} is in the {place} . {p} is reading a {pos} book ."
    return f"The {thing} at the {place} was {pos} , but the {rng.choice(THINGS)} was {neg} ."


def generate_corpus(n_docs: int = 6000, seed: int = 0, fact_share: float = 0.45,
                    copy_share: float = 0.0) -> list[str]:
    """Return ``n_docs`` short documents: a few sentences mixed with arithmetic facts.

    ``fact_share``: the chance that a part is an arithmetic fact rather than a sentence;
    ``copy_share``: the chance that a sentence repeats a number it said before.
    """
    for name, v in (("fact_share", fact_share), ("copy_share", copy_share)):
        if not 0 <= v <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {v}")
    rng = random.Random(seed)
    facts = arithmetic_facts()
    docs = []
    for _ in range(n_docs):
        parts = []
        for _ in range(rng.randint(3, 6)):
            # the tiny model has to memorise ~600 facts, so it sees each one many times
            parts.append(rng.choice(facts) if rng.random() < fact_share else _sentence(rng, copy_share))
        docs.append(" ".join(parts))
    return docs


# ---- sentence pairs for tiny-bert's sentence-level objective -----------------------------------
# An opinion, then what the person did next. Which continuation fits depends on the opinion's polarity, and
# negation flips it ("did not like the soup" → "left early"), so a model asked to predict the next clause
# from the first one has to read polarity and negation. No frame here is one of the sentiment task's, and
# no label is attached: this is just text in which opinions have consequences.
_AFTER = {
    True: ["so {p} was happy .", "{n} smiled .", "{n} stayed all evening .", "it was worth the money .",
           "{n} told everyone to go ."],
    False: ["so {p} was sad .", "{n} frowned .", "{n} left early .", "{n} asked for a refund .",
            "{n} told everyone to stay away ."],
}
_VERB_BASE = {"loved": "love", "enjoyed": "enjoy", "liked": "like", "adored": "adore", "hated": "hate",
              "disliked": "dislike", "regretted": "regret", "avoided": "avoid"}


def opinion_pair(rng: random.Random) -> tuple[str, str]:
    """``(opinion, continuation)``: a clause with a polarity (possibly negated) and what followed it."""
    n = rng.choice(NAMES)
    positive, negate = rng.random() < 0.5, rng.random() < 0.35
    word_pos = positive != negate  # the word's own polarity; "not" turns it round
    adj = rng.choice(POSITIVE if word_pos else NEGATIVE)
    verb = rng.choice(POS_VERBS if word_pos else NEG_VERBS)
    thing, dish, venue = rng.choice(THINGS), rng.choice(DISHES), rng.choice(VENUES)
    neg = "not " if negate else ""
    first = rng.choice([
        f"{n} said the {thing} was {neg}{adj} .",
        f"{n} {'did not ' + _VERB_BASE[verb] if negate else verb} the {thing} .",
        f"we found the {dish} {neg}{adj} .",
        f"the {thing} at {venue} seemed {neg}{adj} to {n} .",
        f"{n} thought that the {dish} was {neg}{adj} .",
    ])
    return first, rng.choice(_AFTER[positive]).format(n=n, p=PRONOUN[n])
