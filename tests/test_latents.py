"""Stage `latents`: VAE latent distributions and text embeddings, cached per item. The tests that
hold for every family run on the tiny SDXL and the tiny Z-Image (`fcaptioned`); SDXL-only ones on
`captioned`, Z-Image-only ones in test_latents_zimage.py."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import corrupt_member, item_bytes, item_tensors, save_photo
from tuneline.core.manifest import read_jsonl, write_jsonl

LATENTS = {"batch_size": 2, "dtype": "fp32", "device": "cpu", "flip": True, "text_embeddings": True, "workers": 2}
ZIMAGE = {"base": "tiny-zimage"}


@dataclass(frozen=True)
class Expected:
    """What the latents stage stores for one family's tiny model."""

    model: dict[str, str]
    channels: int
    factors: tuple[float, float | None]  # (scaling_factor, shift_factor)
    text_format: str
    text_tensors: set[str]
    text_encoders: set[str]
    summary: dict[str, Any] = field(default_factory=dict)  # the text cache's fields in latents.json
    text_metadata: dict[str, Any] = field(default_factory=dict)  # its fields in each stored file


def expected(family: str) -> Expected:
    if family == "sdxl":
        return Expected({}, 4, (0.13025, None), "tuneline-sdxl-text-embeddings", {"prompt_embeds", "pooled"},
                        {"tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"})
    from tuneline.tiny.zimage import LATENT_CHANNELS, VAE_SCALING_FACTOR, VAE_SHIFT_FACTOR

    return Expected(ZIMAGE, LATENT_CHANNELS, (VAE_SCALING_FACTOR, VAE_SHIFT_FACTOR), "tuneline-zimage-text-embeddings",
                    {"prompt_embeds", "attention_mask"}, {"tokenizer", "text_encoder"},
                    {"max_sequence_length": 512}, {"max_sequence_length": 512, "truncated": False})


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


def make_captioned(project, model: dict[str, str] | None = None):
    """Three landscape images (one bucket, batch 2 -> a full and a partial batch) and one portrait."""
    for index in range(3):
        save_photo(project.raw("alpha") / f"a{index}.jpg", (200 + 8 * index, 120), index, quality=92)
    save_photo(project.raw("beta") / "b0.png", (120, 200), 10)
    project.params_data["latents"] = dict(LATENTS)
    if model:
        project.params_data["model"] = dict(model)
    project.ingest()
    project.bucket()
    write_captioned(project)
    return project


@pytest.fixture
def captioned(project):
    """make_captioned on the tiny SDXL (the default model.base)."""
    return make_captioned(project)


@pytest.fixture(params=["sdxl", "zimage"])
def fcaptioned(request, project):
    """make_captioned on each family's tiny model; `project.family` and `project.expected` tell which."""
    project.family, project.expected = request.param, expected(request.param)
    return make_captioned(project, project.expected.model)


def by_name(project) -> dict[str, dict]:
    return {r["source"].rsplit("/", 1)[-1]: r for r in project.manifest("data/latents")}


def test_latents_cached_then_reused_without_loading_the_vae(fcaptioned, tmp_path):
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    expect = fcaptioned.expected
    first = run(fcaptioned)
    assert (first.computed, first.reused, first.rejected) == (4, 0, [])
    assert first.extra["vae_loaded"] and first.extra["text_encoders_loaded"]
    assert first.extra["family"] == fcaptioned.family and not first.warnings
    assert first.extra["text_embeddings_computed"] == 4 and first.extra["text_embeddings"] == "cached"

    records = by_name(fcaptioned)
    for name in ("a0.jpg", "b0.png"):  # one landscape, one portrait
        width, height = records[name]["bucket"]
        assert records[name]["latent_shape"] == [expect.channels, height // 8, width // 8]
    wide = records["a0.jpg"]
    width, height = wide["bucket"]
    assert wide["scaling_factor"] == pytest.approx(expect.factors[0]) and wide["shift_factor"] == expect.factors[1]
    assert wide["has_flip"] and wide["caption"] == "a photo named a0.jpg" and wide["latent_dtype"] == "fp32"
    out = fcaptioned.root / "data/latents"
    stored = item_tensors(out, wide)
    assert set(stored) == {"mean", "std", "flip_mean", "flip_std"}
    assert all(t.shape == (expect.channels, height // 8, width // 8) for t in stored.values())
    # One copy: the output's pack is a link of the store's, and the loose item file went into it.
    store = fcaptioned.root / ".tuneline/store/latents"
    assert any(os.path.samefile(out / wide["latents"]["pack"], pack) for pack in store.glob("packs/*/*.tar"))
    assert not (store / wide["latent_key"][:2] / f"{wide['latent_key']}.safetensors").exists()
    summary = json.loads((out / "latents.json").read_text())
    assert summary["random_tiny_model"] and summary["text_embeddings"] and summary["family"] == fcaptioned.family
    assert (summary["scaling_factor"], summary["shift_factor"]) == expect.factors
    assert summary["text_embeddings_format"] == expect.text_format
    assert set(summary["text_encoders"]) == expect.text_encoders
    assert {k: summary.get(k) for k in ("max_sequence_length", *expect.summary)} == \
        {"max_sequence_length": None, **expect.summary}
    assert json.loads((fcaptioned.root / "reports/latents.json").read_text())["computed"] == 4
    assert json.loads((fcaptioned.root / "metrics/latents.json").read_text()) == {"items": 4, "rejected": 0}

    texts = tmp_path / "text.safetensors"
    texts.write_bytes(item_bytes(out, wide, "text_embeddings"))
    with safe_open(str(texts), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == expect.text_format and metadata["caption"] == "a photo named a0.jpg"
    assert {key: json.loads(metadata[key]) for key in expect.text_metadata} == expect.text_metadata
    embeds = load_file(texts)
    assert set(embeds) == expect.text_tensors and embeds["prompt_embeds"].dtype == torch.float32
    if "attention_mask" in expect.text_tensors:
        assert embeds["attention_mask"].dtype == torch.bool
        assert embeds["attention_mask"].shape == embeds["prompt_embeds"].shape[:1] and embeds["attention_mask"].all()

    second = run(fcaptioned)
    assert (second.computed, second.reused) == (0, 4)
    assert not second.extra["vae_loaded"] and not second.extra["text_encoders_loaded"]
    assert second.extra["text_embeddings_reused"] == 4
    assert by_name(fcaptioned) == records


def test_stored_distribution_is_the_vaes_and_decodes_to_the_image_size(fcaptioned):
    import torch
    from safetensors.torch import load_file

    from tuneline.models.loading import load_vae
    from tuneline.stages.latents.vae import load_pixels

    params = fcaptioned.params()
    run(fcaptioned, params)
    vae = load_vae(params.model, fcaptioned.root, "fp32", "cpu")
    for name, record in by_name(fcaptioned).items():
        assert (record["scaling_factor"], record["shift_factor"]) == (
            vae.config.scaling_factor, getattr(vae.config, "shift_factor", None))
        stored = item_tensors(fcaptioned.root / "data/latents", record)
        pixels = load_pixels(io.BytesIO(item_bytes(fcaptioned.root / "data/captioned", record)))[None]
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
            shift = record["shift_factor"] or 0.0
            latent = (sample - shift) * record["scaling_factor"]
            # The trainer's latent is (z - shift) * scale; the pipeline decodes latents / scale + shift.
            mean_latent = (stored["mean"] - shift) * record["scaling_factor"]
            assert torch.allclose(mean_latent / vae.config.scaling_factor + shift, stored["mean"], atol=1e-6)
            with torch.no_grad():
                decoded = vae.decode((latent / record["scaling_factor"] + shift)[None]).sample
            assert decoded.shape == pixels.shape and torch.isfinite(decoded).all()


def test_new_image_costs_one_latent_and_a_caption_edit_costs_one_text_embedding(fcaptioned):
    first = run(fcaptioned)
    assert (first.computed, first.extra["text_embeddings_computed"]) == (4, 4)
    save_photo(fcaptioned.raw("beta") / "b1.png", (124, 200), 11)
    fcaptioned.ingest()
    fcaptioned.bucket()
    write_captioned(fcaptioned)
    added = run(fcaptioned)
    assert (added.computed, added.reused) == (1, 4)
    assert (added.extra["text_embeddings_computed"], added.extra["text_embeddings_reused"]) == (1, 4)

    keys = {name: r["latent_key"] for name, r in by_name(fcaptioned).items()}
    write_captioned(fcaptioned, {"a1.jpg": "an edited caption"})
    edited = run(fcaptioned)
    assert (edited.computed, edited.reused) == (0, 5) and not edited.extra["vae_loaded"]
    assert (edited.extra["text_embeddings_computed"], edited.extra["text_embeddings_reused"]) == (1, 4)
    records = by_name(fcaptioned)
    assert {name: r["latent_key"] for name, r in records.items()} == keys
    assert records["a1.jpg"]["caption"] == "an edited caption"

    again = run(fcaptioned)
    assert (again.computed, again.extra["text_embeddings_computed"]) == (0, 0)
    assert not again.extra["vae_loaded"] and not again.extra["text_encoders_loaded"]


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
    stored = item_tensors(captioned.root / "data/latents", records["a0.jpg"], "text_embeddings")
    assert stored["prompt_embeds"].shape == (77, TE1_HIDDEN + TE2_HIDDEN)
    assert stored["pooled"].shape == (TE2_PROJECTION,)

    pipe = StableDiffusionXLPipeline.from_pretrained(resolve_model("tiny-sdxl"), dtype=torch.float32)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt("shp, a red square", device="cpu", do_classifier_free_guidance=False)
    assert torch.allclose(stored["prompt_embeds"], embeds[0], atol=1e-5)
    assert torch.allclose(stored["pooled"], pooled[0], atol=1e-5)


def test_text_cache_blockers():
    from tuneline.train.cached_text import text_cache_blockers
    from tuneline.train.config import TrainConfig

    assert text_cache_blockers(TrainConfig()) == []
    reasons = text_cache_blockers(TrainConfig(caption_dropout=0.1, caption_shuffle=True,
                                              text_encoder_2={"mode": "lora"}))
    assert len(reasons) == 3
    assert "caption_dropout" in reasons[0] and "caption_shuffle" in reasons[1] and "train_text_encoders" in reasons[2]
    assert text_cache_blockers(TrainConfig(text_encoder_1={"mode": "full"})) == [reasons[2]]


def test_the_trainer_and_the_memory_estimate_use_the_same_rule(captioned):
    """LatentData and the memory estimate answer with text_cache_blockers: cached text is used
    exactly when the rule finds nothing (and every record has its file)."""
    from tuneline.stages.train.memory import text_cached
    from tuneline.stages.train.stage import latent_data

    run(captioned)
    for train in ({}, {"caption_dropout": 0.1}, {"caption_shuffle": True}, {"text_encoder_1": {"mode": "lora"}}):
        params = captioned.params(train=train)
        assert latent_data(params, captioned.root / "data/latents").text_cache == (not train)
        assert text_cached(params) == (not train)
    assert not text_cached(captioned.params(train={}, latents={"text_embeddings": False}))


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

    from tuneline.models.loading import load_vae
    from tuneline.stages.latents import vae
    from tuneline.stages.latents.vae import load_pixels

    monkeypatch.setattr(vae, "OVERLAP", overlap)

    vae_dir = overflowing_vae(tmp_path / "hot-vae")
    captioned.params_data["model"] = {}
    params = captioned.params(model={"vae": str(vae_dir)}, latents={"dtype": "fp16", "flip": False,
                                                                    "text_embeddings": False})
    record = captioned.manifest("data/captioned")[0]
    pixels = load_pixels(io.BytesIO(item_bytes(captioned.root / "data/captioned", record)))[None]
    with torch.no_grad():
        half = load_vae(params.model, captioned.root, "fp16", "cpu").encode(pixels.half()).latent_dist.mean
    assert not torch.isfinite(half).all()  # the failure is real, not simulated

    report = run(captioned, params)
    assert (report.computed, report.rejected) == (4, []) and report.extra["fp32_retries"] == 4
    (warning,) = report.warnings
    assert "re-encoded in fp32" in warning
    assert warning.endswith("(model.vae: madebyollin/sdxl-vae-fp16-fix) or latents.dtype bf16/fp32 avoids the retries.")
    for item in captioned.manifest("data/latents"):
        assert f"{item['dataset']}/{item['id']}" in warning
        stored = item_tensors(captioned.root / "data/latents", item)
        assert stored["mean"].dtype == torch.float16
        assert torch.isfinite(stored["mean"]).all() and torch.isfinite(stored["std"]).all()
    with torch.no_grad():
        full = load_vae(params.model, captioned.root, "fp32", "cpu").encode(pixels).latent_dist.mean
    first = item_tensors(captioned.root / "data/latents", by_name(captioned)[record["source"].rsplit("/", 1)[-1]])
    assert torch.allclose(first["mean"].float(), full[0], atol=1e-2)


def test_unreadable_image_is_rejected_not_fatal(captioned):
    victim = captioned.manifest("data/captioned")[1]
    corrupt_member(captioned.root / "data/captioned", victim["image"])
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


def test_the_gpu_pipeline_stores_the_same_latents(fcaptioned, monkeypatch):
    """The CUDA path (images decoded ahead as bytes, converted on the device, results collected one
    batch behind) run on the CPU stores exactly the CPU path's tensors and metadata."""
    from safetensors import safe_open

    from tuneline.stages.latents import vae

    def stored(params) -> dict:
        found = {}
        for record in fcaptioned.manifest("data/latents"):
            data = item_bytes(fcaptioned.root / "data/latents", record, "latents")
            (length,) = struct.unpack("<Q", data[:8])
            metadata = json.loads(data[8:8 + length]).get("__metadata__")
            found[record["latent_key"]] = (metadata, {name: t for name, t in item_tensors(
                fcaptioned.root / "data/latents", record).items()})
        return found

    params = fcaptioned.params(latents={"text_embeddings": False})
    run(fcaptioned, params)
    plain = stored(params)
    shutil.rmtree(fcaptioned.root / params.store_dir)
    monkeypatch.setattr(vae, "OVERLAP", True)
    report = run(fcaptioned, params)
    assert report.computed == 4 and not report.rejected
    piped = stored(params)
    assert len(plain) == 4 and piped.keys() == plain.keys()
    for name, (metadata, tensors) in plain.items():
        assert piped[name][0] == metadata and piped[name][1].keys() == tensors.keys() == {
            "mean", "std", "flip_mean", "flip_std"}
        assert all(piped[name][1][k].equal(t) for k, t in tensors.items())


def _code_modules() -> set[str]:
    from test_layout import _module_name

    from tuneline.core.codeversion import code_files
    from tuneline.stages.latents import CODE

    return {_module_name(path) for path in code_files(CODE)}


def test_the_output_module_outside_code_hides_no_result_shaping_import():
    """output.py is listed as not result-shaping, so the layout test does not follow its imports:
    they must all be core modules or modules CODE covers anyway."""
    from test_layout import PACKAGE, _imports

    graph = _imports()
    code = _code_modules()
    assert "tuneline.stages.latents.output" not in code and "tuneline.train.cached_text" not in code
    for module in ("tuneline.stages.latents.output", "tuneline.train.cached_text"):
        outside = sorted(t for t in graph[module] if not t.startswith("tuneline.core.") and t not in code
                         and not t.endswith(".config"))
        assert not outside, f"{module} imports {outside}"
    assert (PACKAGE / "stages/latents/output.py").is_file()


def test_every_familys_text_cache_and_what_it_imports_is_in_code():
    """The stage loads the text caches by import path (no import the layout test could follow):
    CODE names each family's text module and everything that shapes its results."""
    from test_layout import _imports, _shaping_closure

    from tuneline.models.family import FAMILIES

    graph = _imports()
    code = _code_modules()
    for family in FAMILIES.values():
        module = family.text_cache.split(":")[0]
        assert module in code, family.name
        assert not sorted(_shaping_closure(graph, module) - code), family.name


def test_the_stage_names_no_family():
    """Stages ask the family: no family name or `family ==` anywhere in the stage's package."""
    import re

    from test_layout import PACKAGE

    pattern = re.compile(r"sdxl|zimage|z-image|family ==|family !=", re.IGNORECASE)
    found = [f"{path.name}:{n}" for path in sorted((PACKAGE / "stages/latents").glob("*.py"))
             for n, line in enumerate(path.read_text("utf-8").splitlines(), 1) if pattern.search(line)]
    assert not found


def test_text_keys_come_from_the_familys_cache_fields():
    """The text key is the stage's digest of what the family's cache says decides the embedding:
    another caption, dtype, encoder, family or model.quantize level gives another key; at
    quantize 'none' the fields are the ones keys had before the setting existed."""
    from tuneline.core.fsutil import digest_json
    from tuneline.models.family import get_family
    from tuneline.stages.latents.keys import CODE_VERSION, text_key

    sdxl, zimage = (get_family(name).load("text_cache")() for name in ("sdxl", "zimage"))
    identities = {"tokenizer": "t", "text_encoder": "e"}
    keys = {text_key(cache.key_fields(caption, identities, dtype, quantize))
            for cache in (sdxl, zimage) for caption in ("a", "b") for dtype in ("fp32", "bf16")
            for quantize in ("none", "int8", "fp8", "nf4")}
    keys.add(text_key(sdxl.key_fields("a", {**identities, "text_encoder": "other"}, "fp32", "none")))
    assert len(keys) == 33
    # The stage's part of the key: its store name and code version, beside the cache's fields.
    assert text_key(sdxl.key_fields("a", identities, "fp32", "none")) == digest_json(
        {"stage": "text_embeddings", "code": CODE_VERSION, "caption": "a", "encoders": identities, "dtype": "fp32"})
    assert zimage.key_fields("a", identities, "bf16", "none") == {
        "family": "zimage", "caption": "a", "encoders": identities, "dtype": "bf16", "max_sequence_length": 512}
    assert sdxl.key_fields("a", identities, "fp32", "nf4") == {
        "caption": "a", "encoders": identities, "dtype": "fp32", "quantize": "nf4"}


def test_every_familys_ignored_settings_are_real_keys_silent_at_their_defaults():
    from tuneline.config import validate_params
    from tuneline.models.family import FAMILIES
    from tuneline.stages.latents.output import ignored_setting_notes

    params = validate_params({"datasets": [{"name": "a", "path": "data/raw/a"}]})
    for family in FAMILIES.values():
        assert ignored_setting_notes(params, family.ignored_settings) == [], family.name
    zimage = FAMILIES["zimage"].ignored_settings
    assert [s.key for s in zimage] == ["train.text_encoder_2.mode", "model.config"]
    set_params = validate_params({"datasets": [{"name": "a", "path": "data/raw/a"}], "model": {"config": "x"}})
    assert ignored_setting_notes(set_params, zimage) == [zimage[1].note.format(key="model.config", value="x")]
