"""detect_family: which model family `model.base` is, read from its model_index.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tuneline.core.params import ParamsError
from tuneline.models.family import detect_family
from tuneline.models.config import ModelConfig


@pytest.fixture(scope="module", autouse=True)
def tuneline_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    # The tiny models build once per test session (shared with the other test modules).
    os.environ.setdefault("TUNELINE_HOME", str(tmp_path_factory.getbasetemp() / "tuneline-home"))


def pipeline_folder(folder: Path, class_name: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}), "utf-8")
    return folder


def test_tiny_models() -> None:
    assert detect_family(ModelConfig(base="tiny-sdxl")) == "sdxl"
    assert detect_family(ModelConfig(base="tiny-zimage")) == "zimage"


def test_local_folders_relative_to_root(tmp_path: Path) -> None:
    pipeline_folder(tmp_path / "models" / "z", "ZImagePipeline")
    pipeline_folder(tmp_path / "models" / "x", "StableDiffusionXLPipeline")
    assert detect_family(ModelConfig(base="models/z"), tmp_path) == "zimage"
    assert detect_family(ModelConfig(base=str(tmp_path / "models" / "x"))) == "sdxl"


def test_single_file_is_sdxl(tmp_path: Path) -> None:
    (tmp_path / "base.safetensors").write_bytes(b"not read")
    assert detect_family(ModelConfig(base="base.safetensors"), tmp_path) == "sdxl"


def test_override_wins(tmp_path: Path) -> None:
    pipeline_folder(tmp_path / "custom", "MyFineTunedZImagePipeline")
    model = ModelConfig(base="custom", family="zimage")
    assert detect_family(model, tmp_path) == "zimage"
    assert detect_family(ModelConfig(base="tiny-sdxl", family="zimage")) == "zimage"


def test_unknown_class_names_families_and_override(tmp_path: Path) -> None:
    pipeline_folder(tmp_path / "flux", "FluxPipeline")
    with pytest.raises(ParamsError) as error:
        detect_family(ModelConfig(base="flux"), tmp_path)
    message = str(error.value)
    assert "FluxPipeline" in message and "sdxl" in message and "zimage" in message and "model.family" in message


def test_folder_without_index(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    with pytest.raises(ParamsError, match="model_index.json.*model.family"):
        detect_family(ModelConfig(base="unet"), tmp_path)


def test_family_is_validated() -> None:
    with pytest.raises(ValueError):
        ModelConfig(base="tiny-sdxl", family="flux")


def test_hub_id_from_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--Tongyi-MAI--Z-Image-Turbo"
    snapshot = repo / "snapshots" / "0123abc"
    pipeline_folder(snapshot, "ZImagePipeline")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert detect_family(ModelConfig(base="Tongyi-MAI/Z-Image-Turbo")) == "zimage"
    assert detect_family(ModelConfig(base="Tongyi-MAI/Z-Image-Turbo", revision="0123abc")) == "zimage"
    # Not cached and offline: cannot tell, and says how to set it.
    with pytest.raises(ParamsError, match="HF_HUB_OFFLINE.*model.family"):
        detect_family(ModelConfig(base="stabilityai/stable-diffusion-xl-base-1.0"))


def test_detection_imports_no_torch(tmp_path: Path) -> None:
    pipeline_folder(tmp_path / "z", "ZImagePipeline")
    code = ("import sys; from tuneline.models.family import detect_family; "
            "from tuneline.models.config import ModelConfig; "
            f"assert detect_family(ModelConfig(base={str(tmp_path / 'z')!r})) == 'zimage'; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
