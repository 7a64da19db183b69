"""The code behind an export, for every file's header (the headers themselves: the family's exporter,
built on tuneline.models.export)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def code_provenance(code_dir: Path | None = None) -> dict[str, Any]:
    """The code that produced a file: tuneline's version plus the git commit and dirty flag of the
    checkout holding it (`0.1.0+g1a2b3c4d5e6f.dirty`), so the file alone names its code even with
    tracking off. Outside a git checkout: the version alone, commit "unknown".

    Dirty means uncommitted changes to the tuneline package only: in a project that is also the
    checkout, `dvc repro` rewrites dvc.lock, which must not change what an export says of its code."""
    import tuneline
    from tuneline import __version__
    from tuneline.core.tracking.tracker import git_commit, git_dirty

    code_dir = code_dir or Path(__file__).resolve().parent
    commit = git_commit(code_dir)
    if commit == "unknown":
        return {"code_version": __version__, "git_commit": commit, "git_dirty": None}
    dirty = git_dirty(code_dir, str(Path(tuneline.__file__).resolve().parent))
    return {"code_version": f"{__version__}+g{commit[:12]}" + (".dirty" if dirty else ""),
            "git_commit": commit, "git_dirty": dirty}


# The model card's variant for MLflow's artifact view. MLflow 3.17 previews a .md artifact with images
# only from http(s) addresses (a relative `![x](samples/0.png)` shows as that text, data: addresses are
# dropped, raw HTML is shown as text), and previews an .html artifact in a sandboxed frame with no base
# address: the same card as HTML, with the samples inlined as data: addresses, shows them there. The
# README.md beside the files keeps relative links, which the Hugging Face hub resolves in its repository.
MLFLOW_CARD = "model_card.html"


def card_html(markdown: str, images: dict[str, Path]) -> str:
    """The card's markdown as a standalone HTML page; each image link named in `images` (relative path
    -> file) is inlined as a data: address."""
    import base64
    import html

    from markdown_it import MarkdownIt  # rich's dependency: always installed

    renderer = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = renderer.parse(markdown)
    for token in tokens:
        for child in token.children or ():
            src = child.attrGet("src") if child.type == "image" else None
            if src in images:
                data = base64.b64encode(Path(images[src]).read_bytes()).decode("ascii")
                child.attrSet("src", f"data:image/png;base64,{data}")
                child.attrSet("style", "max-width:100%")
    body = renderer.renderer.render(tokens, renderer.options, {})
    title = html.escape(markdown.splitlines()[0].lstrip("# ").strip() if markdown else "model card")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title>"
            "<style>body{font-family:sans-serif;max-width:60em;margin:1em auto;padding:0 1em}"
            "code{background:#f3f3f3}img{margin:.25em}</style></head>\n<body>\n" + body + "</body></html>\n")
