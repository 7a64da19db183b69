"""Stage `latents`: VAE latent distributions and text embeddings, cached per item, on the tiny SDXL."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import save_photo
from tuneline.core.manifest import read_jsonl, write_jsonl

LATENTS = {"batch_size": 2, "dtype": "fp32", "device": "cpu", "flip": True, "text_embeddings": True, "workers": 2}


@pytest.fixture(scope="module", autouse=True)
def tiny_home(tmp_path_factory: pytest.TempPathFactory):
    """One TUNELINE_HOME for the module: the tiny SDXL is built once."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TUNELINE_HOME", str(tmp_path_factory.mktemp("tuneline-home")))
        yield


def write_captioned(project, captions: dict[str, str] | None = None) -> list[dict]:
    """data/captioned as the caption stage writes it: the bucketed images plus a `caption` per record."""
    captions = captions or {}
    bucketed, captioned = project.root / "data/bucketed", project.root / "data/captioned"
    shutil.rmtree(captioned, ignore_errors=True)
    shutil.copytree(bucketed, captioned)
    records = project.manifest("data/bucketed")  # with each record's source file, looked up by id
    for record in records:
        name = record.pop("source").rsplit("/", 1)[-1]
        record["caption"] = captions.get(name, f"a photo named {name}")
    write_jsonl(captioned / "manifest.jsonl", records)
    return records


def run(project, params=None):
    from tuneline.stages.latents.stage import run as run_latents

    return run_latents(params or project.params(), project.root, project.root / "data/captioned",
                       project.root / "data/latents", project.root / "metrics")


@pytest.fixture
def captioned(project):
    """Three landscape images (one bucket, batch 2 -> a full and a partial batch) and one portrait."""
    for index in range(3):
        save_photo(project.raw("alpha") / f"a{index}.jpg", (200 + 8 * index, 120), index, quality=92)
    save_photo(project.raw("beta") / "b0.png", (120, 200), 10)
    project.params_data["latents"] = dict(LATENTS)
    project.ingest()
    project.bucket()
    write_captioned(project)
    return project


def by_name(project) -> dict[str, dict]:
    return {r["source"].rsplit("/", 1)[-1]: r for r in project.manifest("data/latents")}


def test_latents_cached_then_reused_without_loading_the_vae(captioned):
    from safetensors.torch import load_file

    first = run(captioned)
    assert (first.computed, first.reused, first.rejected) == (4, 0, [])
    assert first.extra["vae_loaded"] and first.extra["text_encoders_loaded"]
    assert first.extra["text_embeddings_computed"] == 4 and first.extra["text_embeddings"] == "cached"

    records = by_name(captioned)
    wide = records["a0.jpg"]
    width, height = wide["bucket"]
    assert wide["latent_shape"] == [4, height // 8, width // 8]
    assert wide["scaling_factor"] == pytest.approx(0.13025) and wide["shift_factor"] is None
    assert wide["has_flip"] and wide["caption"] == "a photo named a0.jpg" and wide["latent_dtype"] == "fp32"
    out = captioned.root / "data/latents"
    stored = load_file(out / wide["latents"])
    assert set(stored) == {"mean", "std", "flip_mean", "flip_std"}
    assert all(t.shape == (4, height // 8, width // 8) for t in stored.values())
    store = captioned.root / ".tuneline/store/latents" / wide["latent_key"][:2] / f"{wide['latent_key']}.safetensors"
    assert os.path.samefile(out / wide["latents"], store)  # hard link into the store
    summary = json.loads((out / "latents.json").read_text())
    assert summary["random_tiny_model"] and summary["text_embeddings"] and summary["scaling_factor"] == 0.13025
    assert json.loads((captioned.root / "reports/latents.json").read_text())["computed"] == 4
    assert json.loads((captioned.root / "metrics/latents.json").read_text()) == {"items": 4, "rejected": 0}

    second = run(captioned)
    assert (second.computed, second.reused) == (0, 4)
    assert not second.extra["vae_loaded"] and not second.extra["text_encoders_loaded"]
    assert second.extra["text_embeddings_reused"] == 4
    assert by_name(captioned) == records


def test_stored_distribution_is_the_vaes_and_decodes_to_the_image_size(captioned):
    import torch
    from safetensors.torch import load_file

    from tuneline.stages.latents.stage import load_pixels
    from tuneline.models.loading import load_vae

    params = captioned.params()
    run(captioned, params)
    vae = load_vae(params.model, captioned.root, "fp32", "cpu")
    for name, record in by_name(captioned).items():
        stored = load_file(captioned.root / "data/latents" / record["latents"])
        pixels = load_pixels(captioned.root / "data/captioned" / record["image"])[None]
        assert pixels.min() >= -1 and pixels.max() <= 1 and pixels.shape[1:] == (3, record["bucket"][1], record["bucket"][0])
        with torch.no_grad():
            dist = vae.encode(pixels).latent_dist
            flipped = vae.encode(pixels.flip(-1)).latent_dist
        assert torch.allclose(stored["mean"], dist.mean[0], atol=1e-5)
        assert torch.allclose(stored["std"], dist.std[0], atol=1e-5)
        assert torch.allclose(stored["flip_mean"], flipped.mean[0], atol=1e-5)
        assert torch.allclose(stored["flip_std"], flipped.std[0], atol=1e-5)
        assert not torch.allclose(stored["mean"], stored["flip_mean"])
        if name in ("a0.jpg", "b0.png"):  # one landscape, one portrait: decoding is the slow part
            # What the trainer does: sample from the stored distribution and scale; and back.
            sample = stored["mean"] + stored["std"] * torch.randn(stored["mean"].shape, generator=torch.Generator().manual_seed(0))
            latent = (sample - (record["shift_factor"] or 0.0)) * record["scaling_factor"]
            with torch.no_grad():
                decoded = vae.decode((latent / record["scaling_factor"] + (record["shift_factor"] or 0.0))[None]).sample
            assert decoded.shape == pixels.shape and torch.isfinite(decoded).all()


def test_new_image_costs_one_latent_and_a_caption_edit_costs_one_text_embedding(captioned):
    first = run(captioned)
    save_photo(captioned.raw("beta") / "b1.png", (124, 200), 11)
    captioned.ingest()
    captioned.bucket()
    write_captioned(captioned)
    added = run(captioned)
    assert (added.computed, added.reused) == (1, 4)
    assert (added.extra["text_embeddings_computed"], added.extra["text_embeddings_reused"]) == (1, 4)

    keys = {name: r["latent_key"] for name, r in by_name(captioned).items()}
    write_captioned(captioned, {"a1.jpg": "an edited caption"})
    edited = run(captioned)
    assert (edited.computed, edited.reused) == (0, 5) and not edited.extra["vae_loaded"]
    assert (edited.extra["text_embeddings_computed"], edited.extra["text_embeddings_reused"]) == (1, 4)
    records = by_name(captioned)
    assert {name: r["latent_key"] for name, r in records.items()} == keys
    assert records["a1.jpg"]["caption"] == "an edited caption"
    assert first.extra["text_embeddings_computed"] == 4


def test_text_embeddings_are_the_pipelines_sdxl_conditioning(captioned):
    import torch
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from tuneline.models.ref import resolve_model
    from tuneline.tiny.sdxl import TE1_HIDDEN, TE2_HIDDEN, TE2_PROJECTION

    write_captioned(captioned, {"a0.jpg": "shp, a red square", "a1.jpg": "shp, a red square"})
    report = run(captioned)
    assert report.extra["text_embeddings_computed"] == 3  # two items share one caption
    records = by_name(captioned)
    assert records["a0.jpg"]["text_key"] == records["a1.jpg"]["text_key"]
    stored = load_file(captioned.root / "data/latents" / records["a0.jpg"]["text_embeddings"])
    assert stored["prompt_embeds"].shape == (77, TE1_HIDDEN + TE2_HIDDEN)
    assert stored["pooled"].shape == (TE2_PROJECTION,)

    pipe = StableDiffusionXLPipeline.from_pretrained(resolve_model("tiny-sdxl"), dtype=torch.float32)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt("shp, a red square", device="cpu", do_classifier_free_guidance=False)
    assert torch.allclose(stored["prompt_embeds"], embeds[0], atol=1e-5)
    assert torch.allclose(stored["pooled"], pooled[0], atol=1e-5)


def test_text_cache_blockers():
    from tuneline.stages.latents.stage import text_cache_blockers

    assert text_cache_blockers(0.0, False, False) == []
    reasons = text_cache_blockers(0.1, True, True)
    assert len(reasons) == 3
    assert "caption_dropout" in reasons[0] and "caption_shuffle" in reasons[1] and "train_text_encoders" in reasons[2]


def test_caption_dropout_turns_the_text_cache_off_and_keeps_the_latents(captioned):
    run(captioned)
    captioned.params_data["train"] = {}
    blocked = run(captioned, captioned.params(train={"caption_dropout": 0.1}))
    assert (blocked.computed, blocked.reused) == (0, 4)
    assert blocked.extra["text_embeddings"].startswith("off: train.caption_dropout is 0.1")
    assert not blocked.extra["text_encoders_loaded"] and blocked.extra["text_embeddings_computed"] == 0
    assert all(r["text_embeddings"] is None and r["text_key"] is None for r in captioned.manifest("data/latents"))
    assert not list((captioned.root / "data/latents").rglob("*.text.safetensors"))
    summary = json.loads((captioned.root / "data/latents/latents.json").read_text())
    assert not summary["text_embeddings"] and "caption_dropout" in summary["text_embeddings_off_because"][0]

    trained = run(captioned, captioned.params(train={"text_encoder_2": {"mode": "lora"}}))
    assert "train_text_encoders" in trained.extra["text_embeddings"] and trained.computed == 0
    configured_off = run(captioned, captioned.params(train={}, latents={"text_embeddings": False}))
    assert configured_off.extra["text_embeddings"] == "off: latents.text_embeddings: false"
    # Back on: the embeddings of the first run are still in the store.
    again = run(captioned, captioned.params(train={}))
    assert again.extra["text_embeddings"] == "cached" and again.extra["text_embeddings_reused"] == 4


def overflowing_vae(path: Path) -> Path:
    """The tiny VAE with its first conv scaled so fp16 activations overflow (fp32 stays finite)."""
    import torch
    from diffusers import AutoencoderKL

    from tuneline.models.ref import resolve_model

    vae = AutoencoderKL.from_pretrained(resolve_model("tiny-sdxl") / "vae", dtype=torch.float32)
    vae.encoder.conv_in.weight.data *= 1e5  # largest weight ~2e4: representable, but the sums are not
    vae.save_pretrained(path)
    return path


@pytest.mark.parametrize("overlap", [False, True], ids=["cpu-path", "gpu-pipeline"])
def test_half_precision_nan_batches_are_reencoded_in_fp32(captioned, tmp_path, monkeypatch, overlap):
    import torch
    from safetensors.torch import load_file

    from tuneline.stages.latents import stage
    from tuneline.stages.latents.stage import load_pixels
    from tuneline.models.loading import load_vae

    monkeypatch.setattr(stage, "OVERLAP", overlap)

    vae_dir = overflowing_vae(tmp_path / "hot-vae")
    captioned.params_data["model"] = {}
    params = captioned.params(model={"vae": str(vae_dir)}, latents={"dtype": "fp16", "flip": False,
                                                                    "text_embeddings": False})
    record = captioned.manifest("data/captioned")[0]
    pixels = load_pixels(captioned.root / "data/captioned" / record["image"])[None]
    with torch.no_grad():
        half = load_vae(params.model, captioned.root, "fp16", "cpu").encode(pixels.half()).latent_dist.mean
    assert not torch.isfinite(half).all()  # the failure is real, not simulated

    report = run(captioned, params)
    assert (report.computed, report.rejected) == (4, []) and report.extra["fp32_retries"] == 4
    (warning,) = report.warnings
    assert "re-encoded in fp32" in warning
    for item in captioned.manifest("data/latents"):
        assert f"{item['dataset']}/{item['id']}" in warning
        stored = load_file(captioned.root / "data/latents" / item["latents"])
        assert stored["mean"].dtype == torch.float16
        assert torch.isfinite(stored["mean"]).all() and torch.isfinite(stored["std"]).all()
    with torch.no_grad():
        full = load_vae(params.model, captioned.root, "fp32", "cpu").encode(pixels).latent_dist.mean
    first = load_file(captioned.root / "data/latents" / by_name(captioned)[record["source"].rsplit("/", 1)[-1]]["latents"])
    assert torch.allclose(first["mean"].float(), full[0], atol=1e-2)


def test_unreadable_image_is_rejected_not_fatal(captioned):
    victim = captioned.manifest("data/captioned")[1]
    (captioned.root / "data/captioned" / victim["image"]).write_bytes(b"not a png")
    report = run(captioned)
    assert (report.computed, len(report.rejected)) == (3, 1)
    assert "unreadable at latents time" in report.rejected[0]["reason"]
    assert victim["id"] not in {r["id"] for r in captioned.manifest("data/latents")}
    assert len(read_jsonl(captioned.root / "data/latents/rejected.jsonl")) == 1


def test_single_file_base_with_model_vae_takes_the_vae_as_given(tmp_path):
    """model.vae overrides a single-file base's VAE without converting the file (text encoders convert it)."""
    from tuneline.models.config import ModelConfig
    from tuneline.models.loading import vae_source

    (tmp_path / "base.safetensors").write_bytes(b"\0")
    override = vae_source(ModelConfig(base="base.safetensors", vae="org/some-vae"), tmp_path)
    assert (override.location, override.subfolder) == ("org/some-vae", None)
    assert not (tmp_path / ".tuneline" / "models").exists()


def test_the_gpu_pipeline_stores_the_same_latents(captioned, monkeypatch):
    """The CUDA path (images decoded ahead as bytes, converted on the device, results collected one
    batch behind) run on the CPU stores exactly the CPU path's tensors and metadata."""
    from safetensors import safe_open

    from tuneline.stages.latents import stage

    def stored(params) -> dict:
        found = {}
        for path in (captioned.root / params.store_dir).rglob("*.safetensors"):
            with safe_open(str(path), framework="pt") as handle:
                found[path.name] = (handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()})
        return found

    params = captioned.params(latents={"text_embeddings": False})
    run(captioned, params)
    plain = stored(params)
    shutil.rmtree(captioned.root / params.store_dir)
    monkeypatch.setattr(stage, "OVERLAP", True)
    report = run(captioned, params)
    assert report.computed == 4 and not report.rejected
    piped = stored(params)
    assert len(plain) == 4 and piped.keys() == plain.keys()
    for name, (metadata, tensors) in plain.items():
        assert piped[name][0] == metadata and piped[name][1].keys() == tensors.keys() == {
            "mean", "std", "flip_mean", "flip_std"}
        assert all(piped[name][1][k].equal(t) for k, t in tensors.items())
