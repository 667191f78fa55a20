"""tests/nbval_book_cache.py: nbval's run of a notebook lands in the book's jupyter-cache, in the form
the book build (myst-nb reading book/<name>.md) matches, and only when every cell passed."""
import json
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest

from nbval_book_cache import book_notebook, mismatch

ROOT = Path(__file__).resolve().parents[1]

HEADER = """---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---

# {title}

```{{code-cell}} ipython3
:tags: [remove-cell, nbval-skip]

import sys
if "google.colab" in sys.modules:
    !pip install -q something
```
"""

OK = HEADER.format(title="Ok") + """
Some prose: the answer is {glue:text}`answer`.

```{code-cell} ipython3
:tags: [nbval-check-output]

from myst_nb import glue
glue("answer", 42, display=False)
print("hello")
```

```{code-cell} ipython3
from IPython.display import clear_output
print("gone")
clear_output(wait=True)
6 * 7
```
"""

BAD = HEADER.format(title="Bad") + """
```{code-cell} ipython3
print("before")
```

```{code-cell} ipython3
1 / 0
```
"""


def write_chapter(root: Path, name: str, text: str) -> Path:
    """book/<name>.md and its notebooks/<name>.ipynb (a Colab badge in the title, as sync_notebooks.py
    writes; not executed: nbval then only checks that the cells run)."""
    md = root / "book" / f"{name}.md"
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text)
    nb = jupytext.read(md)
    nb.cells[0].source += "\n\n[![Open In Colab](badge.svg)](link)"
    (root / "notebooks").mkdir(exist_ok=True)
    nbformat.write(nb, root / "notebooks" / f"{name}.ipynb")
    return md


def myst_nb_notebook(md: Path):
    """The notebook the book build makes of a chapter, through myst-nb's own reader selection."""
    from myst_nb.core.config import NbParserConfig
    from myst_nb.core.read import create_nb_reader
    from myst_parser.config.main import MdParserConfig

    text = md.read_text()
    return create_nb_reader(str(md), MdParserConfig(), NbParserConfig(), text).read(text)


def test_cells_line_up_despite_the_colab_badge(tmp_path):
    md = write_chapter(tmp_path, "ok", OK)
    ipynb = nbformat.read(tmp_path / "notebooks" / "ok.ipynb", as_version=4)
    assert mismatch(ipynb, book_notebook(md, tmp_path)) is None
    ipynb.cells[3].source = "print('changed')"
    assert "differs" in mismatch(ipynb, book_notebook(md, tmp_path))
    ipynb.cells.pop(3)
    assert "code cells" in mismatch(ipynb, book_notebook(md, tmp_path))


def test_nbval_run_fills_the_book_cache(tmp_path):
    from jupyter_cache import get_cache

    (tmp_path / "_config.yml").write_text((ROOT / "_config.yml").read_text())
    ok, bad = write_chapter(tmp_path, "ok", OK), write_chapter(tmp_path, "bad", BAD)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.nbval_book_cache", "--book-root", str(tmp_path),
         "--nbval-lax", "--nbval-current-env", "-p", "no:cacheprovider", "-q",
         str(tmp_path / "notebooks")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr  # bad.ipynb fails
    assert "ok " in run.stdout and "cached (ID=" in run.stdout, run.stdout
    assert "not cached: cell 2 failed" in run.stdout, run.stdout

    cache = get_cache(str(tmp_path / "_build" / ".jupyter_cache"))
    assert len(cache.list_cache_records()) == 1
    with pytest.raises(KeyError):  # a failing notebook is not cached: the book executes it
        cache.match_cache_notebook(myst_nb_notebook(bad))
    # the book build's notebook of ok.md matches the record, and gets nbval's outputs merged in
    record = cache.match_cache_notebook(myst_nb_notebook(ok))
    assert record.data["execution_seconds"] > 0
    _, nb = cache.merge_match_into_notebook(myst_nb_notebook(ok))
    colab, glued, cleared = [c for c in nb.cells if c.cell_type == "code"]
    assert colab.outputs == []
    assert glued.outputs[0].metadata["scrapbook"]["name"] == "answer"
    assert glued.outputs[0].data["application/papermill.record/text/plain"] == "42"
    assert glued.outputs[1].text == "hello\n"
    assert [o.output_type for o in cleared.outputs] == ["execute_result"]  # clear_output applied
    assert cleared.outputs[0].data["text/plain"] == "42"
    assert [c.execution_count for c in (colab, glued, cleared)] == [1, 2, 3]
    assert nb.metadata["language_info"]["name"] == "python"

    times = json.loads((tmp_path / "_build" / "execution_times.json").read_text())
    assert set(times) == {"ok", "bad"} and times["ok"]["seconds"] > 0
