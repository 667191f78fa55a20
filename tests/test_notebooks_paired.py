"""book/<name>.md (MyST, the source) and notebooks/<name>.ipynb (Colab, nbval) must not drift.

jupytext's own --sync decides direction by file timestamps, which mean nothing after a checkout,
so this compares content: every code cell's source and tags, in order. If this fails, edit the
.md and run `.venv/bin/python scripts/sync_notebooks.py book/<name>.md`.
"""
from pathlib import Path

import jupytext
import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BOOK, NOTEBOOKS = ROOT / "book", ROOT / "notebooks"
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
COLAB_TAGS = {"remove-cell", "nbval-skip"}


def is_chapter(path: Path) -> bool:
    return not path.name.startswith("_") and path.suffix == ".md"


def executable(path: Path) -> bool:
    return bool(jupytext.read(path).metadata.get("kernelspec"))


CHAPTERS = sorted(p.stem for p in BOOK.glob("*.md") if is_chapter(p) and executable(p))
NOTEBOOK_NAMES = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))


def colab_cell_source() -> str:
    url = CONFIG["repository"]["url"].rstrip("/")
    return (
        "import sys\n"
        'if "google.colab" in sys.modules:  # a fresh Colab runtime: install minipeft (Colab keeps its torch)\n'
        f'    !pip install -q "minipeft @ git+{url}"\n'
        # the one line that swaps a tiny model for a hub model (tests/test_hub_passthrough.py: the pass-through)
        "# A real model instead of a tiny one (GPU runtime): change the chapter's load line, e.g.\n"
        '#   mp.zoo.load("tiny-llama")  ->  mp.zoo.load("HuggingFaceTB/SmolLM2-135M")\n'
        '#   mp.zoo.load("tiny-bert", num_labels=2)  ->  mp.zoo.load("google-bert/bert-base-uncased", num_labels=2)\n'
        "# Same classes and module names (q_proj/v_proj, query/value), so targets carry over."
    )


def code_cells(nb):
    return [(c.source.strip(), sorted(c.metadata.get("tags", []))) for c in nb.cells
            if c.cell_type == "code"]


def toc_files() -> set[str]:
    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("file", "root"):
                    yield value
                else:
                    yield from walk(value)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)

    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return {str(Path(f).with_suffix("")) for f in walk(toc)}


def test_every_chapter_has_a_notebook_and_vice_versa():
    assert CHAPTERS, "no executable chapter found in book/"
    assert set(CHAPTERS) - set(NOTEBOOK_NAMES) == set(), "run scripts/sync_notebooks.py"
    assert set(NOTEBOOK_NAMES) - set(CHAPTERS) == set(), "notebook without a book/ chapter"


def test_every_chapter_is_in_the_toc():
    pages = {f"book/{p.stem}" for p in BOOK.glob("*.md") if is_chapter(p)}
    toc = toc_files()
    assert pages - toc == set(), "add these pages to _toc.yml"
    assert {f for f in toc if not (ROOT / f"{f}.md").exists()} == set(), "toc entry without a file"


@pytest.mark.parametrize("name", CHAPTERS)
def test_code_cells_match(name):
    md = jupytext.read(BOOK / f"{name}.md")
    ipynb_path = NOTEBOOKS / f"{name}.ipynb"
    if not ipynb_path.exists():
        pytest.fail(f"{ipynb_path.relative_to(ROOT)} missing: run scripts/sync_notebooks.py")
    ipynb = nbformat.read(ipynb_path, as_version=4)
    assert code_cells(ipynb) == code_cells(md), (
        f"notebooks/{name}.ipynb drifted from book/{name}.md: "
        f"run .venv/bin/python scripts/sync_notebooks.py book/{name}.md")


@pytest.mark.parametrize("name", CHAPTERS)
def test_notebook_was_executed(name):
    """nbval never compares a cell that has no stored execution, so a stale convert-only
    notebook would pass silently; every code cell must have run without error."""
    ipynb_path = NOTEBOOKS / f"{name}.ipynb"
    if not ipynb_path.exists():
        pytest.fail(f"{ipynb_path.relative_to(ROOT)} missing")
    nb = nbformat.read(ipynb_path, as_version=4)
    for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        assert cell.execution_count is not None, f"code cell {i} not executed"
        # no cell may raise, not even on purpose: Colab's "Run all" would stop there
        assert "raises-exception" not in cell.metadata.get("tags", []), f"code cell {i} is tagged raises-exception"
        assert not [o for o in cell.outputs if o.output_type == "error"], f"code cell {i} errored"


@pytest.mark.parametrize("name", CHAPTERS)
def test_chapter_header_and_colab_cell(name):
    md = jupytext.read(BOOK / f"{name}.md")
    assert md.metadata["kernelspec"]["name"] == "python3"
    assert md.metadata["jupytext"]["text_representation"]["format_name"] == "myst"
    first = next(c for c in md.cells if c.cell_type == "code")
    assert first.source.strip() == colab_cell_source(), (
        "the first code cell must be the Colab install cell of book/_template.md, "
        "with the URL from _config.yml repository.url")
    assert COLAB_TAGS <= set(first.metadata.get("tags", [])), f"tag it {sorted(COLAB_TAGS)}"


@pytest.mark.parametrize("name", CHAPTERS)
def test_notebook_prose_shows_its_numbers(name):
    """Colab and plain Jupyter have no myst_nb to render {glue:text}`x` roles: sync_notebooks.py writes the
    glued values of the stored run into the notebook's markdown, so no role may be left."""
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    left = [c.source[:80] for c in nb.cells if c.cell_type == "markdown" and "{glue" in c.source]
    assert not left, f"unfilled glue roles (run scripts/sync_notebooks.py book/{name}.md): {left[:3]}"
