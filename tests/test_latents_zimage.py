"""Stage `latents` on the tiny Z-Image: 16-channel latents with shift and scale, and the Qwen3
text-embedding cache (variable length, equal to ZImagePipeline's own encode)."""

from __future__ import annotations

import json

import pytest

from conftest import save_photo
from test_latents import LATENTS, by_name, run, write_captioned
from test_latents import test_the_gpu_pipeline_stores_the_same_latents as check_gpu_path_equals_cpu_path

ZIMAGE = {"base": "tiny-zimage"}
# Chat template included this is far past 512 tokens: the pipeline cuts it at max_sequence_length.
LONG_CAPTION = "a very long caption, " + "with red and blue squares " * 120


@pytest.fixture(scope="module", autouse=True)
def tiny_home(tmp_path_factory: pytest.TempPathFactory):
    """The session's TUNELINE_HOME: the tiny models build once for every module."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TUNELINE_HOME", str(tmp_path_factory.getbasetemp() / "tuneline-home"))
        yield


@pytest.fixture
def zcaptioned(project):
    """Three landscape images (one bucket, batch 2) and one portrait, on model.base tiny-zimage."""
    for index in range(3):
        save_photo(project.raw("alpha") / f"a{index}.jpg", (200 + 8 * index, 120), index, quality=92)
    save_photo(project.raw("beta") / "b0.png", (120, 200), 10)
    project.params_data["latents"] = dict(LATENTS)
    project.params_data["model"] = dict(ZIMAGE)
    project.ingest()
    project.bucket()
    write_captioned(project)
    return project


@pytest.fixture(scope="module")
def pipeline():
    import torch
    from diffusers import ZImagePipeline

    from tuneline.models.ref import resolve_model

    return ZImagePipeline.from_pretrained(resolve_model("tiny-zimage"), dtype=torch.float32)


def test_latents_have_16_channels_and_the_vaes_shift_and_scale(zcaptioned, pipeline):
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from tuneline.stages.latents.stage import ZIMAGE_TEXT_FORMAT, load_pixels
    from tuneline.tiny.zimage import LATENT_CHANNELS, VAE_SCALING_FACTOR, VAE_SHIFT_FACTOR

    first = run(zcaptioned)
    assert (first.computed, first.reused, first.rejected) == (4, 0, [])
    assert first.extra["family"] == "zimage" and first.extra["text_embeddings"] == "cached"
    assert first.extra["text_embeddings_computed"] == 4 and not first.warnings
    out = zcaptioned.root / "data/latents"
    summary = json.loads((out / "latents.json").read_text())
    assert summary["family"] == "zimage" and summary["text_embeddings_format"] == ZIMAGE_TEXT_FORMAT
    assert (summary["scaling_factor"], summary["shift_factor"]) == (VAE_SCALING_FACTOR, VAE_SHIFT_FACTOR)
    assert summary["max_sequence_length"] == 512 and summary["random_tiny_model"]
    assert set(summary["text_encoders"]) == {"tokenizer", "text_encoder"}

    records = by_name(zcaptioned)
    vae = pipeline.vae
    for name in ("a0.jpg", "b0.png"):  # one landscape, one portrait
        record = records[name]
        width, height = record["bucket"]
        assert record["latent_shape"] == [LATENT_CHANNELS, height // 8, width // 8]
        factors = (record["scaling_factor"], record["shift_factor"])
        assert factors == (vae.config.scaling_factor, vae.config.shift_factor)
        stored = load_file(out / record["latents"])
        assert set(stored) == {"mean", "std", "flip_mean", "flip_std"}
        pixels = load_pixels(zcaptioned.root / "data/captioned" / record["image"])[None]
        with torch.no_grad():
            dist = vae.encode(pixels).latent_dist
        assert torch.allclose(stored["mean"], dist.mean[0], atol=1e-5)
        assert torch.allclose(stored["std"], dist.std[0], atol=1e-5)
        # The trainer's latent is (z - shift) * scale; ZImagePipeline decodes latents / scale + shift.
        latent = (stored["mean"] - record["shift_factor"]) * record["scaling_factor"]
        assert torch.allclose(latent / vae.config.scaling_factor + vae.config.shift_factor, stored["mean"], atol=1e-6)
        with torch.no_grad():
            decoded = vae.decode((latent / record["scaling_factor"] + record["shift_factor"])[None]).sample
        assert decoded.shape == pixels.shape and torch.isfinite(decoded).all()

    texts = out / records["a0.jpg"]["text_embeddings"]
    with safe_open(str(texts), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == ZIMAGE_TEXT_FORMAT and metadata["caption"] == "a photo named a0.jpg"
    assert json.loads(metadata["max_sequence_length"]) == 512 and json.loads(metadata["truncated"]) is False
    embeds = load_file(texts)
    assert set(embeds) == {"prompt_embeds", "attention_mask"}
    assert embeds["prompt_embeds"].dtype == torch.float32 and embeds["attention_mask"].dtype == torch.bool
    assert embeds["attention_mask"].shape == embeds["prompt_embeds"].shape[:1] and embeds["attention_mask"].all()

    second = run(zcaptioned)
    assert (second.computed, second.reused) == (0, 4)
    assert not second.extra["vae_loaded"] and not second.extra["text_encoders_loaded"]
    assert second.extra["text_embeddings_reused"] == 4 and by_name(zcaptioned) == records


def test_cached_text_embeddings_are_the_pipelines_encode_exactly(zcaptioned, pipeline):
    """Captions of very different lengths share one encode batch (padded to the longest of
    them), one is past max_sequence_length: each cached embedding equals the pipeline's encode
    of that caption alone (padded to 512), bit for bit."""
    import torch
    from safetensors.torch import load_file

    from tuneline.stages.latents.stage import TEXT_BATCH
    from tuneline.tiny.zimage import TEXT_HIDDEN

    captions = {"a0.jpg": "", "a1.jpg": "shp", "a2.jpg": "shp, a red square on a blue ground, outdoors, noon",
                "b0.png": LONG_CAPTION}
    write_captioned(zcaptioned, captions)
    report = run(zcaptioned)
    assert report.extra["text_embeddings_computed"] == 4 <= TEXT_BATCH  # one batch
    assert report.extra["captions_truncated"] == 1 and "longer than 512 tokens" in report.warnings[0]
    records = by_name(zcaptioned)
    lengths = set()
    for name, caption in captions.items():
        stored = load_file(zcaptioned.root / "data/latents" / records[name]["text_embeddings"])
        with torch.no_grad():
            alone, _ = pipeline.encode_prompt(caption, device="cpu", do_classifier_free_guidance=False)
        assert stored["prompt_embeds"].shape == alone[0].shape and alone[0].shape[1] == TEXT_HIDDEN
        assert torch.equal(stored["prompt_embeds"], alone[0]), name
        assert stored["attention_mask"].shape == (alone[0].shape[0],) and stored["attention_mask"].all()
        lengths.add(alone[0].shape[0])
    assert len(lengths) == 4 and max(lengths) == 512  # the long one is cut as the pipeline cuts it
    with torch.no_grad():  # and the pipeline's own batched encode gives the same rows
        batched, _ = pipeline.encode_prompt(list(captions.values()), device="cpu", do_classifier_free_guidance=False)
    for name, embeds in zip(captions, batched):
        stored = load_file(zcaptioned.root / "data/latents" / records[name]["text_embeddings"])
        assert torch.equal(stored["prompt_embeds"], embeds), name


def test_new_image_costs_one_latent_and_a_caption_edit_costs_one_text_embedding(zcaptioned):
    first = run(zcaptioned)
    assert (first.computed, first.extra["text_embeddings_computed"]) == (4, 4)
    save_photo(zcaptioned.raw("beta") / "b1.png", (124, 200), 11)
    zcaptioned.ingest()
    zcaptioned.bucket()
    write_captioned(zcaptioned)
    added = run(zcaptioned)
    assert (added.computed, added.reused) == (1, 4)
    assert (added.extra["text_embeddings_computed"], added.extra["text_embeddings_reused"]) == (1, 4)

    keys = {name: r["latent_key"] for name, r in by_name(zcaptioned).items()}
    write_captioned(zcaptioned, {"a1.jpg": "an edited caption"})
    edited = run(zcaptioned)
    assert (edited.computed, edited.reused) == (0, 5) and not edited.extra["vae_loaded"]
    assert (edited.extra["text_embeddings_computed"], edited.extra["text_embeddings_reused"]) == (1, 4)
    records = by_name(zcaptioned)
    assert {name: r["latent_key"] for name, r in records.items()} == keys
    assert records["a1.jpg"]["caption"] == "an edited caption"

    again = run(zcaptioned)
    assert (again.computed, again.extra["text_embeddings_computed"]) == (0, 0)
    assert not again.extra["vae_loaded"] and not again.extra["text_encoders_loaded"]


def test_switching_the_base_between_sdxl_and_zimage_recomputes_and_switching_back_reuses(zcaptioned):
    from tuneline.stages.latents.stage import TEXT_FORMAT, ZIMAGE_TEXT_FORMAT

    zimage = run(zcaptioned)
    assert (zimage.computed, zimage.extra["text_embeddings_computed"]) == (4, 4)
    zimage_records = by_name(zcaptioned)

    sdxl = run(zcaptioned, zcaptioned.params(model={"base": "tiny-sdxl"}))
    assert sdxl.extra["family"] == "sdxl"
    assert (sdxl.computed, sdxl.reused, sdxl.extra["text_embeddings_computed"]) == (4, 0, 4)
    records = by_name(zcaptioned)
    assert records["a0.jpg"]["latent_shape"][0] == 4 and records["a0.jpg"]["shift_factor"] is None
    assert not set(r["text_key"] for r in records.values()) & set(r["text_key"] for r in zimage_records.values())
    summary = json.loads((zcaptioned.root / "data/latents/latents.json").read_text())
    assert summary["family"] == "sdxl" and summary["text_embeddings_format"] == TEXT_FORMAT

    back = run(zcaptioned, zcaptioned.params(model=ZIMAGE))
    assert (back.computed, back.reused, back.extra["text_embeddings_computed"]) == (0, 4, 0)
    assert not back.extra["vae_loaded"] and not back.extra["text_encoders_loaded"]
    assert by_name(zcaptioned) == zimage_records
    summary = json.loads((zcaptioned.root / "data/latents/latents.json").read_text())
    assert summary["family"] == "zimage" and summary["text_embeddings_format"] == ZIMAGE_TEXT_FORMAT


def test_the_gpu_pipeline_stores_the_same_16_channel_latents(zcaptioned, monkeypatch):
    check_gpu_path_equals_cpu_path(zcaptioned, monkeypatch)


def test_sdxl_only_options_are_reported_and_trained_encoders_turn_the_cache_off(zcaptioned):
    run(zcaptioned)
    zcaptioned.params_data["train"] = {}
    second = run(zcaptioned, zcaptioned.params(train={"text_encoder_2": {"mode": "lora"}},
                                               model={"config": "tiny-sdxl"}))
    assert second.computed == 0 and not second.extra["text_encoders_loaded"]
    assert second.extra["text_embeddings"].startswith("off: train.train_text_encoders is on")
    assert any("train.text_encoder_2.mode is 'lora'" in w and "one text encoder" in w for w in second.warnings)
    assert any(w.startswith("model.config ('tiny-sdxl')") for w in second.warnings)
    assert all(r["text_embeddings"] is None for r in zcaptioned.manifest("data/latents"))
    dropout = run(zcaptioned, zcaptioned.params(train={"text_encoder_2": {"mode": "frozen"}, "caption_dropout": 0.1},
                                                model={"config": None}))
    assert dropout.extra["text_embeddings"].startswith("off: train.caption_dropout is 0.1") and not dropout.warnings


def test_zimage_text_encoder_loaders(tmp_path):
    import torch

    from tuneline.models.loading import load_zimage_text_encoder, zimage_text_encoder_sources
    from tuneline.models.config import ModelConfig

    model = ModelConfig(base="tiny-zimage")
    sources = zimage_text_encoder_sources(model, tmp_path)
    assert {name: s.subfolder for name, s in sources.items()} == {name: name for name in ("tokenizer", "text_encoder")}
    assert sources["tokenizer"].identity(tmp_path) != sources["text_encoder"].identity(tmp_path)
    tokenizer, encoder = load_zimage_text_encoder(model, tmp_path, "bf16", "cpu")
    assert type(tokenizer).__name__ == "Qwen2Tokenizer" and tokenizer.chat_template
    assert type(encoder).__name__ == "Qwen3Model" and not encoder.training
    assert encoder.dtype == torch.bfloat16 and not any(p.requires_grad for p in encoder.parameters())
    _, empty = load_zimage_text_encoder(model, tmp_path, "fp32", "cpu", empty_weights=True)
    assert type(empty).__name__ == "Qwen3Model" and next(empty.parameters()).device.type == "meta"
