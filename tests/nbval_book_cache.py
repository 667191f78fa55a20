"""pytest plugin: nbval's execution of notebooks/<name>.ipynb also fills the book's execution cache.

The book (`execute_notebooks: cache`) re-executes a chapter only when jupyter-cache holds no
executed notebook whose code matches book/<name>.md. nbval already runs every chapter, so this plugin
records what nbval's kernel sends for each cell and, when every cell of a notebook passed, stores
book/<name>.md with those outputs in the book's cache (`_build/.jupyter_cache`): the book build that
follows uses them ("Using cached notebook") instead of running the chapter a second time.

Used by scripts/test.sh: `python -m pytest -p tests.nbval_book_cache --nbval-lax ... notebooks/`.

How it stays faithful to what the book build would produce:
- the notebook stored is book/<name>.md read by myst-nb's own reader (the code cells and their
  metadata are what jupyter-cache hashes); notebooks/<name>.ipynb must have the same code cells and
  tags in the same order (tests/test_notebooks_paired.py), otherwise the chapter is not cached;
- every kernel message nbval receives for a cell goes through nbclient's own message handling (the
  executor of the book build): clear_output, display updates, Output widgets and the widget state
  saved in the notebook metadata come out as they would there;
- a notebook with a failing, deselected or interrupted cell is not cached, and neither is one where
  nbval skipped a cell that the book shows (skipping is fine for `remove-cell` cells only, e.g. the
  Colab install cell). The book build then executes that chapter itself: correct, only slower. A
  failing notebook also removes an earlier cached run of the same chapter code, so that a local
  book build does not publish outputs that the package no longer gives.

Differences that remain: nbval runs the kernel in notebooks/, the book in book/ (the chapters use
no relative paths), and with store_history=False (only `Out[n]`/`_` history differs; execution
counts are numbered 1, 2, ... as nbclient does).

Each cached chapter's wall time under nbval is stored with the record (`execution_seconds`: what
the book's execution table shows for it), written to `_build/execution_times.json`, and printed at
the end of the pytest run.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SKIPPABLE = "remove-cell"  # nbval may skip a cell (nbval-skip) only if the book hides it too


# ---------------------------------------------------------------- the notebook myst-nb builds


def _myst_config(root: Path):
    """The MyST parser configuration jupyter-book gives myst-nb: its defaults plus _config.yml's."""
    from myst_parser.config.main import MdParserConfig

    import jupyter_book

    default = yaml.safe_load((Path(jupyter_book.__file__).parent / "default_config.yml").read_text())
    exts = list(default.get("parse", {}).get("myst_enable_extensions") or [])
    cfg_path = root / "_config.yml"
    if cfg_path.exists():
        cfg = yaml.safe_load(cfg_path.read_text()) or {}
        for ext in (cfg.get("parse") or {}).get("myst_enable_extensions") or []:
            if ext not in exts:
                exts.append(ext)
    return MdParserConfig(enable_extensions=exts)


def book_notebook(md: Path, root: Path = ROOT) -> nbformat.NotebookNode:
    """book/<name>.md as the notebook myst-nb builds from it (its reader, not jupytext's)."""
    from myst_nb.core.read import read_myst_markdown_notebook

    return read_myst_markdown_notebook(md.read_text("utf8"), config=_myst_config(root),
                                       add_source_map=True, path=str(md))


def code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def mismatch(ipynb, book_nb) -> str | None:
    """Why the code cells of the two notebooks do not line up one to one (None if they do)."""
    a, b = code_cells(ipynb), code_cells(book_nb)
    if len(a) != len(b):
        return f"{len(a)} code cells in the notebook, {len(b)} in the chapter"
    for i, (x, y) in enumerate(zip(a, b)):
        if x.source.strip() != y.source.strip():
            return f"code cell {i} differs"
        if sorted(x.metadata.get("tags", [])) != sorted(y.metadata.get("tags", [])):
            return f"code cell {i} has other tags"
    return None


def cache_path(root: Path = ROOT) -> Path:
    """Where jupyter-book keeps jupyter-cache: execute.cache in _config.yml, else _build/.jupyter_cache."""
    cfg = yaml.safe_load((root / "_config.yml").read_text()) or {}
    path = (cfg.get("execute") or {}).get("cache") or ""
    return (root / path) if path else root / "_build" / ".jupyter_cache"


def store(nb: nbformat.NotebookNode, md: Path, cache: Path, seconds: float):
    """Put the executed chapter notebook into the jupyter-cache at `cache`; returns the record."""
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    return get_cache(str(cache)).cache_notebook_bundle(
        CacheBundleIn(nb, str(md), data={"execution_seconds": seconds}),
        check_validity=False, overwrite=True, description="nbval")


def drop(nb: nbformat.NotebookNode, cache: Path) -> bool:
    """Remove the cached run of this chapter code, if any (its notebook failed under nbval now:
    the book build must execute it again rather than publish the earlier outputs)."""
    from jupyter_cache import get_cache

    if not cache.exists():
        return False
    jc = get_cache(str(cache))
    try:
        record = jc.match_cache_notebook(nb)
    except KeyError:
        return False
    jc.remove_cache(record.pk)
    return True


# ---------------------------------------------------------------- recording nbval's execution


class Recorder:
    """Outputs of one notebook's nbval run, built in the chapter's notebook by nbclient's handlers."""

    def __init__(self, nbfile, md: Path, root: Path):
        from nbclient import NotebookClient

        self.nbfile, self.md, self.root = nbfile, md, root
        self.reason = None  # why this notebook will not be cached
        self.failed = False  # a cell failed: the book must not reuse an earlier run either
        self.nb = None
        self.done: set[int] = set()  # code cells that ran and passed (or were skipped harmlessly)
        self.msg_id = None
        self.cell = None
        self.t0 = time.perf_counter()
        self.seconds = 0.0
        if not md.exists():
            self.reason = f"no {md.relative_to(root) if md.is_relative_to(root) else md}"
            return
        self.nb = book_notebook(md, root)
        why = mismatch(nbfile.nb, self.nb)
        if why:
            self.reason = f"its code cells do not line up with {md.name} ({why})"
            return
        self.cells = code_cells(self.nb)
        self.index = {id(c): i for i, c in enumerate(self.nb.cells)}
        for c in self.cells:
            c.outputs, c.execution_count = [], None
        # a client that never starts a kernel: used for its message handling only
        self.client = NotebookClient(self.nb, record_timing=False)

    # called from the patched nbval kernel
    def feed(self, msg):
        from nbclient.exceptions import CellExecutionComplete

        if self.cell is None or msg.get("parent_header", {}).get("msg_id") != self.msg_id:
            return
        try:
            self.client.process_message(msg, self.cell, self.index[id(self.cell)])
        except CellExecutionComplete:
            self.cell = None

    def start_cell(self, item):
        if self.reason:
            return
        self.client.kc = item.parent.kernel.kc  # Output widgets answer the kernel like a frontend
        cell = self.cells[item.cell_num]
        cell.outputs = []
        self.client.clear_before_next_output = False
        self.cell, self.msg_id = cell, None

    def finish_cell(self, item, reports):
        self.cell = None
        if any(r.failed for r in reports):
            self.failed = True
            self.reason = self.reason or f"cell {item.cell_num} failed"
        if self.reason:
            return
        if any(r.skipped for r in reports):
            tags = self.cells[item.cell_num].metadata.get("tags", [])
            if SKIPPABLE not in tags:
                self.reason = f"nbval skipped cell {item.cell_num}, which the book shows"
            else:
                self.done.add(item.cell_num)
        elif len(reports) == 3:
            self.done.add(item.cell_num)
        else:
            self.reason = f"cell {item.cell_num} did not complete"

    def finish(self, cache: Path) -> str:
        """Store the executed chapter if every cell ran; returns a line for the summary."""
        self.seconds = time.perf_counter() - self.t0
        if not self.reason and self.done != set(range(len(self.cells))):
            self.reason = f"only {len(self.done)} of {len(self.cells)} code cells ran"
        if self.reason:
            if self.failed and self.nb is not None and drop(self.nb, cache):
                return f"not cached: {self.reason}; dropped the book's earlier cached run of this code"
            return f"not cached: {self.reason}"
        for n, cell in enumerate(self.cells, 1):  # numbered as nbclient does
            cell.execution_count = n
            for out in cell.outputs:
                if out.get("output_type") == "execute_result":
                    out["execution_count"] = n
        self.client.set_widgets_metadata()
        info = getattr(self.nbfile.kernel, "_book_cache_language_info", None)
        if info:
            self.nb.metadata["language_info"] = info
        record = store(copy.deepcopy(self.nb), self.md, cache, round(self.seconds, 2))
        return f"cached (ID={record.pk})"


def _patch_nbval_kernel():
    """Let every recorder see the messages nbval's kernel receives (nbval keeps only some)."""
    from nbval.kernel import RunningKernel

    if getattr(RunningKernel, "_book_cache_patched", False):
        return
    get_message, execute = RunningKernel.get_message, RunningKernel.execute_cell_input

    def patched_get_message(self, stream, timeout=None):
        msg = get_message(self, stream, timeout=timeout)
        if stream == "shell" and msg.get("msg_type") == "kernel_info_reply":
            self._book_cache_language_info = msg["content"].get("language_info")
        rec = getattr(self, "_book_cache_recorder", None)
        if rec is not None and stream == "iopub":
            rec.feed(msg)
        return msg

    def patched_execute(self, cell_input, allow_stdin=None):
        msg_id = execute(self, cell_input, allow_stdin=allow_stdin)
        rec = getattr(self, "_book_cache_recorder", None)
        if rec is not None:
            rec.msg_id = msg_id
        return msg_id

    RunningKernel.get_message = patched_get_message
    RunningKernel.execute_cell_input = patched_execute
    RunningKernel._book_cache_patched = True


# ---------------------------------------------------------------- pytest hooks


def pytest_addoption(parser):
    group = parser.getgroup("nbval-book-cache", "store nbval's executions in the book's cache")
    group.addoption("--book-root", default=str(ROOT),
                    help="book root (with _config.yml and the chapters' .md files); default: this repository")
    group.addoption("--book-chapters", default="book",
                    help="folder of the chapters' .md files, relative to --book-root (default: book)")
    group.addoption("--book-cache", default=None,
                    help="jupyter-cache folder (default: what jupyter-book uses, _build/.jupyter_cache)")
    group.addoption("--no-book-cache", action="store_true", help="disable this plugin")


class BookCache:
    def __init__(self, config):
        self._reports = None  # reports of the item being run
        self.root = Path(config.getoption("book_root")).resolve()
        self.chapters = self.root / config.getoption("book_chapters")
        opt = config.getoption("book_cache")
        self.cache = Path(opt).resolve() if opt else cache_path(self.root)
        self.recorders: dict = {}  # IPyNbFile -> Recorder
        self.lines: list[tuple[str, float, str]] = []

    def recorder(self, item):
        from nbval.plugin import IPyNbCell

        if not isinstance(item, IPyNbCell):
            return None
        nbfile = item.parent
        if nbfile not in self.recorders:
            md = self.chapters / (Path(str(nbfile.fspath)).stem + ".md")
            self.recorders[nbfile] = Recorder(nbfile, md, self.root)
        return self.recorders[nbfile]

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        rec = self.recorder(item)
        if rec is None:
            yield
            return
        reports = []
        self._reports = reports
        yield
        self._reports = None
        rec.finish_cell(item, reports)
        if nextitem is None or getattr(nextitem, "parent", None) is not item.parent:
            name = Path(str(item.parent.fspath)).stem
            try:
                line = rec.finish(self.cache)
            except Exception as exc:  # never fail the tests for the cache's sake
                line = f"not cached: {type(exc).__name__}: {exc}"
            self.lines.append((name, rec.seconds, line))
            self._write_times()
            del self.recorders[item.parent]

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item):
        rec = self.recorder(item)
        kernel = getattr(getattr(item, "parent", None), "kernel", None)
        if rec is not None and kernel is not None:
            rec.start_cell(item)
            kernel._book_cache_recorder = rec
        try:
            yield
        finally:
            if kernel is not None:
                kernel._book_cache_recorder = None

    def pytest_runtest_logreport(self, report):
        if self._reports is not None:
            self._reports.append(report)

    def _write_times(self):
        path = self.cache.parent / "execution_times.json"
        try:
            times = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:
            times = {}
        for name, seconds, line in self.lines:
            times[name] = {"seconds": round(seconds, 1), "by": "nbval", "book_cache": line}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(times, indent=1, sort_keys=True) + "\n")

    def pytest_terminal_summary(self, terminalreporter):
        if not self.lines:
            return
        tr = terminalreporter
        tr.write_sep("-", f"notebook run times; book cache {self.cache}")
        for name, seconds, line in self.lines:
            tr.write_line(f"{name:24s} {seconds:7.1f} s  {line}")


def pytest_configure(config):
    if config.getoption("no_book_cache"):
        return
    _patch_nbval_kernel()
    config.pluginmanager.register(BookCache(config), "nbval-book-cache")
