"""model.base as ONE .safetensors SDXL checkpoint (SGM layout): converted once, then used like a folder."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import Project, item_tensors, make_trainer, save_photo, train_params

LATENTS = {"batch_size": 2, "dtype": "fp32", "device": "cpu", "flip": True, "text_embeddings": True, "workers": 1}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A small captioned project, and the tiny SDXL written as a single file at <root>/base.safetensors."""
    from tuneline.stages.caption.stage import run as run_caption
    from tuneline.models.sdxl.checkpoint_file import pipeline_to_single_file
    from tuneline.models.ref import resolve_model

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TUNELINE_HOME", str(tmp_path_factory.mktemp("tuneline-home")))
        root = tmp_path_factory.mktemp("single-file-project")
        project = Project(root)
        project.params_data["bucket"].update(resolution=64, divisible_by=32, batch_size=2)
        project.params_data["caption"] = {"mode": "sidecar_only"}
        project.params_data["latents"] = dict(LATENTS)
        project.params_data["model"] = {}  # each test names its own base
        for i in range(2):
            save_photo(project.raw("alpha") / f"a{i}.jpg", (96, 64), seed=i, quality=95)
            (project.raw("alpha") / f"a{i}.txt").write_text(f"a red thing, number {i}", "utf-8")
        save_photo(project.raw("beta") / "b0.png", (64, 96), seed=10)
        (project.raw("beta") / "b0.txt").write_text("a thing", "utf-8")
        params = project.params()
        project.ingest(params)
        project.bucket(params)
        run_caption(params, root, root / "data/bucketed", root / "data/captioned", root / "metrics")
        pipeline_to_single_file(resolve_model("tiny-sdxl"), root / "base.safetensors", dtype="fp32")
        yield project


def latents(project: Project, out: str, **model):
    from tuneline.stages.latents.stage import run as run_latents

    params = project.params(model=model)
    report = run_latents(params, project.root, project.root / "data/captioned", project.root / out,
                         project.root / "metrics")
    records = {r["source"].rsplit("/", 1)[-1]: r for r in project.manifest(out)}
    stored = {name: item_tensors(project.root / out, r) for name, r in records.items()}
    texts = {name: item_tensors(project.root / out, r, "text_embeddings") for name, r in records.items()}
    return report, records, stored, texts


def converted_folders(project: Project) -> list:
    return sorted((project.root / ".tuneline" / "models").glob("single-file-*"))


def test_single_file_base_latents_equal_the_folder_base_and_convert_once(project, monkeypatch):
    import tuneline.models.single_file as single_file

    conversions = []
    convert = single_file._convert
    monkeypatch.setattr(single_file, "_convert", lambda *a: conversions.append(a) or convert(*a))

    _, tiny_records, tiny_latents, tiny_texts = latents(project, "data/latents-tiny", base="tiny-sdxl")
    report, records, stored, texts = latents(project, "data/latents", base="base.safetensors", config="tiny-sdxl")
    assert report.computed == len(records) == 3 and len(conversions) == 1
    (folder,) = converted_folders(project)
    assert (folder / "model_index.json").is_file() and (folder / single_file.MARKER).is_file()
    for name, tensors in stored.items():  # the same weights: the same latents and text embeddings
        for key, value in tensors.items():
            assert torch.allclose(value, tiny_latents[name][key], atol=1e-6), (name, key)
        for key, value in texts[name].items():
            assert torch.allclose(value, tiny_texts[name][key], atol=1e-6), (name, key)
    # ... under other keys: the model identity is the file's content (+ model.config), not the folder
    for name, record in records.items():
        assert record["latent_key"] != tiny_records[name]["latent_key"]
        assert str(folder) not in str(record)

    before = folder.stat().st_mtime_ns, folder.stat().st_ino
    again, _, _, _ = latents(project, "data/latents", base="base.safetensors", config="tiny-sdxl")
    assert again.computed == 0 and len(conversions) == 1
    assert converted_folders(project) == [folder] and (folder.stat().st_mtime_ns, folder.stat().st_ino) == before


def test_single_file_base_trains(project, tmp_path, monkeypatch):
    import tuneline.models.single_file as single_file

    latents(project, "data/latents", base="base.safetensors", config="tiny-sdxl")
    monkeypatch.setattr(single_file, "_convert", lambda *a: pytest.fail("converted again"))
    project.params_data["model"] = {"base": "base.safetensors", "config": "tiny-sdxl"}
    try:
        params = train_params(project)
        trainer = make_trainer(project, tmp_path, params)
        summary = trainer.fit()
    finally:
        project.params_data["model"] = {}
    assert summary["steps"] == 2 and summary["final_loss"] > 0
    (folder,) = converted_folders(project)
    # Render and export read the same converted folder.
    from tuneline.models.sdxl.export import base_unet_config
    from tuneline.stages.render.generate import load_base_pipeline

    assert base_unet_config(params.model, project.root) == folder / "unet" / "config.json"
    pipeline = load_base_pipeline(params.model, project.root, "cpu", "fp32")
    assert pipeline.unet.config.sample_size == trainer.adapter.unet.config.sample_size


def test_single_file_base_without_model_config_offline_names_model_config(project, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from tuneline.core.params import ParamsError
    from tuneline.models.config import ModelConfig
    from tuneline.models.loading import text_encoder_sources

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    os.link(project.root / "base.safetensors", tmp_path / "other.safetensors")
    with pytest.raises(ParamsError, match="model.config"):
        text_encoder_sources(ModelConfig(base="other.safetensors"), tmp_path)
    assert not list((tmp_path / ".tuneline" / "models").glob("single-file-*"))
