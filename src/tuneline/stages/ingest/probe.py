"""What the ingest stage stores per file content: the probe record (size, format, alpha, a pixel
fingerprint; or a cacheable rejection), keyed by the file's sha256 and this module's code version.

Only this module and `tuneline.core.images` decide a stored record (the stage's CODE); the stage
itself (stage.py) rebuilds its output from the records on every run, so a change there re-probes
nothing.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from tuneline.core.codeversion import code_version
from tuneline.core.fsutil import digest_json
from tuneline.core.images import ImageRejected, exact_pixel_digest, probe
from tuneline.core.store import ItemStore
from tuneline.stages.ingest import CODE

STAGE = "ingest"
CODE_VERSION = code_version(CODE)  # changes with the code that makes the records


def probe_key(digest: str) -> str:
    return digest_json({"stage": STAGE, "code": CODE_VERSION, "bytes": digest})


def probe_file(path: str, digest: str, store_dir: str, max_pixels: int) -> tuple[dict[str, Any], bool, bool]:
    """Worker: the probe record of the file whose sha256 is `digest`, from the store or by decoding it.

    Returns (record, computed, stored). A verdict that depends on settings or permissions is not stored.
    """
    store = ItemStore(Path(store_dir), STAGE)
    key = probe_key(digest)
    known = store.read_json(key)
    if known is not None:  # a touched, renamed or copied file: same bytes, no new decode
        return known, False, True
    try:
        record: dict[str, Any] = {"ok": True, **asdict(probe(Path(path), max_pixels))}
    except ImageRejected as rejected:
        record = {"ok": False, "reason": str(rejected)}
        if not rejected.cacheable:
            return record, True, False
    except OSError as error:  # unreadable now (permissions): nothing about the bytes to store
        return {"ok": False, "reason": f"unreadable: {error.strerror or error}"}, True, False
    store.write_json(key, record)
    return record, True, True


def exact_pixels(store: ItemStore, digest: str, path: Path, record: dict[str, Any], max_pixels: int) -> str:
    """The digest of the file's fully decoded pixels, kept in its probe record once computed (only files
    whose reduced-decode fingerprints collide pay for a full decode)."""
    if record["fingerprint_exact"]:
        return record["fingerprint"]
    if "exact_pixel_digest" not in record:
        record["exact_pixel_digest"] = exact_pixel_digest(path, max_pixels)
        store.write_json(probe_key(digest), record)
    return record["exact_pixel_digest"]
