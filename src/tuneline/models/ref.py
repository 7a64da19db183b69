"""Where a model lives and what it is: the identity that goes into cache keys.

A model reference is a tiny random model id (`tiny-sdxl`, `tiny-zimage`, `tiny-florence2`), a local
folder, a local single file, or a hub id. Its identity is what decides its outputs:
for local files the digests of the config and weight files (renaming a folder keeps
the cache, retraining it invalidates the cache); for a hub id, id@revision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuneline.core.fsutil import digest_json
from tuneline.core.store import FileDigests

# Files that decide a model's outputs. Tokenizer files count: they change the input ids.
_IDENTITY_SUFFIXES = {".json", ".safetensors", ".bin", ".txt", ".model", ".ckpt", ".pt", ".pth"}


def resolve_model(ref: str, root: Path | None = None) -> Path | str:
    """A local path for tiny ids and existing files/folders (relative to `root`), else the hub id as given."""
    from tuneline.tiny import resolve_tiny

    tiny = resolve_tiny(ref)
    if tiny is not None:
        return tiny
    path = Path(ref).expanduser()
    if not path.is_absolute() and root is not None:
        path = Path(root) / path
    if path.exists():
        return path
    return ref


def is_tiny(ref: str) -> bool:
    from tuneline.tiny import TINY_MODEL_IDS

    return ref in TINY_MODEL_IDS


def model_identity(
    ref: str,
    revision: str | None = None,
    subfolder: str | None = None,
    root: Path | None = None,
    digests: FileDigests | None = None,
) -> str:
    """Digest naming exactly these weights (and tokenizer/config) of `ref`, or of one subfolder."""
    resolved = resolve_model(ref, root)
    if isinstance(resolved, str):
        # Hub id: the revision names the weights. An unpinned revision ("main") can move:
        # pin a commit hash in params.yaml for caches that can never go stale.
        return digest_json({"hub": ref, "revision": revision or "main", "subfolder": subfolder})
    target = resolved / subfolder if subfolder and resolved.is_dir() else resolved
    files = [target] if target.is_file() else sorted(
        p for p in target.rglob("*") if p.is_file() and p.suffix in _IDENTITY_SUFFIXES
    )
    if not files:
        raise FileNotFoundError(f"no model files under {target}")
    own = digests is None
    digests = digests or _default_digests(root)
    try:
        entries = {str(p.relative_to(target)) if p != target else p.name: digests.digest(p) for p in files}
        digests.commit()
    finally:
        if own:
            digests.close()
    return digest_json({"files": entries})


def _default_digests(root: Path | None) -> FileDigests:
    import tempfile

    base = Path(root) / ".tuneline" if root is not None else Path(tempfile.gettempdir()) / "tuneline"
    return FileDigests(base / "model-digests.sqlite")


def describe(ref: str) -> dict[str, Any]:
    """Facts for logs and metadata; says plainly when a model is a random tiny one."""
    return {"ref": ref, "random_tiny_model": is_tiny(ref)}


def references(params: Any) -> dict[str, tuple[str, str | None]]:
    """Every model reference params.yaml makes: {key: (ref, revision)}, unset ones left out."""
    model = params.model
    found = {"model.base": (model.base, model.revision)}
    if model.vae:
        found["model.vae"] = (model.vae, None)
    if model.config:
        found["model.config"] = (model.config, None)
    if params.caption.mode != "sidecar_only":
        found["caption.model"] = (params.caption.model, params.caption.revision)
    return found


def identify(params: Any, root: Path, keys: tuple[str, ...] | None = None) -> dict[str, dict[str, Any]]:
    """{key: {ref, revision, kind, identity}} for the references of `params` (or only `keys`):
    local files by content (digests cached by size, mtime and inode), hub ids by id@revision."""
    digests = _default_digests(root)
    try:
        found = {}
        for key, (ref, revision) in references(params).items():
            if keys is not None and key not in keys:
                continue
            resolved = resolve_model(ref, root)
            kind = "tiny (RANDOM weights)" if is_tiny(ref) else "hub" if isinstance(resolved, str) else "local"
            found[key] = {"ref": ref, "revision": revision, "kind": kind,
                          "identity": model_identity(ref, revision, root=root, digests=digests)}
        return found
    finally:
        digests.close()
