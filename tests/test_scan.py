"""The scan stage: every data set file with its sha256, in path order, hashed only when its stat changed,
and what ingest reads instead of walking the raw folders."""

from __future__ import annotations

import hashlib
import os

from conftest import save_photo


def scanned(project) -> list[dict]:
    from tuneline.core.manifest import read_manifest

    return read_manifest(project.root / "data/scanned")


def test_scan_lists_every_file_and_hashes_only_what_changed(project):
    alpha, beta = project.raw("alpha"), project.raw("beta")
    for i in range(3):
        save_photo(alpha / f"p{i}.jpg", (80, 80), i)
    (alpha / "p0.txt").write_text("a caption", "utf-8")
    save_photo(alpha / "sub" / "deep.png", (70, 90), 5)
    (alpha / "sub-b.jpg").write_bytes((alpha / "p1.jpg").read_bytes())  # sorts after sub/ by parts, before by text
    save_photo(beta / "b.png", (90, 70), 7)
    (alpha / ".hidden.jpg").write_bytes(b"not data")
    params = project.params()

    first = project.scan(params)
    records = scanned(project)
    assert [(r["dataset"], r["path"]) for r in records] == [
        ("alpha", f"data/raw/alpha/{name}") for name in ("p0.jpg", "p0.txt", "p1.jpg", "p2.jpg", "sub/deep.png",
                                                           "sub-b.jpg")] + [("beta", "data/raw/beta/b.png")]
    assert all(r["digest"] == hashlib.sha256((project.root / r["path"]).read_bytes()).hexdigest() for r in records)
    assert (first.computed, first.reused, first.extra["problems"]) == (7, 0, 0)
    listing = (project.root / "data/scanned/manifest.jsonl").read_bytes()

    again = project.scan(params)
    assert (again.computed, again.reused) == (0, 7)
    assert (project.root / "data/scanned/manifest.jsonl").read_bytes() == listing

    # Touched: hashed again (its stat changed), the same digest, the same listing.
    os.utime(alpha / "p1.jpg", ns=(1_000_000_000, 1_000_000_000))
    touched = project.scan(params)
    assert (touched.computed, touched.reused) == (1, 6)
    assert (project.root / "data/scanned/manifest.jsonl").read_bytes() == listing

    # One new file, one edited: two hashes, two lines differ.
    save_photo(beta / "new.png", (90, 90), 9)
    (alpha / "p0.txt").write_text("another caption", "utf-8")
    changed = project.scan(params)
    assert (changed.computed, changed.reused) == (2, 6)
    before = {r["path"]: r["digest"] for r in records}
    after = {r["path"]: r["digest"] for r in scanned(project)}
    assert sorted(path for path in after if before.get(path) != after[path]) == [
        "data/raw/alpha/p0.txt", "data/raw/beta/new.png"]


def test_ingest_reads_the_scan_and_rejects_what_it_could_not_read(project):
    alpha = project.raw("alpha")
    save_photo(alpha / "good.jpg", (80, 80), 1)
    (alpha / "gone.jpg").symlink_to(alpha / "missing.jpg")
    os.mkfifo(alpha / "pipe.png")
    project.scan()
    problems = {r["path"].rsplit("/", 1)[1]: r["problem"] for r in scanned(project) if "problem" in r}
    assert problems == {"gone.jpg": "unreadable: broken symbolic link",
                        "pipe.png": "not a regular file (a FIFO, socket or device)"}

    # A file added after the scan is not ingested until the scan runs again: ingest reads its list.
    from tuneline.stages.ingest.stage import run as run_ingest

    save_photo(alpha / "later.jpg", (80, 80), 2)
    params = project.params()
    report = run_ingest(params, project.root, project.root / "data/scanned", project.root / "data/ingested")
    assert [r["source"] for r in project.manifest("data/ingested")] == ["data/raw/alpha/good.jpg"]
    assert sorted(r["source"].rsplit("/", 1)[1] for r in report.rejected) == ["gone.jpg", "pipe.png"]
    project.ingest(params)
    assert [r["source"] for r in project.manifest("data/ingested")] == ["data/raw/alpha/good.jpg",
                                                                        "data/raw/alpha/later.jpg"]


def test_a_rerun_reads_no_file_per_image(project, monkeypatch):
    """The probe records, sidecar captions and exact pixel digests of a rerun come from the ingest memo
    (one SQLite file): no probe record, sidecar or image is read again, and the output is the same."""
    from tuneline.core.store import ItemStore
    from tuneline.stages.ingest import probe, stage

    alpha = project.raw("alpha")
    for i in range(3):
        save_photo(alpha / f"p{i}.jpg", (96, 80), i)
        (alpha / f"p{i}.txt").write_text(f"caption {i}", "utf-8")
    save_photo(alpha / "j.jpg", (640, 480), 7, quality=90)
    data = (alpha / "j.jpg").read_bytes()  # a comment segment: other bytes, the same pixels
    (alpha / "j_meta.jpg").write_bytes(data[:2] + b"\xff\xfe\x00\x06memo" + data[2:])
    first = project.ingest()
    assert first.extra["duplicates"] == 1 and first.computed == 4
    manifest = (project.root / "data/ingested/manifest.jsonl").read_bytes()

    reads: list[str] = []
    monkeypatch.setattr(ItemStore, "read_json", lambda self, key: reads.append("record"))
    monkeypatch.setattr(stage, "decode_sidecar", lambda raw: reads.append("sidecar") or (None, False))
    monkeypatch.setattr(probe, "exact_pixel_digest", lambda *args: reads.append("pixels"))
    again = project.ingest()
    assert reads == []
    assert (again.computed, again.reused, again.extra["duplicates"]) == (0, 4, 1)
    assert (project.root / "data/ingested/manifest.jsonl").read_bytes() == manifest
