"""The validation loss tells when to stop: on demo images, with one training image and four held out, it
first falls, then rises while the training loss keeps falling; the best step lies between, and
`export.weights: best` exports it. Both families, through the stages a user runs.

The smallest setting that shows it honestly. The tiny RANDOM models cannot show it as built: their
random VAE's posterior has a standard deviation near 1 while its means spread by about 0.3, so each
step's latent sample is mostly fresh noise and there is nothing image-specific to memorize; and their
copied published scaling factors leave the latents at about 3 % of the noise's scale. Both are facts of
random weights, not of a trained VAE, so this test gives a copy of the tiny model what a trained VAE has
(`trained_like_vae`): a narrow posterior (std e^-7) and a scaling factor (and, for Z-Image, a shift)
measured from its own latents of these images, as the published factors were measured. The denoisers
stay random.

Full fine-tune, one training image, a small learning rate: the tiny denoiser first learns what the held-
out images share, then memorizes the one it sees. SDXL trains with v-prediction here: with epsilon
prediction a wrong guess of the image costs little except at the lowest noise, and over a test's few
hundred steps its validation curve only wanders; v-prediction and flow matching (Z-Image's own
objective) count the image error at every noise level. A rank-16 LoRA at a stable learning rate does not
memorize within this budget on these tiny denoisers, so the LoRA path's validation is tested in
test_validation.py on its numbers, not on this curve."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import Project, through_latents

DEMO_IMAGES = Path(__file__).resolve().parents[1] / "data" / "raw" / "shapes"
# per family: what differs from the shared recipe below (see the module docstring for SDXL's objective)
RECIPES = {
    "sdxl": {"lr": 3e-4, "prediction_type": "v_prediction"},
    "zimage": {"lr": 1e-3},
}
STEPS, EVERY, WINDOW = 150, 5, 20


def trained_like_vae(model: Path, images: list[Path], shift: bool) -> None:
    """Give the tiny model's random VAE a trained VAE's narrow posterior and unit-scale latents."""
    from diffusers import AutoencoderKL
    from PIL import Image

    vae = AutoencoderKL.from_pretrained(model / "vae")
    moments = vae.quant_conv if vae.config.use_quant_conv else vae.encoder.conv_out  # mean | logvar
    half = moments.out_channels // 2
    with torch.no_grad():
        moments.weight[half:] = 0
        moments.bias[half:] = -14.0  # logvar: std e^-7
        pixels = torch.stack([
            torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((64, 64)), dtype=np.float32) / 127.5 - 1)
            .permute(2, 0, 1) for p in images])
        means = vae.encode(pixels).latent_dist.mean
    vae.register_to_config(scaling_factor=round(1 / float(means.std()), 4),
                           **({"shift_factor": round(float(means.mean()), 4)} if shift else {}))
    vae.save_pretrained(model / "vae")


def overfitting_project(root: Path, family: str) -> Project:
    """Five demo images (one trains, four are held out) through ingest -> bucket -> caption -> latents,
    on a copy of the tiny model with a trained-like VAE."""
    from tuneline.tiny.cache import resolve_tiny

    images = sorted(DEMO_IMAGES.glob("*.jpg"))[:5]
    model = root / "models" / f"tiny-{family}-trained-like-vae"
    shutil.copytree(resolve_tiny(f"tiny-{family}"), model)
    trained_like_vae(model, images, shift=family == "zimage")
    project = Project(root)
    project.params_data.update(
        datasets=[{"name": "shapes", "path": "data/raw/shapes", "validation": 4}],
        caption={"mode": "sidecar_only"}, model={"base": str(model)})
    project.params_data["bucket"].update(resolution=64, divisible_by=32, batch_size=1)
    for image in images:
        shutil.copy(image, project.raw("shapes") / image.name)
        (project.raw("shapes") / f"{image.stem}.txt").write_text("shp, a shape", "utf-8")
    return through_latents(project)


def read_csv(path: Path) -> dict[int, float]:
    with path.open(newline="") as handle:
        return {int(row["step"]): float(row["loss"]) for row in csv.DictReader(handle)}


def window_mean(losses: dict[int, float], last_step: int) -> float:
    return float(np.mean([losses[s] for s in range(last_step - WINDOW + 1, last_step + 1)]))


@pytest.mark.parametrize("family", sorted(RECIPES))
def test_validation_loss_falls_then_rises_and_best_is_exported(family, tmp_path):
    from accelerate.state import AcceleratorState
    from safetensors import safe_open

    from tuneline.config import validate_params
    from tuneline.stages.export.stage import run as run_export
    from tuneline.stages.train.stage import run as run_train

    project = overfitting_project(tmp_path / "project", family)
    recipe = dict(RECIPES[family])
    data = {**project.params_data, "train": {
        "mode": "full", "num_steps": STEPS, "seed": 7, "lr": recipe.pop("lr"), "log_every": 1,
        "schedule": {"name": "constant", "warmup_steps": 0},
        "checkpoint": {"every_steps": STEPS, "keep_last": 1},
        "validation": {"every_steps": EVERY}, **recipe}}
    params = validate_params(data)
    AcceleratorState._reset_state(True)
    report = run_train(params, project.root, project.root / "data/latents", tmp_path / "models/train",
                       tmp_path / "metrics", checkpoint_dir=tmp_path / "checkpoints")
    assert sorted(r["split"] for r in project.manifest("data/latents")) == ["train"] + ["validation"] * 4
    assert report.extra["val_loss_best_step"] is not None

    validation = read_csv(tmp_path / "metrics/train_val.csv")
    training = read_csv(tmp_path / "metrics/train_loss.csv")
    assert sorted(validation) == list(range(EVERY, STEPS + 1, EVERY))
    best = min(validation, key=validation.__getitem__)
    first, last = min(validation), max(validation)
    # It falls first, then rises well above its lowest value; the best step lies between.
    assert first < best < last, validation
    assert validation[first] > validation[best]
    assert validation[last] > 1.1 * validation[best], validation
    # Meanwhile the training loss keeps falling (means over WINDOW logged steps, as the user sees it).
    assert window_mean(training, last) < 0.75 * window_mean(training, max(best, WINDOW)), training
    state = json.loads((tmp_path / "models/train/trainer_state.json").read_text())
    assert state["best_validation_step"] == best
    assert state["best_validation_loss"] == pytest.approx(validation[best], rel=1e-6)

    data = params.model_dump(mode="json")
    data["export"] = {"name": "overfit", "samples": 0, "weights": "best"}
    run_export(validate_params(data), project.root, tmp_path / "models/train", tmp_path / "renders",
               tmp_path / "export", tmp_path / "metrics")
    [exported] = (tmp_path / "export").glob("overfit*.safetensors")
    with safe_open(str(exported), "pt") as handle:
        assert handle.metadata()["tuneline.exported_step"] == str(best)
