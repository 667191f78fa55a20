"""Sphinx extension: an "Open in Colab" badge under the title of every chapter.

A chapter book/<name>.md that has a paired notebooks/<name>.ipynb gets a badge linking to
https://colab.research.google.com/github/<owner>/<repo>/blob/<branch>/notebooks/<name>.ipynb.
The repository URL and branch come from `_config.yml` (`repository.url`, `repository.branch`),
so chapters never spell the URL. The badge image is a local SVG (the book builds offline).
"""

from pathlib import Path

from docutils import nodes

BADGE = "/book/_static/colab-badge.svg"  # leading "/" = relative to the source dir (repo root)


def colab_url(repository_url: str, branch: str, name: str) -> str:
    slug = repository_url.rstrip("/").removesuffix(".git").split("github.com/", 1)[-1]
    return f"https://colab.research.google.com/github/{slug}/blob/{branch}/notebooks/{name}.ipynb"


def add_badge(app, doctree):
    docname = app.env.docname
    if not docname.startswith("book/"):
        return
    name = docname.removeprefix("book/")
    if not (Path(app.srcdir) / "notebooks" / f"{name}.ipynb").exists():
        return  # a page without code (e.g. the landing page)
    opts = app.config.html_theme_options
    url = colab_url(opts["repository_url"], opts.get("repository_branch", "main"), name)
    section = next(iter(doctree.findall(nodes.section)), None)
    if section is None:
        return
    image = nodes.image(uri=BADGE, alt="Open In Colab", candidates={"*": BADGE.lstrip("/")})
    link = nodes.reference("", "", image, refuri=url, internal=False)
    section.insert(1, nodes.paragraph("", "", link, classes=["colab-badge"]))


def setup(app):
    # before Sphinx's image collector (priority 500) so the SVG is copied into _images
    app.connect("doctree-read", add_badge, priority=100)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
