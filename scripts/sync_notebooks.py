"""Regenerate notebooks/<name>.ipynb from book/<name>.md and execute it, so outputs are stored.

book/ (MyST markdown) is the source of truth; notebooks/ is the Colab/nbval copy. Run after
editing a chapter:

    .venv/bin/python scripts/sync_notebooks.py                 # every chapter
    .venv/bin/python scripts/sync_notebooks.py book/lora.md    # some chapters
    .venv/bin/python scripts/sync_notebooks.py --no-execute    # convert only (outputs not stored!)

Execution uses the current Python's "python3" kernel with notebooks/ as working directory
(as nbval does). In the .ipynb, the title cell gains an "Open in Colab" badge (the book adds its
own badge at build time) and the markdown shows the glued numbers of this run where the book has
{glue:text}`name` roles (no myst_nb in Colab to render them); code cells are copied verbatim, so the
pair test can compare them.
"""

import argparse
import ast
import re
import sys
import time
from pathlib import Path

import jupytext
import nbformat
import yaml
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
BOOK, NOTEBOOKS = ROOT / "book", ROOT / "notebooks"
BADGE = "https://colab.research.google.com/assets/colab-badge.svg"


def repository() -> tuple[str, str]:
    repo = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]
    return repo["url"].rstrip("/"), repo.get("branch", "main")


def chapters() -> list[Path]:
    """Executable chapters: book/*.md with a jupytext kernelspec header, not starting with '_'."""
    out = []
    for path in sorted(BOOK.glob("*.md")):
        if path.name.startswith("_"):
            continue
        if jupytext.read(path).metadata.get("kernelspec"):
            out.append(path)
    return out


def colab_badge(name: str) -> str:
    url, branch = repository()
    slug = url.split("github.com/", 1)[-1]
    link = f"https://colab.research.google.com/github/{slug}/blob/{branch}/notebooks/{name}.ipynb"
    return f"[![Open In Colab]({BADGE})]({link})"


def convert(md: Path) -> nbformat.NotebookNode:
    nb = jupytext.read(md)
    nb.metadata.pop("jupytext", None)  # the .ipynb is not a jupytext pair; keep kernelspec only
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    for cell in nb.cells:
        if cell.cell_type == "markdown" and cell.source.lstrip().startswith("# "):
            title, _, rest = cell.source.lstrip().partition("\n")
            cell.source = f"{title}\n\n{colab_badge(md.stem)}\n{rest}"
            break
    for i, cell in enumerate(nb.cells):  # stable ids (jupytext draws random ones): quiet diffs on re-runs
        cell.id = f"{md.stem[:20]}-{i:03d}"
    return nb


GLUE = "application/papermill.record/"
ROLE = re.compile(r"\{glue(?::(text|md|any))?\}`([^`:]+)(?::([^`]*))?`")


def glued_values(nb) -> dict[str, dict]:
    """{name: {mime: value}} of every myst_nb glue() in the executed notebook."""
    values = {}
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            name = out.get("metadata", {}).get("scrapbook", {}).get("name")
            if name:
                values[name] = {k[len(GLUE):]: v for k, v in out.get("data", {}).items() if k.startswith(GLUE)}
    return values


def fill_glue(nb) -> int:
    """Write the glued numbers into the markdown cells, in place of {glue:text}`name:fmt` (Colab and plain
    Jupyter have no myst_nb to render the roles: the prose must read with its numbers). Returns how many
    roles were filled; a role whose value was never glued is an error."""
    values, filled = glued_values(nb), 0

    def value(match):
        nonlocal filled
        kind, name, fmt = match.groups()
        if name not in values:
            raise SystemExit(f"glue role for {name!r} has no glued value in the executed notebook")
        data = values[name]
        if kind == "md" and "text/markdown" in data:
            filled += 1
            return data["text/markdown"]
        text = data.get("text/plain", "")
        try:
            obj = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            obj = text
        filled += 1
        return format(obj, fmt) if fmt else str(obj)

    for cell in nb.cells:
        if cell.cell_type == "markdown":
            cell.source = ROLE.sub(value, cell.source)
    return filled


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("chapters", nargs="*", type=Path, help="book/<name>.md files (default: all)")
    ap.add_argument("--no-execute", action="store_true", help="convert without executing")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per cell")
    args = ap.parse_args(argv)

    paths = [p.resolve() for p in args.chapters] or chapters()
    NOTEBOOKS.mkdir(exist_ok=True)
    for md in paths:
        nb = convert(md)
        t0 = time.time()
        if not args.no_execute:
            NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                           resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
            for cell in nb.cells:  # nbclient's timing metadata would churn every re-run
                cell.metadata.pop("execution", None)
            fill_glue(nb)
        out = NOTEBOOKS / f"{md.stem}.ipynb"
        nbformat.write(nb, out)
        print(f"{md.relative_to(ROOT)} -> {out.relative_to(ROOT)} ({time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
