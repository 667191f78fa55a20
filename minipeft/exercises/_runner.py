"""A tiny runner for learners' property checks: each check prints PASS or FAIL with a hint."""
from __future__ import annotations

import traceback

import torch
from torch import nn


class Report(list):
    """The list of (check name, passed) pairs, printed as a short table; truthy when all passed."""

    def __bool__(self):
        return all(ok for _, ok in self)

    def __repr__(self):
        n = sum(ok for _, ok in self)
        return f"{n}/{len(self)} checks passed" + ("" if n == len(self) else " — see the hints above")


def run_checks(title: str, checks) -> Report:
    """`checks`: list of (name, hint, fn). fn() returns None/True on success, False or raises on failure."""
    print(title)
    report = Report()
    for name, hint, fn in checks:
        try:
            ok = fn() is not False
            detail = ""
        except AssertionError as e:
            ok, detail = False, str(e)
        except Exception as e:  # a learner's code may fail in any way: show the last frame, not a wall
            ok, detail = False, f"{type(e).__name__}: {e} ({traceback.extract_tb(e.__traceback__)[-1].line})"
        print(f"  {'PASS' if ok else 'FAIL'}  {name}" + ("" if ok else f"\n        {detail}\n        hint: {hint}"))
        report.append((name, ok))
    print(report)
    return report


def find_param(module, names, shape) -> torch.Tensor:
    """A learner's tensor: the attribute named in `names` (a Parameter, a tensor or an nn.Linear's weight),
    else the only trainable parameter of that shape."""
    for n in names:
        t = getattr(module, n, None)
        if isinstance(t, nn.Linear):
            t = t.weight
        if isinstance(t, torch.Tensor):
            return t
    found = [p for p in module.parameters() if p.requires_grad and tuple(p.shape) == shape]
    if len(found) == 1:
        return found[0]
    raise AssertionError(f"no unique trainable parameter of shape {shape} found (name it {names[0]})")
