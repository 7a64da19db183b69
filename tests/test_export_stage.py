"""Stage export on a trained tiny RANDOM SDXL: kohya LoRA and single file, loaded by diffusers."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import train_params


def trained(latents_project, tmp_path, **settings):
    from tuneline.stages.train.stage import run as run_train

    params = train_params(latents_project, **settings)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    run_train(params, latents_project.root, latents_project.root / "data/latents", tmp_path / "models/train",
              checkpoint_dir=tmp_path / "checkpoints")
    return params


def export(latents_project, tmp_path, params, tracker=None, **export_settings):
    from tuneline.config import validate_params
    from tuneline.stages.export.stage import run as run_export

    data = {**params.model_dump(mode="json"), "export": {"name": "demo", **export_settings}}
    params = validate_params(data)
    return params, run_export(params, latents_project.root, tmp_path / "models/train", tmp_path / "renders",
                              tmp_path / "export", tracker=tracker)


def test_lora_export_header_card_copy_and_diffusers_load(latents_project, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from tuneline.models.ref import resolve_model

    params = trained(latents_project, tmp_path, lora={"rank": 4, "alpha": 2.0, "targets": "all", "dropout": 0.1},
                     ema={"enabled": True, "decay": 0.5})
    params, report = export(latents_project, tmp_path, params, copy_to=[str(tmp_path / "comfy/loras")])
    path = tmp_path / "export/demo.safetensors"
    state = json.loads((tmp_path / "models/train/trainer_state.json").read_text())
    with safe_open(path, "pt") as handle:
        header = handle.metadata()
        keys = list(handle.keys())
        alphas = {float(handle.get_tensor(k)) for k in keys if k.endswith(".alpha")}
    assert alphas == {2.0}
    assert header["ss_network_dim"] == "4" and header["ss_network_alpha"] == "2.0"
    assert header["modelspec.trigger_phrase"] == "alf, bet"
    assert header["tuneline.data_digest"] == state["data_digest"]
    assert header["ss_base_model_version"] == "sdxl_base_v1-0"
    assert header["tuneline.weights"] == "ema"  # the run kept EMA weights and export.use_ema is on
    # kohya's minimum keys and modelspec 1.0.1, as sd-scripts writes them
    assert json.loads(header["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "2.0", "dropout": "0.1"}
    assert (header["ss_network_module"], header["ss_network_dropout"]) == ("networks.lora", "0.1")
    assert header["modelspec.sai_model_spec"] == "1.0.1"
    # the code that made the file: git commit and dirty flag of the checkout holding tuneline
    repo = Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    # dirty: uncommitted changes to the package (not dvc.lock, which `dvc repro` rewrites)
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "src/tuneline"],
                                cwd=repo, capture_output=True, text=True).stdout.strip())
    assert header["tuneline.git_commit"] == commit and header["tuneline.git_dirty"] == str(dirty).lower()
    assert header["tuneline.code_version"] == f"0.1.0+g{commit[:12]}" + (".dirty" if dirty else "")
    assert header["modelspec.implementation_version"] == f"tuneline/{commit}"
    assert (tmp_path / "comfy/loras/demo.safetensors").read_bytes() == path.read_bytes()
    assert (report.computed, "modelspec.date" in header) == (1, False)  # no run record here: no date, never "now"
    card = (tmp_path / "export/README.md").read_text()
    # Exported again from the same weights and settings: the file comes from the store, the same bytes.
    from tuneline.stages.export.stage import run as run_export

    again = run_export(params, latents_project.root, tmp_path / "models/train", tmp_path / "renders",
                       tmp_path / "export-again")
    assert (again.computed, again.reused) == (0, 1)
    assert {p.name: p.read_bytes() for p in (tmp_path / "export-again").iterdir() if p.is_file()} == \
        {p.name: p.read_bytes() for p in (tmp_path / "export").iterdir() if p.is_file()}
    assert "RANDOM" in card and "`alf` (alpha)" in card
    # One provenance, word for word, in the header and the card (and as the MLflow run's tags).
    for key in ("tuneline.data_digest", "tuneline.params_digest", "tuneline.code_version", "tuneline.git_commit",
                "tuneline.git_dirty"):
        assert f"- `{key}`: `{header[key]}`" in card, key
    # The real client: the kohya file renders what the diffusers-format result renders.
    images = []
    for lora in (path, tmp_path / "models/train/ema", None):
        pipe = StableDiffusionXLPipeline.from_pretrained(resolve_model("tiny-sdxl"))
        if lora is not None:
            pipe.load_lora_weights(lora)
        images.append(pipe("alf, a thing", num_inference_steps=2, height=64, width=64, output_type="pt",
                           generator=torch.Generator().manual_seed(0)).images)
    exported, from_training, base = images
    assert torch.allclose(exported, from_training, atol=1e-5)
    # ... and that is not the base image: two steps of this LoRA move the render by 0.096 at most and 0.0088
    # on average (measured; pixels in [0, 1]), hundreds of times the tolerance above. A LoRA that exports or
    # trains as nothing (zero up weights) renders the base and fails here.
    change = (exported - base).abs()
    assert change.max() > 0.05 and change.mean() > 0.004, (change.max(), change.mean())


def test_code_provenance_outside_a_git_checkout_is_the_version_alone(tmp_path):
    from tuneline.stages.export.metadata import code_provenance

    assert code_provenance(tmp_path) == {"code_version": "0.1.0", "git_commit": "unknown", "git_dirty": None}


@pytest.mark.slow
def test_full_export_is_a_single_file_diffusers_loads_with_identical_unet(latents_project, tmp_path):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from tuneline.models.ref import resolve_model

    params = trained(latents_project, tmp_path, mode="full")
    export(latents_project, tmp_path, params, dtype="fp32")
    loaded = StableDiffusionXLPipeline.from_single_file(tmp_path / "export/demo.safetensors",
                                                        config=str(resolve_model("tiny-sdxl")), local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "models/train/pipeline/unet")
    original = unet.state_dict()
    assert all(torch.equal(original[k], v) for k, v in loaded.unet.state_dict().items())


# --- mixed training modes: every trained tensor in a file, render shows the files ---------------

def render_image(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe("alf, a thing", num_inference_steps=2, height=64, width=64, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


def exported_tensor(name: str, checkpoint: dict, lora: dict, prefixes: dict) -> torch.Tensor:
    """Where the trainer's parameter `name` (as in a checkpoint's trained.safetensors) lives in the export."""
    import re

    from tuneline.models.sdxl.adapter import DIFFUSERS_NAMES
    from tuneline.models.sdxl.kohya_lora import kohya_module_name
    from tuneline.models.sdxl.sgm_unet import unet_key_to_sgm
    from tuneline.models.sdxl.checkpoint_file import CLIP_L_PREFIX, UNET_PREFIX

    component, _, rest = name.partition(".")
    adapter = re.fullmatch(r"(.+)\.lora_(A|B)\.default\.weight", rest)
    if adapter:
        module = kohya_module_name(DIFFUSERS_NAMES[component], adapter[1], prefixes)
        return lora[f"{module}.lora_{'down' if adapter[2] == 'A' else 'up'}.weight"]
    if component == "unet":
        return checkpoint[UNET_PREFIX + unet_key_to_sgm(rest, prefixes)]
    assert component == "text_encoder_1", name
    return checkpoint[f"{CLIP_L_PREFIX}text_model.{rest.removeprefix('text_model.')}"]


@pytest.mark.parametrize("modes, lora_part", [
    ({"mode": "full", "text_encoder_1": {"mode": "lora"}}, "text encoder 1"),
    ({"mode": "lora", "text_encoder_1": {"mode": "full"}}, "UNet"),
])
def test_mixed_modes_export_every_trained_tensor_and_render_shows_the_files(latents_project, tmp_path, modes,
                                                                            lora_part):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from tuneline.models.ref import resolve_model
    from tuneline.models.sdxl.sgm_unet import sgm_module_prefixes
    from tuneline.stages.render.generate import apply_trained, load_base_pipeline

    params = trained(latents_project, tmp_path, lora={"rank": 4, "alpha": 2.0}, **modes)
    params, report = export(latents_project, tmp_path, params, dtype="fp32")
    checkpoint_path, lora_path = tmp_path / "export/demo.safetensors", tmp_path / "export/demo_lora.safetensors"
    assert report.extra["files"] == [str(checkpoint_path), str(lora_path)]
    checkpoint, lora = load_file(checkpoint_path), load_file(lora_path)
    [step] = tmp_path.glob("checkpoints/*/step_000002")
    trained_tensors = load_file(step / "trained.safetensors")
    prefixes = sgm_module_prefixes(resolve_model("tiny-sdxl") / "unet")
    for name, value in trained_tensors.items():
        assert torch.equal(exported_tensor(name, checkpoint, lora, prefixes), value), name
    assert {k.partition(".")[0] for k in trained_tensors} == {"unet", "text_encoder_1"}
    with safe_open(checkpoint_path, "pt") as handle:
        assert handle.metadata()["tuneline.companion_file"] == "demo_lora.safetensors"
    with safe_open(lora_path, "pt") as handle:
        assert handle.metadata()["tuneline.companion_file"] == "demo.safetensors"
    card = (tmp_path / "export/README.md").read_text()
    assert f"kohya LoRA of the {lora_part}" in card and "load `demo_lora.safetensors` at strength 1.0 on top of" in card
    assert "- UNet: full" in card if modes["mode"] == "full" else "- text encoder 1 (CLIP ViT-L): full" in card

    # Render shows what export ships: the render stage's weights == the two files in diffusers.
    pipeline = load_base_pipeline(params.model, latents_project.root, "cpu", "fp32")
    apply_trained(pipeline, tmp_path / "models/train")
    files = StableDiffusionXLPipeline.from_single_file(checkpoint_path, config=str(resolve_model("tiny-sdxl")),
                                                       local_files_only=True)
    files.load_lora_weights(lora_path)
    assert torch.allclose(render_image(pipeline), render_image(files), atol=1e-5)


# --- v-prediction and zero terminal SNR ------------------------------------------------------------

def test_v_prediction_zero_snr_full_fine_tune_loads_as_what_it_learned(latents_project, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    params = trained(latents_project, tmp_path, mode="full", prediction_type="v_prediction", zero_terminal_snr=True)
    export(latents_project, tmp_path, params, dtype="fp32")
    pipeline_dir = tmp_path / "models/train/pipeline"
    saved = json.loads((pipeline_dir / "scheduler/scheduler_config.json").read_text())
    assert (saved["prediction_type"], saved["rescale_betas_zero_snr"], saved["timestep_spacing"]) == (
        "v_prediction", True, "trailing")
    path = tmp_path / "export/demo.safetensors"
    for pipe in (StableDiffusionXLPipeline.from_pretrained(pipeline_dir),
                 StableDiffusionXLPipeline.from_single_file(path, config=str(pipeline_dir), local_files_only=True)):
        assert pipe.scheduler.config.prediction_type == "v_prediction"
        assert pipe.scheduler.config.rescale_betas_zero_snr is True
    with safe_open(path, "pt") as handle:
        header = handle.metadata()
        assert {"v_pred", "ztsnr"} <= set(handle.keys())  # what ComfyUI's SDXL model_type() reads
        assert handle.get_tensor("v_pred").numel() == 0
    assert (header["modelspec.prediction_type"], header["tuneline.zero_terminal_snr"]) == ("v", "true")
    card = (tmp_path / "export/README.md").read_text()
    assert "prediction type: v_prediction, zero terminal SNR: yes" in card and "`v_pred` / `ztsnr`" in card


# --- DoRA ------------------------------------------------------------------------------------------

def merge_kohya_dora(pipe, kohya: dict, diffusers_keys, prefixes: dict) -> None:
    """Merge a kohya DoRA into `pipe` the way LyCORIS (wd_on_output) and ComfyUI's output-axis path
    define it: W' = dora_scale * V / ||V|| per output row, V = W + alpha/rank * up @ down."""
    from tuneline.models.sdxl.kohya_lora import kohya_module_name

    with torch.no_grad():
        for module_path in sorted({key.rsplit(".lora_", 1)[0] for key in diffusers_keys}):
            component, module = module_path.split(".", 1)
            name = kohya_module_name(component, module, prefixes)
            weight = getattr(pipe, component).get_submodule(module).weight
            up, down, scale = kohya[f"{name}.lora_up.weight"], kohya[f"{name}.lora_down.weight"], kohya[f"{name}.dora_scale"]
            adapted = weight + kohya[f"{name}.alpha"] / down.shape[0] * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
            norm = adapted.reshape(adapted.shape[0], -1).norm(dim=1).reshape(scale.shape)
            weight.copy_(scale * adapted / norm)


def test_dora_trains_round_trips_in_diffusers_and_exports_comfyui_dora_scale(latents_project, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from conftest import make_trainer
    from tuneline.models.ref import resolve_model
    from tuneline.models.sdxl.kohya_lora import export_kohya_lora
    from tuneline.models.sdxl.export import kohya_metadata
    from tuneline.models.sdxl.sgm_unet import sgm_module_prefixes
    from tuneline.stages.render.generate import pipeline_from_training

    tiny = resolve_model("tiny-sdxl")
    params = train_params(latents_project, lr=1e-2, lora={"rank": 4, "alpha": 2.0, "use_dora": True, "targets": "all"},
                          text_encoder_1={"mode": "lora"}, text_encoder_2={"mode": "lora"})
    trainer = make_trainer(latents_project, tmp_path, params)
    trainer.fit()
    out = trainer.save_outputs(tmp_path / "out")
    live = pipeline_from_training(trainer.adapter, trainer.modules)
    for module in (live.unet, live.text_encoder, live.text_encoder_2):
        module.eval()
    with torch.no_grad():
        image = render_image(live)
    # diffusers round trip of the trained result: the same image
    loaded = StableDiffusionXLPipeline.from_pretrained(tiny)
    loaded.load_lora_weights(out)
    assert torch.allclose(render_image(loaded), image, atol=1e-5)
    assert (render_image(StableDiffusionXLPipeline.from_pretrained(tiny)) - image).abs().max() > 1e-3  # it trained

    diffusers_lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert sum(k.endswith("lora_magnitude_vector.weight") for k in diffusers_lora) > 0
    metadata = kohya_metadata(title="dora", rank=4, alpha=2.0, data_digest="d", params_digest="p", code_version="v")
    kohya = load_file(export_kohya_lora(out, tmp_path / "dora.safetensors", tiny / "unet", metadata))
    # ComfyUI's DoRA path: `<lora name>.dora_scale` beside `<lora name>.lora_up.weight`, output axis first.
    names = {k.removesuffix(".lora_up.weight") for k in kohya if k.endswith(".lora_up.weight")}
    assert {k.removesuffix(".dora_scale") for k in kohya if k.endswith(".dora_scale")} == names
    for name in names:
        up, scale = kohya[f"{name}.lora_up.weight"], kohya[f"{name}.dora_scale"]
        assert scale.shape == (up.shape[0], *[1] * (up.ndim - 1)), name
    assert {n.split("_", 2)[1] for n in names} == {"unet", "te1", "te2"}
    assert "lora_unet_input_blocks_1_0_in_layers_2" in names  # conv DoRA
    # The kohya file under the LyCORIS / ComfyUI merge renders the trained image too.
    merged = StableDiffusionXLPipeline.from_pretrained(tiny)
    merge_kohya_dora(merged, kohya, diffusers_lora, sgm_module_prefixes(tiny / "unet"))
    assert torch.allclose(render_image(merged), image, atol=1e-4)


# --- samples and provenance ------------------------------------------------------------------------

def test_stale_samples_are_refused_until_render_shows_the_exported_weights(latents_project, tmp_path):
    from tuneline.config import validate_params
    from tuneline.stages.render.stage import run as run_render

    def render(params):
        data = {**params.model_dump(mode="json"), "render": {**latents_project.params_data["render"],
                                                             "transfer": False, "diagnostics": False}}
        run_render(validate_params(data), latents_project.root, tmp_path / "models/train", tmp_path / "renders")

    render(trained(latents_project, tmp_path, lora={"rank": 4}))
    params = trained(latents_project, tmp_path, lora={"rank": 4}, seed=8)  # a newer run, not rendered
    _, report = export(latents_project, tmp_path, params)
    card = (tmp_path / "export/README.md").read_text()
    assert "![sample]" not in card and "shows other weights than this export ships" in card
    assert any("no samples in the model card" in w for w in report.warnings)
    assert not (tmp_path / "export/samples").exists()
    render(params)
    from mlflow import MlflowClient

    from tuneline.core.tracking.tracker import Tracker

    tracking = params.tracking.model_copy(update={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                                                   "artifact_root": str(tmp_path / "art"), "system_metrics": False})
    with Tracker.start(tracking, latents_project.root, run_name="export", stage="export") as tracker:
        _, report = export(latents_project, tmp_path, params, tracker=tracker)
    card = (tmp_path / "export/README.md").read_text()
    assert card.count("![sample](samples/") == 2 and report.extra["samples"] == 2
    assert sorted(p.name for p in (tmp_path / "export/samples").iterdir()) == ["0.png", "1.png"]
    # In MLflow the card's links resolve too: the samples are logged beside it.
    client = MlflowClient(tracking.tracking_uri)
    logged = {a.path for a in client.list_artifacts(tracker.run_id, "export")}
    logged |= {a.path for a in client.list_artifacts(tracker.run_id, "export/samples")}
    assert {"export/README.md", "export/samples/0.png", "export/samples/1.png"} <= logged
    # MLflow's markdown preview shows no relative images: its card variant inlines them (issue 30).
    assert "export/model_card.html" in logged
    page = Path(client.download_artifacts(tracker.run_id, "export/model_card.html", str(tmp_path / "dl"))).read_text()
    assert page.count('<img src="data:image/png;base64,') == 2 and "samples/0.png" not in page
