"""Task cache keys from content digests, never from paths or timestamps alone.

A stage's key is the digest of
  - its data inputs: for a folder with a manifest.jsonl (an upstream stage's output) the
    sha256 of that manifest (it lists every item's content digest); for anything else
    (models/train, prompts.yaml) the sha256 of every file's bytes, taken through
    the stat cache `tuneline.core.store.FileDigests` (unchanged size/mtime/inode: no rehash);
  - the params subset it reads (its `params:` in dvc.yaml, resolved on the validated
    params, so a default written out explicitly gives the same key);
  - its code version: the bytes of the code deps dvc.yaml lists for it;
  - the project root (two checkouts never share results).

A key alone is not a hit: the outputs must still be the ones the key produced. After a
successful run the flow records the outputs' fingerprint under the key
(`.tuneline/prefect/records/<stage>/<key>.json`); a later run whose outputs are missing
or differ (deleted folder, hand-edited caption) refreshes the task instead of trusting it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneline.core.fsutil import atomic_write_json, canonical_json
from tuneline.orchestration.spec import StageSpec

STATE_DIR = Path(".tuneline/prefect")  # relative to the project root; .tuneline/ is git-ignored
MANIFEST = "manifest.jsonl"
_SKIP_DIRS = {"__pycache__", ".git", ".dvc", ".ipynb_checkpoints"}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    found = []
    for folder, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        found.extend(Path(folder) / name for name in sorted(names) if not name.endswith(".pyc"))
    return found


class Digester:
    """Content digests of files and folders through the stat cache. Pass the item store's
    folder to share its cache with the scan stage: then each file is hashed once, by either."""

    def __init__(self, root: Path, store_dir: Path | str | None = None) -> None:
        from tuneline.core.store import FileDigests

        self.root = Path(root)
        folder = self.root / (store_dir if store_dir is not None else STATE_DIR)
        self._digests = FileDigests(folder / "file-digests.sqlite")
        # One Digester answers for one moment: a file is digested once, however many trees hold it.
        self._file_digests: dict[Path, str] = {}

    def close(self) -> None:
        self._digests.close()

    def __enter__(self) -> "Digester":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def tree(self, relative: str) -> str:
        """Digest of every file's relative path and bytes under root/relative ('missing' if absent)."""
        path = self.root / relative
        if not path.exists():
            return "missing"
        listing = [(f.relative_to(path).as_posix() if f != path else "", self._file(f)) for f in _files(path)]
        return _sha256(canonical_json(listing).encode())

    def _file(self, path: Path) -> str:
        if path not in self._file_digests:
            self._file_digests[path] = self._digests.digest(path)
        return self._file_digests[path]

    def data(self, relative: str) -> str:
        """An input: a stage output's manifest digest, or the tree digest of anything else."""
        manifest = self.root / relative / MANIFEST
        if manifest.is_file():
            return "manifest:" + _sha256(manifest.read_bytes())
        return self.tree(relative)


def raw_data_tags(root: Path | str) -> dict[str, str]:
    """The pipeline run's `tuneline.raw_data_digest`: the digest of what the scan stage listed (every
    data set file's path and sha256), so no second walk of the raw folders. Empty before scan ran."""
    from tuneline.core.layout import SCANNED

    manifest = Path(root) / SCANNED / MANIFEST
    if not manifest.is_file():
        return {}
    return {"tuneline.raw_data_digest": _sha256(manifest.read_bytes())}


def _lookup(data: Any, dotted: str) -> Any:
    node = data
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return node


def params_subset(params: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    """{dotted key: value} of the validated params (a pydantic Params or its dump)."""
    data = params.model_dump(mode="json") if hasattr(params, "model_dump") else params
    return {key: _lookup(data, key) for key in keys}


@dataclass(frozen=True)
class StageKey:
    stage: str
    key: str
    parts: dict[str, Any]  # what went into it, for logs and debugging


def _dataset_folders(params: Any) -> list[str]:
    return [str(d.path) for d in getattr(params, "datasets", [])]


def stage_key(spec: StageSpec, params: Any, root: Path | str, digester: Digester | None = None) -> StageKey:
    """The content-derived cache key of one stage (see the module docstring)."""
    own = digester is None
    digester = digester or Digester(Path(root), getattr(params, "store_dir", None))
    try:
        data_deps = list(spec.data_deps)
        if any(d == "data/raw" or d.startswith("data/raw/") for d in data_deps):
            # The data sets may live outside data/raw; their files are inputs all the same.
            data_deps += [f for f in _dataset_folders(params) if f not in data_deps]
        parts = {
            "stage": spec.name,
            "root": str(Path(root).resolve()),
            "data": {dep: digester.data(dep) for dep in data_deps},
            "params": params_subset(params, spec.params),
            "code": {dep: digester.tree(dep) for dep in spec.code_deps},
        }
    finally:
        if own:
            digester.close()
    return StageKey(spec.name, _sha256(canonical_json(parts).encode())[:32], parts)


def output_fingerprint(spec: StageSpec, root: Path | str, digester: Digester | None = None) -> dict[str, str]:
    """Tree digests (every file's bytes) of the stage's cached outputs."""
    own = digester is None
    digester = digester or Digester(Path(root))
    try:
        return {out: digester.tree(out) for out in spec.outs}
    finally:
        if own:
            digester.close()


def _record_path(root: Path, stage: str, key: str) -> Path:
    return Path(root) / STATE_DIR / "records" / stage / f"{key}.json"


def write_record(root: Path | str, stage: str, key: str, fingerprint: dict[str, str]) -> None:
    atomic_write_json(_record_path(Path(root), stage, key), {"stage": stage, "key": key, "outputs": fingerprint})


def read_record(root: Path | str, stage: str, key: str) -> dict[str, Any] | None:
    try:
        return json.loads(_record_path(Path(root), stage, key).read_text("utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def outputs_match(root: Path | str, spec: StageSpec, key: str, digester: Digester | None = None) -> bool:
    """True when the outputs on disk are the ones recorded after the run that made `key`."""
    record = read_record(root, spec.name, key)
    if record is None:
        return False
    current = output_fingerprint(spec, root, digester)
    return record.get("outputs") == current and "missing" not in current.values()
