"""A tiny runner for learners' property checks: each check prints PASS or FAIL with a hint.

An exercise the learner has not started yet is not a failure: a stub raises `NotImplementedError` (the
chapters' stubs read `raise NotImplementedError("your code here")`), and a check stopped by such a stub
is "to do". When every check of an exercise is to do, the runner prints one short invitation instead of
a column of FAIL lines; when some are done, it prints their PASS/FAIL lines and marks the rest "to do".
A real error or a wrong result is still a FAIL with its hint.
"""
from __future__ import annotations

import os
import traceback

import torch
from torch import nn

_NOT_LEARNER = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, __import__("minipeft")))


def _stub_name(e: BaseException) -> str | None:
    """The learner's function whose body is still `raise NotImplementedError`, or None when the
    NotImplementedError comes from torch or minipeft (an unsupported op is a real error, not a stub)."""
    if not isinstance(e, NotImplementedError):
        return None
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return None
    code = tb.tb_frame.f_code
    if os.path.abspath(code.co_filename).startswith(_NOT_LEARNER):
        return None
    parts = [p for p in getattr(code, "co_qualname", code.co_name).split(".") if p != "<locals>"]
    if parts[-1] == "__init__" and len(parts) > 1:
        return parts[-2]                                 # a class stub: name the class
    if len(parts) > 1 and parts[-2][:1].isupper():
        return f"{parts[-2]}.{parts[-1]}"                # a method: MyLoRALinear.forward
    return parts[-1] if parts[-1] != "<lambda>" else "your code"


def _looks_like_stub(obj) -> bool:
    """A function (or a class's __init__/forward) whose only global name is NotImplementedError: a body
    `raise NotImplementedError(...)`; any real code reads attributes or globals too."""
    for f in ((obj,) if not isinstance(obj, type) else (vars(obj).get("__init__"), vars(obj).get("forward"))):
        code = getattr(f, "__code__", None)
        if code is not None and code.co_names == ("NotImplementedError",):
            return True
    return False


def _names(names) -> str:
    return ", ".join(f"`{n}`" for n in names) if names else "your code"


class Report(list):
    """The list of (check name, passed) pairs, printed as a short table; truthy when all passed.

    `todo`: the names of the checks stopped by a stub (NotImplementedError); `stubs`: the learner's
    functions still to write; `attempted`: False when every check is still to do."""

    def __init__(self, *args):
        super().__init__(*args)
        self.todo: list[str] = []
        self.stubs: list[str] = []

    @property
    def attempted(self) -> bool:
        return len(self.todo) < len(self)

    def __bool__(self):
        return all(ok for _, ok in self)

    def __repr__(self):
        n, t = sum(ok for _, ok in self), len(self.todo)
        if not self.attempted and t:
            return f"not attempted yet ({t} check{'s' * (t != 1)} waiting)"
        head = f"{n}/{len(self)} checks passed"
        if n == len(self):
            return head
        if n + t == len(self):   # nothing wrong, only unfinished
            return f"{head}, {t} to do — fill in {_names(self.stubs)} and run this cell again"
        return head + (f", {t} to do" if t else "") + " — see the hints above"


def run_checks(title: str, checks, learner=()) -> Report:
    """`checks`: list of (name, hint, fn). fn() returns None/True on success, False or raises on failure;
    a NotImplementedError raised by the learner's code marks the check "to do", not failed.
    `learner`: the learner's functions or classes, so that the invitation can name every stub among them,
    not only the first one a check happened to call."""
    report, lines = Report(), []
    for name, hint, fn in checks:
        stub = None
        try:
            ok = fn() is not False
            detail = ""
        except AssertionError as e:
            ok, detail = False, str(e)
        except Exception as e:  # a learner's code may fail in any way: show the last frame, not a wall
            ok, stub = False, _stub_name(e)
            detail = f"{type(e).__name__}: {e} ({traceback.extract_tb(e.__traceback__)[-1].line})"
        if stub is not None:
            report.todo.append(name)
            if stub not in report.stubs:
                report.stubs.append(stub)
            lines.append(f"  to do {name}")
        else:
            lines.append(f"  {'PASS' if ok else 'FAIL'}  {name}" + ("" if ok else f"\n        {detail}\n        hint: {hint}"))
        report.append((name, ok))
    for obj in learner:
        name = getattr(obj, "__name__", None)
        if report.todo and name and name not in report.stubs and _looks_like_stub(obj):
            report.stubs.append(name)
    if report.todo and not report.attempted:
        k = len(report.todo)
        print(f"{title} — not attempted yet: fill in {_names(report.stubs)} above and run this cell again;\n"
              f"  {k} check{'s are' if k != 1 else ' is'} waiting: " + "; ".join(report.todo) + ".")
        return report
    print(title)
    print("\n".join(lines))
    print(report)
    return report


def built_once(make):
    """`get()` returning `make()`'s result, made on the first call. Checks build the learner's object through it,
    inside the first check that needs it, so an error in the learner's constructor is a FAIL line, not a traceback."""
    made = []

    def get():
        if not made:
            made.append(make())
        return made[0]
    return get


def find_param(module, names, shape, what: str | None = None) -> torch.Tensor:
    """A learner's tensor: the attribute named in `names` (a Parameter, a tensor or an nn.Linear's weight),
    else the only trainable parameter of that shape. A named tensor of another shape is a failure that names
    it ("A has shape (12, 3); expected (r, d_in) = (3, 12)"), before any computation uses it."""
    for n in names:
        t = getattr(module, n, None)
        if isinstance(t, nn.Linear):
            t = t.weight
        if isinstance(t, torch.Tensor):
            if tuple(t.shape) != tuple(shape):
                raise AssertionError(f"{names[0]} has shape {tuple(t.shape)}; expected "
                                     f"{f'{what} = ' if what else ''}{tuple(shape)}")
            return t
    found = [p for p in module.parameters() if p.requires_grad and tuple(p.shape) == shape]
    if len(found) == 1:
        return found[0]
    raise AssertionError(f"no unique trainable parameter of shape {shape} found (name it {names[0]})")
