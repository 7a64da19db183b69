"""tuneline.tiny: tiny random models in the standard layouts, loaded by the real classes."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest

import tuneline.tiny as tiny
from tuneline.tiny import cache as tiny_cache
from tuneline.tiny.sdxl import ADDITION_TIME_EMBED_DIM, TE1_HIDDEN, TE2_HIDDEN, TE2_PROJECTION

PROMPT = "a photo of a cat"


def tensors(folder: Path) -> dict[str, object]:
    """Every tensor of every safetensors file under `folder`, keyed by file and name."""
    from safetensors.torch import load_file

    found = {}
    for file in sorted(folder.rglob("*.safetensors")):
        for name, tensor in load_file(file).items():
            found[f"{file.relative_to(folder)}:{name}"] = tensor
    return found


def assert_same_tensors(a: Path, b: Path) -> None:
    left, right = tensors(a), tensors(b)
    assert left and left.keys() == right.keys()
    for key, tensor in left.items():
        other = right[key]
        assert tensor.dtype == other.dtype and tensor.shape == other.shape, key
        assert tensor.numpy().tobytes() == other.numpy().tobytes(), key


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.build_tiny_sdxl(tmp_path_factory.mktemp("tiny") / "sdxl", seed=0)


@pytest.fixture(scope="module")
def sdxl_pipe(sdxl_dir: Path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def florence_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.build_tiny_florence2(tmp_path_factory.mktemp("tiny") / "florence2", seed=0)


def test_import_is_light() -> None:
    import subprocess
    import sys

    code = "import sys, tuneline.tiny; print([m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    assert out.stdout.strip() == "[]"


def test_sdxl_layout(sdxl_dir: Path) -> None:
    index = json.loads((sdxl_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    for sub in ("unet", "vae"):
        assert (sdxl_dir / sub / "diffusion_pytorch_model.safetensors").is_file()
    for sub in ("text_encoder", "text_encoder_2"):
        assert (sdxl_dir / sub / "model.safetensors").is_file()
    assert not list(sdxl_dir.rglob("*.bin"))
    for sub in ("tokenizer", "tokenizer_2"):
        names = {p.name for p in (sdxl_dir / sub).iterdir()}
        assert {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"} <= names
    scheduler = json.loads((sdxl_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "EulerDiscreteScheduler"
    betas = (scheduler["beta_schedule"], scheduler["beta_start"], scheduler["beta_end"])
    assert betas == ("scaled_linear", 0.00085, 0.012)
    assert (scheduler["num_train_timesteps"], scheduler["prediction_type"]) == (1000, "epsilon")
    assert (scheduler["timestep_spacing"], scheduler["steps_offset"]) == ("leading", 1)
    unet = json.loads((sdxl_dir / "unet" / "config.json").read_text())
    assert unet["cross_attention_dim"] == TE1_HIDDEN + TE2_HIDDEN == 96
    assert unet["addition_embed_type"] == "text_time"
    assert unet["projection_class_embeddings_input_dim"] == 6 * ADDITION_TIME_EMBED_DIM + TE2_PROJECTION
    vae = json.loads((sdxl_dir / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] == 0.13025 and len(vae["block_out_channels"]) == 4
    assert "RANDOM" in (sdxl_dir / tiny.NOTE_NAME).read_text()
    # ~10 MB: small enough to build in seconds, big enough to be a real UNet.
    assert (sdxl_dir / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size < 12_000_000


def test_sdxl_same_seed_same_tensors(sdxl_dir: Path, tmp_path: Path) -> None:
    again = tiny.build_tiny_sdxl(tmp_path / "again", seed=0)
    assert_same_tensors(sdxl_dir, again)


def test_sdxl_tokenizers_and_encoders(sdxl_pipe) -> None:
    import torch

    for tokenizer in (sdxl_pipe.tokenizer, sdxl_pipe.tokenizer_2):
        assert tokenizer.model_max_length == 77
        ids = tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        assert ids.shape == (1, 77)
        assert tokenizer.decode(ids[0], skip_special_tokens=True) == PROMPT
        assert int(ids.max()) < tokenizer.vocab_size <= sdxl_pipe.text_encoder.config.vocab_size
    # tokenizer_2 pads with "!" as SDXL's does.
    ids_2 = sdxl_pipe.tokenizer_2(PROMPT, padding="max_length", max_length=77).input_ids
    assert ids_2[-1] == sdxl_pipe.tokenizer_2.convert_tokens_to_ids("!")

    ids = sdxl_pipe.tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out_1 = sdxl_pipe.text_encoder(ids, output_hidden_states=True)
        out_2 = sdxl_pipe.text_encoder_2(ids, output_hidden_states=True)
    assert out_1.last_hidden_state.shape == (1, 77, 32)
    assert out_2.hidden_states[-2].shape == (1, 77, 64)  # SDXL conditions on the penultimate layer
    assert len(out_2.hidden_states) == 4  # embeddings + 3 layers
    assert out_2.text_embeds.shape == (1, 32)

    embeds, _, pooled, _ = sdxl_pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    assert embeds.shape == (1, 77, 96) and pooled.shape == (1, 32)
    assert torch.isfinite(embeds).all() and torch.isfinite(pooled).all()


def test_sdxl_renders(sdxl_pipe, sdxl_dir: Path) -> None:
    import numpy as np
    import torch
    from diffusers import StableDiffusionXLPipeline

    image = sdxl_pipe(PROMPT, num_inference_steps=2, height=64, width=64, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()

    # `torch_dtype` is what most callers pass; diffusers 0.42 deprecates it for `dtype`.
    with pytest.warns(FutureWarning, match="torch_dtype"):
        old_name = StableDiffusionXLPipeline.from_pretrained(sdxl_dir, torch_dtype=torch.float32)
    assert old_name.unet.dtype == torch.float32
    pipe32 = StableDiffusionXLPipeline.from_pretrained(sdxl_dir, dtype=torch.float32)
    pipe32.set_progress_bar_config(disable=True)
    assert pipe32.unet.dtype == torch.float32 and pipe32.text_encoder_2.dtype == torch.float32
    latents = pipe32(PROMPT, negative_prompt="blurry", num_inference_steps=2, height=64, width=64,
                     guidance_scale=5.0, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()


def test_florence2_generates_and_post_processes(florence_dir: Path) -> None:
    import torch
    from PIL import Image
    from transformers import Florence2ForConditionalGeneration, Florence2Processor

    model = Florence2ForConditionalGeneration.from_pretrained(florence_dir).eval()
    processor = Florence2Processor.from_pretrained(florence_dir)
    assert "pure_text" in processor.post_processor_config
    tokenizer = processor.tokenizer
    assert tokenizer.image_token == "<image>" and tokenizer.image_token_id == model.config.image_token_id
    assert len(tokenizer) == model.config.text_config.vocab_size
    assert {"<loc_0>", "<loc_999>", "<od>", "</od>", "<poly>", "<sep>"} <= set(tokenizer.get_vocab())

    image = Image.new("RGB", (48, 32), (180, 40, 20))
    inputs = processor(text="<CAPTION>", images=image, return_tensors="pt")
    # The image placeholder count must equal the vision tower's token count.
    assert int((inputs["input_ids"] == tokenizer.image_token_id).sum()) == processor.image_processor.image_seq_length
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=12, num_beams=1, do_sample=False)
    assert generated.shape[0] == 1 and 2 <= generated.shape[1] <= 14
    text = processor.batch_decode(generated, skip_special_tokens=False)[0]
    assert isinstance(text, str) and text
    parsed = processor.post_process_generation(text, task="<CAPTION>", image_size=image.size)
    assert list(parsed) == ["<CAPTION>"] and isinstance(parsed["<CAPTION>"], str)
    # Generation is limited to letters and spaces: a caption-shaped string (meaning nothing).
    assert re.fullmatch(r"[a-z ]+", parsed["<CAPTION>"])
    assert processor.batch_decode(generated, skip_special_tokens=True)[0].strip() == parsed["<CAPTION>"]
    boxes = processor.post_process_generation(text, task="<OD>", image_size=image.size)
    assert set(boxes["<OD>"]) >= {"bboxes", "labels"}
    assert "RANDOM" in (florence_dir / tiny.NOTE_NAME).read_text()


def test_florence2_auto_classes(florence_dir: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    assert type(AutoProcessor.from_pretrained(florence_dir)).__name__ == "Florence2Processor"
    model = AutoModelForImageTextToText.from_pretrained(florence_dir)
    assert type(model).__name__ == "Florence2ForConditionalGeneration"


def test_florence2_seeded_tensors(florence_dir: Path, tmp_path: Path) -> None:
    assert_same_tensors(florence_dir, tiny.build_tiny_florence2(tmp_path / "again", seed=0))
    other = tensors(tiny.build_tiny_florence2(tmp_path / "other", seed=1))
    same = tensors(florence_dir)
    key = "model.safetensors:model.language_model.shared.weight"
    assert key in same and not same[key].equal(other[key])


def fake_builder(calls: list[Path]):
    """A stand-in builder: records calls, writes a one-file 'model' and the completion note."""

    def build(path: Path) -> Path:
        calls.append(path)
        (path / "config.json").write_text("{}")
        (path / tiny.NOTE_NAME).write_text("RANDOM")
        return path

    return build


def test_ensure_builds_once_and_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture) -> None:
    calls: list[Path] = []
    real = tiny_cache._BUILDERS["florence2"]
    monkeypatch.setitem(tiny_cache._BUILDERS, "florence2", lambda path: calls.append(path) or real(path))

    with caplog.at_level(logging.WARNING):
        first = tiny.ensure_tiny_model("florence2", cache_dir=tmp_path)
    assert "RANDOM" in caplog.text
    assert first == tmp_path / f"tiny-florence2-v{tiny.TINY_VERSION}" and first.is_dir()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert tiny.ensure_tiny_model("florence2", cache_dir=tmp_path) == first
    assert tiny.resolve_tiny("tiny-florence2", cache_dir=tmp_path) == first
    assert len(calls) == 1 and (first / "model.safetensors").stat().st_mtime_ns == stamp
    # Built in a temp folder beside the final one, which is gone after the rename.
    assert calls[0].parent == tmp_path and calls[0].name.startswith(f".{first.name}.tmp-")
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [first.name]


def test_ensure_ignores_killed_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setitem(tiny_cache._BUILDERS, "sdxl", fake_builder(calls))
    final = tiny.tiny_model_dir("sdxl", cache_dir=tmp_path)
    # A killed build leaves its temp folder (complete-looking, even) ...
    leftover = tmp_path / f".{final.name}.tmp-dead"
    leftover.mkdir()
    (leftover / tiny.NOTE_NAME).write_text("RANDOM")
    # ... and a final-named folder without the completion note is not ours to trust.
    final.mkdir()
    (final / "half.safetensors").write_bytes(b"\0")

    assert tiny.ensure_tiny_model("sdxl", cache_dir=tmp_path) == final
    assert len(calls) == 1 and not leftover.exists()
    assert not (final / "half.safetensors").exists() and (final / "config.json").is_file()
    assert tiny.ensure_tiny_model("sdxl", cache_dir=tmp_path) == final and len(calls) == 1


KILLED_BUILD = """
import sys, time
from pathlib import Path
from tuneline.tiny import cache

def hang(path):
    (path / "config.json").write_text("{}")
    print("building", flush=True)
    time.sleep(60)

cache._BUILDERS["sdxl"] = hang
cache.ensure_tiny_model("sdxl", Path(sys.argv[1]))
"""


def test_killed_build_process_is_not_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True, env=os.environ)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "building"
    finally:
        proc.kill()  # SIGKILL mid-build: no cleanup code runs, the lock dies with the process
        proc.wait()
    final = tiny.tiny_model_dir("sdxl", cache_dir=tmp_path)
    (leftover,) = tmp_path.glob(f".{final.name}.tmp-*")
    assert not final.exists()

    calls: list[Path] = []
    monkeypatch.setitem(tiny_cache._BUILDERS, "sdxl", fake_builder(calls))
    assert tiny.ensure_tiny_model("sdxl", cache_dir=tmp_path) == final
    assert len(calls) == 1 and not leftover.exists()


def test_concurrent_ensure_builds_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    import time

    calls: list[Path] = []
    fake = fake_builder(calls)

    def slow(path: Path) -> Path:
        time.sleep(0.3)  # long enough that both callers arrive while the first still builds
        return fake(path)

    monkeypatch.setitem(tiny_cache._BUILDERS, "florence2", slow)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(tiny.ensure_tiny_model("florence2", tmp_path)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 3


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(path: Path) -> Path:
        (path / "config.json").write_text("{}")
        raise RuntimeError("killed")

    monkeypatch.setitem(tiny_cache._BUILDERS, "sdxl", broken)
    with pytest.raises(RuntimeError, match="killed"):
        tiny.ensure_tiny_model("sdxl", cache_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_resolve_and_default_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setitem(tiny_cache._BUILDERS, "sdxl", fake_builder(calls))
    monkeypatch.setenv("TUNELINE_HOME", str(tmp_path / "home"))
    assert tiny.default_cache_dir() == tmp_path / "home" / "tiny"
    assert tiny.TINY_MODEL_IDS == {"tiny-sdxl": "sdxl", "tiny-florence2": "florence2", "tiny-zimage": "zimage"}
    assert tiny.resolve_tiny("stabilityai/stable-diffusion-xl-base-1.0") is None
    assert tiny.resolve_tiny("tiny-sdxl") == tmp_path / "home" / "tiny" / f"tiny-sdxl-v{tiny.TINY_VERSION}"
    monkeypatch.delenv("TUNELINE_HOME")
    assert tiny.default_cache_dir() == Path.home() / ".cache" / "tuneline" / "tiny"
    with pytest.raises(ValueError, match="unknown tiny model kind"):
        tiny.ensure_tiny_model("sd15", cache_dir=tmp_path)  # type: ignore[arg-type]
