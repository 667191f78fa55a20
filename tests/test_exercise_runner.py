"""The exercise runner tells an untouched stub (an invitation), a partly done exercise (PASS + "to do")
and a wrong answer (FAIL with its hint) apart; the chapters' stubs raise NotImplementedError."""
import ast
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from minipeft.exercises import run_checks
from minipeft.exercises.qlora import check_pack_4bit

BOOK = Path(__file__).resolve().parents[1] / "book"


def stub_pack(idx):
    raise NotImplementedError("your code here")


def stub_unpack(packed):
    raise NotImplementedError("your code here")


def good_pack(idx):
    pairs = idx.reshape(-1, 2).to(torch.uint8)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def good_unpack(b):
    return torch.stack([b >> 4, b & 15], dim=-1).reshape(-1)


def test_untouched_stub_is_an_invitation(capsys):
    report = check_pack_4bit(stub_pack, stub_unpack)
    out = capsys.readouterr().out
    assert "FAIL" not in out and "PASS" not in out and "hint" not in out
    assert "not attempted yet: fill in `stub_pack`, `stub_unpack` above" in out and "3 checks are waiting" in out
    assert not report and not report.attempted and len(report.todo) == 3
    assert repr(report) == "not attempted yet (3 checks waiting)"
    assert [ok for _, ok in report] == [False] * 3        # the tests' view of a report is unchanged


def test_partly_done_shows_pass_and_to_do(capsys):
    report = check_pack_4bit(good_pack, stub_unpack)
    out = capsys.readouterr().out
    assert "FAIL" not in out and "not attempted" not in out
    assert out.count("PASS") == 2 and "  to do unpack inverts pack" in out
    assert "1 to do" in out and "`stub_unpack`" in out
    assert not report and report.attempted and report.todo == ["unpack inverts pack"]


def test_wrong_answer_still_fails(capsys):
    report = check_pack_4bit(lambda i: i.to(torch.uint8), lambda b: b)  # no packing at all
    out = capsys.readouterr().out
    assert out.count("FAIL") == 2 and "hint:" in out and "to do" not in out and "not attempted" not in out
    assert not report and report.attempted and report.todo == []
    assert repr(report) == "1/3 checks passed — see the hints above"


def test_wrong_and_unfinished_together(capsys):
    report = check_pack_4bit(lambda i: i.to(torch.uint8), stub_unpack)
    out = capsys.readouterr().out
    assert out.count("FAIL") == 2 and "  to do unpack inverts pack" in out
    assert repr(report) == "0/3 checks passed, 1 to do — see the hints above"


def test_all_pass_output_unchanged(capsys):
    report = check_pack_4bit(good_pack, good_unpack)
    assert report and repr(report) == "3/3 checks passed"
    assert capsys.readouterr().out.splitlines()[-1] == "3/3 checks passed"


def test_not_implemented_from_library_code_is_a_failure(capsys):
    """An unsupported op inside torch raises NotImplementedError too: that is a real error, not a stub."""
    def uses_base_module(x):
        return nn.Module()(x)  # torch: Module [Module] is missing the required "forward" function

    report = run_checks("t", [("calls torch", "write forward", lambda: uses_base_module(torch.ones(1)))])
    out = capsys.readouterr().out
    assert "FAIL" in out and "not attempted" not in out and report.todo == []


def test_class_stub_is_named_by_its_class(capsys):
    class MyLayer(nn.Module):
        def __init__(self):
            super().__init__()
            raise NotImplementedError("your code here")

    run_checks("t", [("builds", "h", lambda: MyLayer())])
    assert "fill in `MyLayer`" in capsys.readouterr().out


# --- the chapters: every stub a learner must fill raises NotImplementedError ---------------------------

def exercise_cells(md: str):
    """The code cells of a chapter's `## Exercises` section."""
    section = md.split("\n## Exercises", 1)[1].split("\n## ", 1)[0] if "\n## Exercises" in md else ""
    return re.findall(r"```\{code-cell\}[^\n]*\n(.*?)```", section, flags=re.S)


def is_silent_stub(fn: ast.FunctionDef) -> bool:
    body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                                       and isinstance(s.value.value, str))]  # a docstring
    return all(isinstance(s, ast.Pass) or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                                           and s.value.value is Ellipsis) for s in body)


CHAPTERS = sorted(p for p in BOOK.glob("*.md") if "\n## Exercises" in p.read_text())


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_stubs_raise_not_implemented(chapter):
    for cell in exercise_cells(chapter.read_text()):
        code = "\n".join(line for line in cell.splitlines() if not line.startswith(":"))  # cell options
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert not is_silent_stub(node), \
                    f"{chapter.name}: stub `{node.name}` returns None; make it raise NotImplementedError"


def test_qlora_stub_cells_print_invitations(capsys):
    cells = [c for c in exercise_cells((BOOK / "qlora.md").read_text()) if "raise NotImplementedError" in c]
    assert len(cells) == 3
    ns = {"torch": torch, "nn": nn, "math": math}
    for cell in cells:
        exec(cell, ns)
        out = capsys.readouterr().out
        assert "not attempted yet" in out and "FAIL" not in out, out
