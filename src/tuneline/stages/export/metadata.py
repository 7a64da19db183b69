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
