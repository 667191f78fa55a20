"""The AdaLoRA chapter's exercise checks: each passes two different correct answers and fails three
typical mistakes (the references inside the checks are autograd, a real loss change and minipeft's own
functions, so a check that accepted anything would fail the broken cases here)."""
import math

import pytest
import torch

from minipeft.exercises import check_budget_schedule, check_sensitivity, check_triplet_scores


def results(report):
    return [ok for _, ok in report]


# ---- sensitivity I = |w · ∂L/∂w| ------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [
    lambda w, g: (w * g).abs(),
    lambda w, g: torch.abs(w) * torch.abs(g),
    lambda w, g: w.mul_(g).abs_(),  # in place on the tensor it is given
])
def test_sensitivity_correct(fn):
    assert check_sensitivity(fn)


@pytest.mark.parametrize("fn, expected", [
    (lambda w, g: w * g, [False, False, True]),         # signed: the first-order change, not its size
    (lambda w, g: g.abs(), [True, False, False]),       # the gradient alone ignores how far w is from 0
    (lambda w, g: (w * g) ** 2, [True, False, False]),  # squared
    (lambda w, g: w.abs() * g, [False, False, True]),   # |w| only: the gradient's sign kept
    (lambda w, g: (w * g).abs().sum(dim=1), [False, False, False]),  # summed per row: one score per neuron
])
def test_sensitivity_mistakes(fn, expected):
    report = check_sensitivity(fn)
    assert not report
    assert results(report) == expected


def test_sensitivity_shape_named(capsys):
    check_sensitivity(lambda w, g: (w * g).abs().sum(dim=1))
    assert "I has shape (8,); expected w's shape (8, 6)" in capsys.readouterr().out


def test_sensitivity_raising_is_a_fail():
    report = check_sensitivity(lambda w, g: w @ g)  # (8, 6) @ (8, 6): a shape error in the learner's code
    assert not report and not any(results(report))


# ---- the cubic budget schedule --------------------------------------------------------------------------
def budget_int(t, T, ti, tf, b0, bT):
    if t <= ti:
        return b0
    if t >= T - tf:
        return bT
    return int(bT + (b0 - bT) * (1 - (t - ti) / (T - tf - ti)) ** 3)


def budget_floor(t, T, ti, tf, b0, bT):  # clamp the progress instead of branching at the end
    p = min(max((t - ti) / (T - tf - ti), 0.0), 1.0)
    return math.floor(bT + (b0 - bT) * (1 - p) ** 3)


@pytest.mark.parametrize("fn", [budget_int, budget_floor])
def test_budget_correct(fn):
    assert check_budget_schedule(fn)


def budget_linear(t, T, ti, tf, b0, bT):
    p = min(max((t - ti) / (T - tf - ti), 0.0), 1.0)
    return int(bT + (b0 - bT) * (1 - p))


def budget_no_final(t, T, ti, tf, b0, bT):  # the window runs to T: tfinal forgotten
    p = min(max((t - ti) / (T - ti), 0.0), 1.0)
    return int(bT + (b0 - bT) * (1 - p) ** 3)


def budget_to_zero(t, T, ti, tf, b0, bT):  # decays b(0) towards 0 and clips at the target
    p = min(max((t - ti) / (T - tf - ti), 0.0), 1.0)
    return max(bT, int(b0 * (1 - p) ** 3))


def budget_from_zero(t, T, ti, tf, b0, bT):  # progress counted from step 0, not from tinit
    if t <= ti:
        return b0
    if t >= T - tf:
        return bT
    return int(bT + (b0 - bT) * (1 - t / (T - tf)) ** 3)


@pytest.mark.parametrize("fn, expected", [
    (budget_from_zero, [True, True, False]),
    (budget_linear, [True, True, False]),
    (budget_no_final, [True, False, False]),
    (budget_to_zero, [True, True, False]),
])
def test_budget_mistakes(fn, expected):
    assert results(check_budget_schedule(fn)) == expected


def budget_torch_pow(t, T, ti, tf, b0, bT):  # torch.pow on two Python numbers raises a TypeError
    if t <= ti:
        return b0
    if t >= T - tf:
        return bT
    return int(bT + (b0 - bT) * torch.pow(1 - (t - ti) / (T - tf - ti), 3))


def test_budget_raising_is_a_fail(capsys):
    report = check_budget_schedule(budget_torch_pow)
    assert results(report) == [True, True, False]
    assert "TypeError" in capsys.readouterr().out


# ---- triplet scores -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [
    lambda s_E, s_A, s_B: s_E.flatten() + s_A.mean(dim=1) + s_B.mean(dim=0),
    lambda s_E, s_A, s_B: s_E[:, 0] + s_A.sum(1) / s_A.shape[1] + s_B.T.sum(1) / s_B.shape[0],
])
def test_triplets_correct(fn):
    assert check_triplet_scores(fn)


@pytest.mark.parametrize("fn, expected", [
    (lambda s_E, s_A, s_B: s_E.flatten() + s_A.sum(dim=1) + s_B.sum(dim=0), [True, False, False]),  # sums
    (lambda s_E, s_A, s_B: s_A.mean(dim=1) + s_B.mean(dim=0), [True, False, True]),             # no λ term
    (lambda s_E, s_A, s_B: s_E.flatten() + s_A.mean(dim=0) + s_B.mean(dim=1), [False, False, False]),  # axes
    (lambda s_E, s_A, s_B: s_E + s_A.mean(dim=1) + s_B.mean(dim=0), [False, False, False]),  # (r, 1) + (r,): (r, r)
    (lambda s_E, s_A, s_B: s_E.flatten() * s_A.mean(dim=1) * s_B.mean(dim=0), [True, False, True]),  # product
])
def test_triplets_mistakes(fn, expected):
    assert results(check_triplet_scores(fn)) == expected


def test_triplets_shape_named(capsys):
    check_triplet_scores(lambda s_E, s_A, s_B: s_E + s_A.mean(dim=1) + s_B.mean(dim=0))
    assert "16 scores (shape (4, 4)), expected one per triplet: shape (r,) = (4,)" in capsys.readouterr().out


def test_triplets_raising_is_a_fail():
    report = check_triplet_scores(lambda s_E, s_A, s_B: s_E[:, 0] + s_A.mean(dim=1) + s_B.mean(dim=1))  # (4)+(9)
    assert not report and not any(results(report))
