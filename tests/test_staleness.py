"""Never a stale result, never a needless rerun: `dvc repro` on the demo after a rename, a caption
edit (in data/caption_edits, and in place), and a model replaced in place, with exact per-stage
computed counts; one copy of derived bytes, and DVC's cache never changed under its hashes."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from test_dvc_pipeline import REPO, dvc, run_report
from test_flows import demo_project

# Through latents: that a new latent starts a new training run (never a resume) is test_dvc_pipeline's.
STAGES = ("models", "scan", "ingest", "bucket", "autoencoder", "caption", "latents")


def ran(out: str) -> set[str]:
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}


@pytest.fixture
def demo(tmp_path):
    """The demo through `latents`, under git and DVC."""
    demo_project(tmp_path, STAGES)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tracking"] = {"enabled": False}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return tmp_path


@pytest.mark.slow
def dvc_cache_objects_hold_their_hashes(root: Path) -> list[str]:
    """DVC cache objects whose bytes are not what their md5 names (empty: DVC's cache is sound)."""
    return [str(path) for path in (root / ".dvc/cache/files/md5").rglob("*")
            if path.is_file() and not path.name.endswith(".dir")
            and hashlib.md5(path.read_bytes()).hexdigest() != path.parent.name + path.name]


def test_renames_caption_edits_and_models_replaced_in_place(demo):
    from tuneline.tiny import resolve_tiny

    assert ran(dvc(demo, "repro")) == set(STAGES)
    # One copy of derived bytes (.dvc/config: cache.type hardlink, copy): each pack of latents is one
    # inode, the item store's pack, the output file and DVC's cache object, read-only; no loose item is left.
    record = json.loads((demo / "data/latents/manifest.jsonl").read_text().splitlines()[0])
    pack = (demo / "data/latents" / record["latents"]["pack"]).stat()
    cached = {path.stat().st_ino for path in (demo / ".dvc/cache/files/md5").rglob("*") if path.is_file()}
    stored = {path.stat().st_ino for path in (demo / ".tuneline/store/latents/packs").rglob("*.tar")}
    assert pack.st_nlink == 3 and pack.st_ino in cached and pack.st_ino in stored
    assert pack.st_mode & 0o777 == 0o444
    assert not list((demo / ".tuneline/store/latents").glob("*/*.safetensors"))

    # A caption written in data/caption_edits: caption reruns and takes it (no model caption), latents
    # encodes that one caption's text again and no image.
    captioned = {json.loads(line)["id"]: json.loads(line) for line in
                 (demo / "data/captioned/manifest.jsonl").read_text().splitlines()}
    item = next(r for r in captioned.values() if r["dataset"] == "shapes")
    edit = demo / "data/caption_edits/shapes" / f"{item['id']}.txt"
    edit.parent.mkdir(parents=True)
    edit.write_text("shp, a hand-written caption\n")
    packs = {path: path.stat().st_ino for path in (demo / "data/latents").rglob("*.tar")}
    assert ran(dvc(demo, "repro")) == {"models", "scan", "caption", "latents"}
    caption, latents = run_report(demo, "caption"), run_report(demo, "latents")
    assert (caption["computed"], caption["hand_edited"]) == (0, 1)
    assert (latents["computed"], latents["text_embeddings_computed"]) == (0, 1)
    # One pack rewritten: the edited item's text embeddings; every latents pack is linked as it was.
    rewritten = [path.name for path, inode in packs.items() if path.stat().st_ino != inode]
    assert rewritten == [f"{item['id'][:2]}.text.tar"]
    assert dvc_cache_objects_hold_their_hashes(demo) == []
    assert ran(dvc(demo, "repro")) == {"models", "scan"}

    # A rename (image and sidecar, same bytes): ingest and bucket rerun and compute nothing, and
    # nothing after them runs: their outputs hold no paths, so they are byte for byte the same.
    source = next(p for p in sorted((demo / "data/raw/shapes").glob("*.jpg")) if p.with_suffix(".txt").is_file())
    source.rename(source.with_name("renamed.jpg"))
    source.with_suffix(".txt").rename(source.with_name("renamed.txt"))
    out = dvc(demo, "repro")
    assert ran(out) == {"models", "scan", "ingest", "bucket"}, out
    assert (run_report(demo, "ingest")["computed"], run_report(demo, "bucket")["computed"]) == (0, 0)
    sources = [json.loads(line)["source"] for line in (demo / "data/ingested/manifest.jsonl").read_text().splitlines()]
    assert "data/raw/shapes/renamed.jpg" in sources

    # A local copy of the base's VAE: the same bytes, the same identity, so nothing recomputes.
    vae = demo / "my-vae"
    shutil.copytree(resolve_tiny("tiny-sdxl") / "vae", vae)
    params = yaml.safe_load((demo / "params.yaml").read_text())
    params["model"]["vae"] = "my-vae"
    (demo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # (autoencoder reads the model too: off, it reruns as the no-op it is)
    assert ran(dvc(demo, "repro")) == {"models", "scan", "autoencoder", "caption", "latents"}
    assert (run_report(demo, "caption")["computed"], run_report(demo, "latents")["computed"]) == (0, 0)
    first_identity = json.loads((demo / "models/identity/models.json").read_text())["model.vae"]["identity"]

    # The same path, other weights; nothing in params.yaml or dvc.yaml changed.
    weights = vae / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, weights)
    out = dvc(demo, "repro")
    assert ran(out) == {"models", "scan", "autoencoder", "caption", "latents"}, out  # caption reruns, computes nothing
    assert json.loads((demo / "models/identity/models.json").read_text())["model.vae"]["identity"] != first_identity
    assert (run_report(demo, "caption")["computed"], run_report(demo, "latents")["computed"]) == (0, 14)

    assert ran(dvc(demo, "repro")) == {"models", "scan"}  # unchanged: only the identity check and the scan run
