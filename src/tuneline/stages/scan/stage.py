"""Stage `scan`: write data/scanned/manifest.jsonl (see the package docstring).

One line per file under each data set's folder, in path order (hidden files and folders skipped,
symlinked folders followed, each real folder once):
    {"dataset": <folder>, "path": <relative to the project>, "digest": <sha256>}
or, for a file that cannot be read as one,
    {"dataset": <folder>, "path": ..., "problem": <why: a broken link, a FIFO, a folder seen twice>}
Which files are images, sidecars or masks is ingest's business; this stage only lists and hashes.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneline.config import Params
from tuneline.core.fsutil import file_digest, rebuilt_dir, relative_to_root
from tuneline.core.manifest import MANIFEST, write_jsonl
from tuneline.core.parallel import map_with_progress
from tuneline.core.report import StageReport
from tuneline.core.store import FileDigests

STAGE = "scan"
DIGESTS_FILE = "file-digests.sqlite"  # in the store folder: shared with the flow's Digester
IN_PROCESS_BELOW = 64  # fewer new files than this are hashed without a thread pool


@dataclass(frozen=True)
class _Found:
    """A file seen on the walk: its manifest path, the stat-cache key (its real path) and stat."""

    path: str
    real: str
    signature: tuple[int, int, int] | None  # (size, mtime_ns, inode); None with a problem
    problem: str | None = None


def _problem_of(entry: os.DirEntry[str]) -> tuple[os.stat_result | None, str | None]:
    try:
        info = entry.stat()  # follows a symbolic link
    except OSError as error:
        if entry.is_symlink():
            return None, "unreadable: broken symbolic link"
        return None, f"unreadable: {error.strerror or error}"
    if not stat.S_ISREG(info.st_mode):  # reading a FIFO would block forever; a device is no image either
        return None, "not a regular file (a FIFO, socket or device)"
    return info, None


def walk(folder: Path, root: Path) -> list[_Found]:
    """Every file under `folder` in path order (depth first, names sorted: the order of sorting the
    paths' parts). Hidden entries are skipped; a folder reached a second time through a link is
    listed as a problem, not searched again, so a link loop ends."""
    found: list[_Found] = []
    seen: set[str] = set()
    root = Path(root)

    def visit(directory: str, shown: str) -> None:
        real = os.path.realpath(directory)
        if real in seen:
            found.append(_Found(shown, real, None, f"skipped: the folder {relative_to_root(Path(real), root)} was "
                                "already searched through another path (a symbolic link loop or a second link)"))
            return
        seen.add(real)
        try:
            with os.scandir(directory) as listing:
                entries = sorted((e for e in listing if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError as error:
            found.append(_Found(shown, real, None, f"unreadable folder: {error.strerror or error}"))
            return
        for entry in entries:
            child = f"{shown}/{entry.name}"
            try:
                is_folder = entry.is_dir()  # follows a symbolic link, as the walk does
            except OSError:
                is_folder = False
            if is_folder:
                visit(entry.path, child)
                continue
            info, problem = _problem_of(entry)
            real_file = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(real, entry.name)
            signature = None if info is None else (info.st_size, info.st_mtime_ns, info.st_ino)
            found.append(_Found(child, real_file, signature, problem))

    visit(os.path.abspath(folder), relative_to_root(Path(folder), root))
    return found


def _hash(path: str) -> tuple[str | None, str | None]:
    """(sha256, None) or (None, why the file cannot be read)."""
    try:
        return file_digest(Path(path)), None
    except OSError as error:
        return None, f"unreadable: {error.strerror or error}"


def scan(params: Params, root: Path, report: StageReport) -> list[dict[str, Any]]:
    """The manifest records of every data set's files; new or changed files are hashed (and remembered)."""
    root = Path(root)
    digests = FileDigests(root / params.store_dir / DIGESTS_FILE)
    try:
        known = digests.snapshot()
        listed: list[tuple[str, _Found]] = []
        for dataset in params.datasets:
            folder = dataset.folder  # computed once: a property, per file it cost 0.1 s at 100,000 files
            listed.extend((folder, found) for found in walk(root / dataset.path, root))
        digest_of: dict[str, str | None] = {}
        problem_of: dict[str, str] = {}
        new: dict[str, tuple[int, int, int]] = {}
        for _, found in listed:
            if found.problem is not None or found.real in digest_of or found.real in new:
                continue
            row = known.get(found.real)
            if row is not None and row[:3] == found.signature:
                digest_of[found.real] = row[3]
            else:
                assert found.signature is not None
                new[found.real] = found.signature
        workers = 1 if len(new) < IN_PROCESS_BELOW else params.ingest.workers
        paths = sorted(new)
        for path, (digest, problem) in zip(paths, map_with_progress(_hash, [(p,) for p in paths], workers,
                                                                     "scan: hashing new files", threads=True)):
            digest_of[path] = digest
            if digest is None:
                problem_of[path] = problem or "unreadable"
            else:
                digests.remember(Path(path), digest, new[path])
        report.computed = sum(1 for path in new if digest_of.get(path))
        report.reused = sum(1 for _, f in listed if f.problem is None and f.real not in new)
    finally:
        digests.close()
    records = []
    for dataset, found in listed:
        problem = found.problem or problem_of.get(found.real)
        records.append({"dataset": dataset, "path": found.path, **(
            {"problem": problem} if problem else {"digest": digest_of[found.real]})})
    return records


def run(params: Params, root: Path, out_dir: Path, metrics_dir: Path | None = None, *,
        tracker: Any = None) -> StageReport:
    """List and hash every data set's files into `out_dir/manifest.jsonl` (rewritten on every run: DVC deletes
    an always-changed stage's output before it runs)."""
    from tuneline.preflight import preflight

    started = time.perf_counter()
    preflight(params, Path(root), stages=(STAGE,))
    report = StageReport(STAGE, metric_keys=("items", "problems"))
    records = scan(params, Path(root), report)
    report.extra["problems"] = sum(1 for record in records if "problem" in record)
    out_dir = Path(out_dir)
    with rebuilt_dir(out_dir) as staging:
        write_jsonl(staging / MANIFEST, records)
    report.seconds = time.perf_counter() - started
    if metrics_dir is not None:
        report.write_metrics(metrics_dir)
    return report
