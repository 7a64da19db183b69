"""Stage `latents` on the tiny Z-Image, what only Z-Image has: the Qwen3 text-embedding cache
(variable length, equal to ZImagePipeline's own encode), switching the base between families, and
SDXL-only options. What every family shares (16-channel latents with shift and scale included)
runs for both families in test_latents.py."""

from __future__ import annotations

import json

import pytest

from conftest import item_tensors
from test_latents import ZIMAGE, by_name, make_captioned, run, write_captioned

# Chat template included this is far past 512 tokens: the pipeline cuts it at max_sequence_length.
LONG_CAPTION = "a very long caption, " + "with red and blue squares " * 120


@pytest.fixture
def zcaptioned(project):
    """Three landscape images (one bucket, batch 2) and one portrait, on model.base tiny-zimage."""
    return make_captioned(project, ZIMAGE)


@pytest.fixture(scope="module")
def pipeline():
    import torch
    from diffusers import ZImagePipeline

    from tuneline.models.ref import resolve_model

    return ZImagePipeline.from_pretrained(resolve_model("tiny-zimage"), dtype=torch.float32)


def test_cached_text_embeddings_are_the_pipelines_encode_exactly(zcaptioned, pipeline):
    """Captions of very different lengths share one encode batch (padded to the longest of
    them), one is past max_sequence_length: each cached embedding equals the pipeline's encode
    of that caption alone (padded to 512), bit for bit."""
    import torch
    from safetensors.torch import load_file

    from tuneline.stages.latents.text import TEXT_BATCH
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
        stored = item_tensors(zcaptioned.root / "data/latents", records[name], "text_embeddings")
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
        stored = item_tensors(zcaptioned.root / "data/latents", records[name], "text_embeddings")
        assert torch.equal(stored["prompt_embeds"], embeds), name


def test_switching_the_base_between_sdxl_and_zimage_recomputes_and_switching_back_reuses(zcaptioned):
    from tuneline.models.sdxl.text import TEXT_FORMAT
    from tuneline.models.zimage.text import TEXT_FORMAT as ZIMAGE_TEXT_FORMAT

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
