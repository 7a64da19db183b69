"""Live samples and the render stage from the prompt embeddings the latents stage caches
(data/prompt_embeds), on both families: no text encoder is loaded, and every image equals the one
rendered from the prompts' text at the same seed (up to float rounding, see assert_same_image); a
prompt that is not cached falls back to the text encoders with one warning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import item_bytes, make_latents_project

# One prompt with a negative, one without (SDXL zeros an empty negative, Z-Image encodes ""), both
# with guidance, the second also the beta images' caption; the families' image sides (SDXL's tiny VAE:
# x8, Z-Image's patches: multiples of 16).
PROMPTS = {"defaults": {"steps": 2, "guidance_scale": 3.0},
           "prompts": [{"prompt": "alf, a red thing", "negative_prompt": "blurry", "seed": 1},
                       {"prompt": "bet, a photo", "seed": 2}]}
SIZES = {"sdxl": 64, "zimage": 32}


def as_array(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image, dtype=np.int16)


def assert_same_image(cached: Path, text: Path) -> None:
    """The same image, up to float rounding: the latents stage encodes up to 32 texts per batch, and a
    batch's shape moves an embedding's last bits (SDXL's pooled projection ~5e-7, Z-Image's padding
    ~4e-9), which may turn a pixel value by one. A wrong embedding (another text, a missing or zeroed
    negative) changes far more."""
    diff = np.abs(as_array(cached) - as_array(text))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (cached, int(diff.max()), float((diff > 0).mean()))


class LoadSpy:
    """Every transformers model loaded (the text encoders are the pipelines' only ones) and every
    pipeline a live sample renders with."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from transformers import PreTrainedModel

        from tuneline.stages.render import generate

        self.models: list[str] = []
        self.live: list = []
        load, live_evaluate = PreTrainedModel.from_pretrained.__func__, generate.live_evaluate

        def from_pretrained(cls, *args, **kwargs):
            self.models.append(cls.__name__)
            return load(cls, *args, **kwargs)

        def recorded_live_evaluate(pipeline, *args, **kwargs):
            self.live.append(pipeline)
            return live_evaluate(pipeline, *args, **kwargs)

        monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(from_pretrained))
        monkeypatch.setattr(generate, "live_evaluate", recorded_live_evaluate)


@pytest.fixture(scope="module", params=["sdxl", "zimage"])
def trained(request, tmp_path_factory):
    """The latents project of one family (the prompts file above cached by its latents stage), trained
    2 LoRA steps by the train stage with live samples at step 2; what loaded meanwhile."""
    from accelerate.state import AcceleratorState

    from tuneline.stages.train.stage import run as run_train

    family = request.param
    root = tmp_path_factory.mktemp(f"prompt-embeds-{family}")
    (root / "render_prompts.yaml").write_text(yaml.safe_dump(PROMPTS), "utf-8")
    size = SIZES[family]
    project = make_latents_project(
        root, model={"base": f"tiny-{family}"},
        render={"prompts_file": "render_prompts.yaml", "height": size, "width": size, "sheet_tile": size,
                "live_prompts": 2, "live_every": 2, "diagnostic_samples": 1, "diagnostic_timesteps": [500]})
    params = project.params(train={"num_steps": 2, "seed": 7, "lr": 1e-2, "checkpoint": {"every_steps": 2}})
    AcceleratorState._reset_state(True)
    with pytest.MonkeyPatch.context() as monkeypatch:
        spy = LoadSpy(monkeypatch)
        run_train(params, root, root / "data/latents", root / "models/train", root / "metrics",
                  checkpoint_dir=root / "checkpoints/train")
    return family, project, params, spy


def test_the_latents_stage_caches_every_prompt_text_once(trained):
    from tuneline.core.manifest import read_manifest

    family, project, _, _ = trained
    folder = project.root / "data/prompt_embeds"
    index = json.loads((folder / "prompt_embeds.json").read_text())
    # The transfer prompts: alpha's first caption into beta's trigger word, beta's into alpha's.
    transfer = ["bet, a red thing, number 0, outdoors", "alf, a photo"]
    assert sorted(index["texts"]) == sorted(["alf, a red thing", "blurry", "bet, a photo", "", *transfer])
    assert (index["family"], index["dtype"], index["off_because"]) == (family, "fp32", [])
    assert sorted(p.name for p in folder.iterdir()) == sorted([*index["texts"].values(), "prompt_embeds.json"])
    report = json.loads((project.root / "reports/latents.json").read_text())
    assert (report["prompt_embeddings"], report["prompt_embeddings_texts"]) == ("cached", 6)
    # "bet, a photo" is also the beta images' caption: one stored file, encoded once, as a caption.
    beta = [r for r in read_manifest(project.root / "data/latents") if r["dataset"] == "beta"]
    assert beta and all(r["text_key"] + ".safetensors" == index["texts"]["bet, a photo"] for r in beta)
    shared = folder / index["texts"]["bet, a photo"]
    assert shared.read_bytes() == item_bytes(project.root / "data/latents", beta[0], "text_embeddings")
    assert report["prompt_embeddings_computed"] == 5


def test_live_samples_load_no_text_encoder_and_equal_the_text_rendered_ones(trained, tmp_path):
    """The train stage (cached captions, cached prompts) loads no text encoder at all; its live pipeline
    has none; the live images equal the live pipeline's with text encoders, rendering the prompts' text."""
    from accelerate.state import AcceleratorState

    from tuneline.models.family import FAMILIES
    from tuneline.stages.render.generate import live_evaluate, live_prompts, pipeline_from_training
    from tuneline.stages.train.stage import build_trainer

    family, project, params, spy = trained
    root = project.root
    assert spy.models == []
    [pipeline] = spy.live
    assert all(getattr(pipeline, name) is None for name in FAMILIES[family].render.text_encoders)
    modules = {name for name, module in pipeline.components.items() if module is not None and hasattr(module, "to")}
    assert modules == {FAMILIES[family].render.denoiser, "vae"}  # only the VAE joins the training modules
    live = sorted((root / "models/train/live/step_000002").glob("*.png"))
    assert [p.name for p in live] == ["0.png", "1.png"]

    AcceleratorState._reset_state(True)
    trainer = build_trainer(params, root, root / "data/latents", root / "checkpoints/train")
    trainer.setup()  # resumed at step 2: the weights of the live samples
    assert trainer.state.step == 2
    with_text = pipeline_from_training(trainer.adapter, trainer.modules)
    assert with_text.text_encoder is not None
    paths = live_evaluate(with_text, live_prompts(params, root), tmp_path, step=2)
    for cached, text in zip(live, paths):
        assert_same_image(cached, text)


def test_render_from_cached_prompts_loads_no_text_encoder_and_equals_rendering_from_text(trained, monkeypatch):
    """The render stage loads no text encoder when every prompt is cached. A prompt added since the
    latents stage ran: it falls back to the text encoders (one warning naming the prompt), and every
    image rendered from text (in another image store) equals the cached run's."""
    from tuneline.stages.render.stage import run as run_render

    family, project, params, _ = trained
    root = project.root
    spy = LoadSpy(monkeypatch)
    cached = run_render(params, root, root / "models/train", root / "renders", root / "metrics")
    assert spy.models == []
    assert cached.extra["prompt_embeddings"] == "cache (data/prompt_embeds)"
    assert not any("text encoders" in w for w in cached.warnings)
    diagnostics = 1 if family == "sdxl" else 0
    assert (cached.computed, cached.extra["transfer_rendered"]) == (2 + 2 + 2 + diagnostics, 2)

    edited = {**PROMPTS, "prompts": [*PROMPTS["prompts"], {"prompt": "a new prompt", "seed": 3}]}
    (root / "render_prompts.yaml").write_text(yaml.safe_dump(edited), "utf-8")
    try:
        other_store = project.params(store_dir=".tuneline/text-store")
        from_text = run_render(other_store, root, root / "models/train", root / "renders_text", root / "metrics")
    finally:
        (root / "render_prompts.yaml").write_text(yaml.safe_dump(PROMPTS), "utf-8")
    assert spy.models and from_text.extra["prompt_embeddings"] == "text encoders"
    [warning] = [w for w in from_text.warnings if "text encoders" in w]
    assert "1 prompt text(s) are not cached ('a new prompt')" in warning and "dvc repro" in warning
    images = [f"{column}/{i}.png" for column in ("base", "final") for i in range(2)]
    images += ["transfer/alpha_to_beta.png", "transfer/beta_to_alpha.png"] + ["diagnostics.png"] * diagnostics
    for name in images:
        assert_same_image(root / "renders" / name, root / "renders_text" / name)


def test_live_samples_fall_back_with_the_reason_when_a_prompt_is_not_cached(trained):
    from tuneline.config import validate_params
    from tuneline.stages.render.generate import live_prompt_embeddings, live_prompts

    _, project, params, _ = trained
    root = project.root
    embedded, why = live_prompt_embeddings(params, root, live_prompts(params, root))
    assert embedded is not None and why == ""
    (root / "other_prompts.yaml").write_text(yaml.safe_dump(["alf, a red thing", "a prompt nobody cached"]))
    render = {**project.params_data["render"], "prompts_file": "other_prompts.yaml"}
    other = validate_params({**project.params_data, "render": render})
    assert live_prompt_embeddings(other, root, live_prompts(other, root)) == (
        None, "1 prompt text(s) are not cached ('a prompt nobody cached'): run the latents stage (dvc repro) "
              "to cache them")
    # Trained text encoders make the prompts of their samples: no cache, and nothing to warn about.
    trains_encoder = validate_params({**project.params_data, "train": {"text_encoder_1": {"mode": "lora"}}})
    assert live_prompt_embeddings(trains_encoder, root, live_prompts(params, root)) == (None, "")
