"""The style/structure loss (train.loss.structure, datasets[].loss.structure): each term against an independent
numpy computation, the clean latent of every prediction type, gradients into the LoRA, per-sample weights picked
by the data set, all-zero weights leaving today's loss and run key, and a `light` weight training the predicted
clean latent's brightness towards the data set's, on the demo images (tiny RANDOM models, CPU)."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import Project, make_trainer, train_params

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("sdxl", "zimage")
SHAPES = sorted((REPO / "data" / "raw" / "shapes").glob("*.jpg"))  # the demo images
SIDE = 64  # demo images resized to 64x64: 8x8 latents


def projection(family: str):
    """The family's latent -> RGB factors (its adapter's)."""
    from tuneline.models.family import get_family

    return get_family(family).load("adapter").latent_rgb


# --- an independent numpy reference of the four terms ------------------------------------------

def np_lab(rgb: np.ndarray) -> np.ndarray:
    """CIE Lab / 100 of sRGB (batch, 3, H, W) in [0, 1] (clamped): the textbook formulas, per pixel."""
    rgb = np.clip(rgb, 0.0, 1.0).astype(np.float64)
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    r, g, b = linear[:, 0], linear[:, 1], linear[:, 2]
    x = (0.4124564 * r + 0.3575761 * g + 0.1804375 * b) / 0.95047
    y = 0.2126729 * r + 0.7151522 * g + 0.0721750 * b
    z = (0.0193339 * r + 0.1191920 * g + 0.9503041 * b) / 1.08883

    def f(t):
        return np.where(t > (6 / 29) ** 3, np.cbrt(t), t * (29 / 6) ** 2 / 3 + 4 / 29)

    lab = np.stack([116 * f(y) - 16, 500 * (f(x) - f(y)), 200 * (f(y) - f(z))], axis=1)
    return lab / 100


def np_filter(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W) correlated with the normalised Gaussian (sigma 1.5) of `size`, zero padding, same size."""
    offsets = np.arange(size) - size // 2
    g = np.exp(-offsets**2 / (2 * 1.5**2))
    kernel = np.outer(g, g) / np.outer(g, g).sum()
    padded = np.pad(image, size // 2)
    height, width = image.shape
    out = np.zeros_like(image)
    for i in range(size):
        for j in range(size):
            out += kernel[i, j] * padded[i:i + height, j:j + width]
    return out


def np_terms(x0_pred: np.ndarray, x0: np.ndarray, factors, bias) -> np.ndarray:
    """(batch, 4): 1 - SSIM of L, moments of L, moments of a and b, high-pass L1 of L."""
    def rgb(latents):
        out = np.einsum("bchw,cr->brhw", latents.astype(np.float64), np.asarray(factors)) + np.asarray(bias)[None, :,
                                                                                                            None, None]
        return (out + 1) / 2

    pred, target = np_lab(rgb(x0_pred)), np_lab(rgb(x0))
    rows = []
    for p, t in zip(pred, target):
        lp, lt = p[0], t[0]
        mu_p, mu_t = np_filter(lp, 11), np_filter(lt, 11)
        var_p = np_filter(lp * lp, 11) - mu_p**2
        var_t = np_filter(lt * lt, 11) - mu_t**2
        cov = np_filter(lp * lt, 11) - mu_p * mu_t
        c1, c2 = 0.01**2, 0.03**2
        ssim = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2))

        def moments(a, b):
            return abs(a.mean() - b.mean()) + abs(a.std(ddof=1) - b.std(ddof=1))

        color = (moments(p[1], t[1]) + moments(p[2], t[2])) / 2
        tex = np.abs((lp - np_filter(lp, 7)) - (lt - np_filter(lt, 7))).mean()
        rows.append([1 - ssim.mean(), moments(lp, lt), color, tex])
    return np.array(rows)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_term_equals_an_independent_computation(family):
    from tuneline.train.structure_loss import structure_terms

    rgb = projection(family)
    channels = rgb.channels
    generator = torch.Generator().manual_seed(0)
    # Wide enough that some pixels clamp to black or white and some fall on Lab's linear segment near 0.
    x0 = torch.randn(2, channels, 9, 12, generator=generator) * (1.5 if family == "sdxl" else 4.0)
    x0_pred = x0 + torch.randn(x0.shape, generator=generator) * 0.5
    got = structure_terms(x0_pred, x0, rgb).double().numpy()
    want = np_terms(x0_pred.numpy(), x0.numpy(), rgb.factors, rgb.bias)
    assert np.all(want > 0)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_known_answers(family):
    """The same latent gives 0 for every term; two flat latents differ in light by their L difference and
    in color by the mean of their a and b differences (both standard deviations are 0)."""
    from tuneline.train.structure_loss import latent_to_rgb, rgb_to_lab, structure_terms

    rgb = projection(family)
    x0 = torch.randn(3, rgb.channels, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(structure_terms(x0, x0, rgb), torch.zeros(3, 4))
    flat = torch.zeros(2, rgb.channels, 8, 8)
    flat[0] += 0.3
    flat[1] -= 0.2
    lab = rgb_to_lab(latent_to_rgb(flat, rgb))[:, :, 0, 0]
    terms = structure_terms(flat[:1], flat[1:], rgb)[0]
    assert float(terms[1]) == pytest.approx(float((lab[0, 0] - lab[1, 0]).abs()), rel=1e-5)
    assert float(terms[2]) == pytest.approx(float((lab[0, 1:] - lab[1, 1:]).abs().mean()), rel=1e-5)


def test_the_clean_latent_of_every_prediction_type():
    """x0 from epsilon and from v (DDPM, diffusers' own add_noise / get_velocity) and from a flow velocity
    (x_t - sigma * v) is the clean latent itself when the prediction is exact."""
    from diffusers import DDPMScheduler

    from tuneline.train.flow_matching import noisy_latents, predicted_x0, velocity_target
    from tuneline.train.loss import ddpm_x0

    generator = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, 4, 8, 8, generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    timesteps = torch.tensor([0, 250, 600, 999])
    noisy = scheduler.add_noise(x0, noise, timesteps)
    for kind, prediction in (("epsilon", noise), ("v_prediction", scheduler.get_velocity(x0, noise, timesteps))):
        torch.testing.assert_close(ddpm_x0(prediction, noisy, scheduler.alphas_cumprod, timesteps, kind), x0,
                                   rtol=1e-4, atol=2e-3 if kind == "epsilon" else 1e-5)
    with pytest.raises(ValueError, match="allowed: epsilon, v_prediction"):
        ddpm_x0(noise, noisy, scheduler.alphas_cumprod, timesteps, "sample")
    sigmas = torch.tensor([0.0, 0.3, 0.7, 1.0])
    flow_noisy = noisy_latents(x0, noise, sigmas)
    torch.testing.assert_close(predicted_x0(flow_noisy, velocity_target(x0, noise), sigmas), x0)


# --- adapters on hand-made batches of the demo images --------------------------------------------

def demo_latents(family: str, paths: list[Path]) -> torch.Tensor:
    """Model-space latents of the demo images for which the family's projection is exact: the image's RGB,
    8x downsampled, through the pseudo-inverse of the latent -> RGB factors. (The tiny VAE is random: the
    factors, made for the published VAEs, would say nothing about its latents.)"""
    rgb = projection(family)
    factors, bias = torch.tensor(rgb.factors), torch.tensor(rgb.bias)
    latents = []
    for path in paths:
        pixels = np.asarray(Image.open(path).convert("RGB").resize((SIDE, SIDE)), dtype=np.float32) / 255
        small = torch.nn.functional.avg_pool2d(torch.from_numpy(pixels).permute(2, 0, 1)[None], 8)[0]
        latents.append(torch.einsum("rhw,rc->chw", small * 2 - 1 - bias.view(3, 1, 1), torch.linalg.pinv(factors)))
    return torch.stack(latents)


def hand_batch(latents: torch.Tensor, datasets: list[str], structure: torch.Tensor | None,
               loss_weight: list[float] | None = None) -> dict:
    """A batch shaped as LatentData makes it (captions encoded by the adapter)."""
    size = len(datasets)
    batch = {"latents": latents, "captions": ["shp, a shape"] * size, "original_size": [(SIDE, SIDE)] * size,
             "crop_top_left": [(0, 0)] * size, "target_size": [(SIDE, SIDE)] * size,
             "loss_weight": torch.tensor(loss_weight or [1.0] * size), "ids": [f"item{i}" for i in range(size)],
             "datasets": datasets}
    if structure is not None:
        batch["structure"] = structure
    return batch


def loaded_adapter(family: str, root: Path, **train):
    from tuneline.models.config import ModelConfig
    from tuneline.models.registry import build_adapter
    from tuneline.train.config import TrainConfig

    torch.manual_seed(0)  # the LoRA's initial draws
    adapter = build_adapter(family, ModelConfig(base=f"tiny-{family}"), TrainConfig(**train), root)
    adapter.load()
    adapter.setup_training()
    return adapter, adapter.trained_modules()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """One untrained LoRA adapter per family (its LoRA up weights start at 0)."""
    root = tmp_path_factory.mktemp("structure-adapters")
    return {family: loaded_adapter(family, root) for family in FAMILIES}


def seeded_loss(adapter, modules, batch, seed: int = 5):
    return adapter.loss(modules, batch, torch.Generator().manual_seed(seed), 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_the_lora(family, adapters):
    """The style/structure part of the loss alone (the loss with the weights minus the loss without, at the
    same draws) sends finite, non-zero gradients into the LoRA parameters."""
    adapter, modules = adapters[family]
    latents = demo_latents(family, SHAPES[:2])
    weights = torch.tensor([[1.0, 1.0, 1.0, 1.0]] * 2)
    with_terms, metrics = seeded_loss(adapter, modules, hand_batch(latents, ["shapes"] * 2, weights))
    without, _ = seeded_loss(adapter, modules, hand_batch(latents, ["shapes"] * 2, None))
    structure = with_terms - without
    assert float(structure.detach()) == pytest.approx(float(metrics["loss/structure"]), rel=1e-4)
    assert float(structure.detach()) > 0
    lora = {name: p for name, p in modules[adapter.compiled_module].named_parameters() if "lora_" in name}
    assert lora and all(p.requires_grad for p in lora.values())
    grads = torch.autograd.grad(structure, list(lora.values()), allow_unused=True)
    norms = {name: 0.0 if g is None else float(g.norm()) for name, g in zip(lora, grads)}
    assert all(np.isfinite(list(norms.values())))
    # Every up weight (lora_B) gets a gradient; the down weights see B = 0 (PEFT starts B at 0) and get none yet.
    up = {name: norm for name, norm in norms.items() if "lora_B" in name}
    assert up and all(norm > 0 for norm in up.values()), up


@pytest.mark.parametrize("family", FAMILIES)
def test_each_sample_gets_its_data_sets_weights(family, adapters):
    """Two data sets with different weights in one batch: the training loss is the diffusion loss plus, per
    sample, its data set's loss weight times the sum of its data set's weights times its terms, where each
    sample's terms come from the loss's own response to one weight of that sample alone (it is linear in
    them); the logged terms and per-data-set numbers are those sample values' means."""
    from tuneline.config import validate_params

    params = validate_params({
        "datasets": [{"name": "bright", "path": "data/raw/bright", "loss_weight": 1.0,
                      "loss": {"structure": {"light": 2.0}}},
                     {"name": "dark", "path": "data/raw/dark", "loss_weight": 0.5,
                      "loss": {"structure": {"struct": 0.0, "color": 1.0}}}],
        "train": {"loss": {"structure": {"struct": 0.5, "tex": 0.25}}}})
    resolved = {d.name: params.structure_for(d).weights for d in params.datasets}
    assert resolved == {"bright": (0.5, 2.0, 0.0, 0.25), "dark": (0.0, 0.0, 1.0, 0.25)}
    adapter, modules = adapters[family]
    names = ["bright", "dark", "bright", "dark"]
    latents = demo_latents(family, [SHAPES[0], SHAPES[1], SHAPES[3], SHAPES[4]])  # bright, dark, bright, dark
    loss_weight = [1.0 if name == "bright" else 0.5 for name in names]
    rows = torch.tensor([resolved[name] for name in names])
    with torch.no_grad():
        base, _ = seeded_loss(adapter, modules, hand_batch(latents, names, None, loss_weight))
        terms = torch.zeros(4, 4)
        for i in range(4):
            for k in range(4):
                unit = torch.zeros(4, 4)
                unit[i, k] = 1.0
                loss, _ = seeded_loss(adapter, modules, hand_batch(latents, names, unit, loss_weight))
                terms[i, k] = (loss - base) * 4 / loss_weight[i]
        loss, metrics = seeded_loss(adapter, modules, hand_batch(latents, names, rows, loss_weight))
    assert torch.all(terms > 0)
    structure = torch.tensor(loss_weight) * (rows * terms).sum(dim=1)
    assert float(loss) == pytest.approx(float(base + structure.mean()), rel=1e-5)
    # Not the weights of the other data set, nor one set of weights for the batch:
    for wrong in (rows[[1, 0, 3, 2]], rows.mean(dim=0).expand(4, 4)):
        assert float(base + (torch.tensor(loss_weight) * (wrong * terms).sum(dim=1)).mean()) != pytest.approx(
            float(loss), rel=1e-3)
    for k, term in enumerate(("struct", "light", "color", "tex")):
        assert float(metrics[f"loss/{term}"]) == pytest.approx(float(terms[:, k].mean()), rel=2e-3, abs=1e-6)
        for name, members in (("bright", [0, 2]), ("dark", [1, 3])):
            assert float(metrics[f"dataset/{name}/{term}"]) == pytest.approx(float(terms[members, k].mean()),
                                                                              rel=2e-3, abs=1e-6)
    for name, members in (("bright", [0, 2]), ("dark", [1, 3])):
        added = float(metrics[f"dataset/{name}/loss"] - metrics[f"dataset/{name}/diffusion"])
        assert added == pytest.approx(float(structure[members].mean()), rel=2e-3)
    assert float(metrics["loss/diffusion"] + metrics["loss/structure"]) == pytest.approx(float(loss), rel=1e-5)


def with_dataset_losses(project: Project, losses: list[dict | None], **train):
    """conftest's train params with datasets[i].loss set to losses[i] (None: unset)."""
    datasets = [{**dataset, **({"loss": loss} if loss is not None else {})}
                for dataset, loss in zip(project.params_data["datasets"], losses)]
    params = train_params(project, **train)
    return params.model_copy(update={"datasets": [type(params.datasets[0]).model_validate(d) for d in datasets]})


def test_the_latents_carry_each_data_sets_resolved_weights(latents_project):
    """train.loss.structure with datasets[].loss.structure overriding term by term: every training (and
    held-out) batch carries each sample's row; the data digest, and with it the run, changes with them."""
    from tuneline.stages.train.stage import latent_data

    plain = train_params(latents_project)
    params = with_dataset_losses(latents_project, [{"structure": {"light": 1.5}},
                                                   {"structure": {"struct": 0.0, "color": 0.75}}],
                                 loss={"structure": {"struct": 0.5, "tex": 0.25}})
    data = latent_data(params, latents_project.root / "data/latents")
    batch = data.batch(list(range(len(data.items))), torch.Generator().manual_seed(0), random.Random(0), "cpu")
    expected = {"alpha": (0.5, 1.5, 0.0, 0.25), "beta": (0.0, 0.0, 0.75, 0.25)}
    assert sorted(set(batch["datasets"])) == ["alpha", "beta"]
    assert batch["structure"].tolist() == [list(expected[name]) for name in batch["datasets"]]
    plain_data = latent_data(plain, latents_project.root / "data/latents")
    assert plain_data.digest() != data.digest()


# --- all weights 0: today's loss and today's run ------------------------------------------------

def todays_sdxl_loss(adapter, modules, batch, seed: int):
    """The SDXL adapter's loss as it was computed before the style/structure loss existed."""
    from tuneline.train.loss import loss_weights, per_sample_mse, snr_of

    generator = torch.Generator().manual_seed(seed)
    latents = batch["latents"]
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
    timesteps = torch.randint(0, adapter.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator)
    noisy = adapter.noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = modules["unet"](noisy, timesteps, batch["prompt_embeds"], added_cond_kwargs={
        "text_embeds": batch["pooled"], "time_ids": adapter.time_ids(batch, "cpu")}).sample
    weights = loss_weights(adapter.config.loss, snr_of(adapter.noise_scheduler.alphas_cumprod, timesteps),
                           adapter.prediction_type, 0) * batch["loss_weight"]
    return (per_sample_mse(prediction, noise) * weights).mean()


def todays_zimage_loss(adapter, modules, batch, seed: int):
    """The Z-Image adapter's loss as it was computed before the style/structure loss existed."""
    from tuneline.train.flow_matching import (flow_matching_loss, loss_weighting, noisy_latents, velocity_target,
                                              zimage_timestep, zimage_velocity)

    generator = torch.Generator().manual_seed(seed)
    latents = batch["latents"]
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
    sigmas = adapter.sigmas(latents.shape[0], tuple(latents.shape[-2:]), generator, "cpu")
    noisy = noisy_latents(latents, noise, sigmas)
    features = adapter.conditioning(batch["captions"], "cpu")
    output = modules["transformer"](list(noisy.unsqueeze(2).unbind(0)), zimage_timestep(sigmas), features,
                                    return_dict=False)[0]
    prediction = zimage_velocity(torch.stack([sample.float() for sample in output]).squeeze(2))
    return flow_matching_loss(prediction, velocity_target(latents, noise),
                              loss_weighting(adapter.config.flow_matching.loss_weighting, sigmas), batch["loss_weight"])


def test_all_zero_weights_give_todays_sdxl_loss_and_run_key(latents_project, tmp_path):
    """Weights all 0 (the default, and 0 set explicitly for a data set): batches carry no weights, the loss
    is torch.equal to the loss as computed before, and the run key, the data digest and a resume compare
    are those of a checkpoint written before the setting existed. One weight set: another run."""
    from tuneline.core.fsutil import digest_json
    from tuneline.models.config import run_key_settings
    from tuneline.train import checkpoint

    params = with_dataset_losses(latents_project, [{"structure": {"light": 0.0}}, None], loss={"min_snr_gamma": 5.0})
    assert params.datasets[0].loss is not None
    trainer = make_trainer(latents_project, tmp_path / "zero", params)
    indices = trainer.sampler.all_batches(0)[0]
    batch = trainer.data.batch(indices, torch.Generator().manual_seed(3), random.Random(3), "cpu")
    assert "structure" not in batch
    with torch.no_grad():
        loss, facts = trainer.adapter.loss(trainer.modules, batch, torch.Generator().manual_seed(11), 0)
        today = todays_sdxl_loss(trainer.adapter, trainer.modules, batch, 11)
    assert torch.equal(loss, today) and not any(key.startswith(("loss/", "dataset/")) for key in facts)

    older = params.train.model_dump(mode="json")
    older["loss"] = {key: value for key, value in older["loss"].items() if key != "structure"}
    entries = [[i.record.get("latent_key"), i.record.get("caption"), i.repeats, i.loss_weight]
               for i in trainer.data.items]
    older_digest = digest_json({"train": entries, "validation": [
        [i.record.get("latent_key"), i.record.get("caption"), i.repeats, i.loss_weight]
        for i in trainer.data.validation]}) if trainer.data.validation else digest_json(entries)
    assert trainer.data_digest == older_digest
    model = {**run_key_settings(trainer.model.settings), "identity": trainer.model.identity}
    assert trainer.run_key == checkpoint.run_key(older, model, older_digest, 1, trainer.batching)
    assert checkpoint.compare_configs(older, params.train.model_dump(mode="json")) == ([], [])

    weighted = train_params(latents_project, loss={"min_snr_gamma": 5.0, "structure": {"tex": 0.1}})
    other = make_trainer(latents_project, tmp_path / "tex", weighted)
    assert other.run_key != trainer.run_key
    safe, unsafe = checkpoint.compare_configs(older, weighted.train.model_dump(mode="json"))
    assert safe == [] and [line.split(":")[0] for line in unsafe] == ["train.loss"]


def test_all_zero_weights_give_todays_zimage_loss(adapters):
    adapter, modules = adapters["zimage"]
    batch = hand_batch(demo_latents("zimage", SHAPES[:3]), ["shapes"] * 3, None, [1.0, 0.5, 2.0])
    with torch.no_grad():
        loss, facts = seeded_loss(adapter, modules, batch, 11)
        today = todays_zimage_loss(adapter, modules, batch, 11)
    assert torch.equal(loss, today) and set(facts) == {"sigma_mean"}


# --- settings: validation, both families, tuneline check -----------------------------------------

def test_bad_weights_are_refused_naming_the_key():
    from tuneline.config import validate_params
    from tuneline.core.params import ParamsError

    for bad, message in (
            ({"train": {"loss": {"structure": {"light": -0.5}}}},
             "train.loss.structure.light: Input should be greater than or equal to 0 (got -0.5)"),
            ({"train": {"loss": {"structure": {"tex": "inf"}}}}, "train.loss.structure.tex: Input should be a finite"),
            ({"train": {"loss": {"structure": {"lite": 1.0}}}},
             "train.loss.structure.lite: unknown key. Did you mean 'light'? Allowed here: struct, light, color, tex."),
            ({"datasets": [{"name": "a", "path": "x", "loss": {"structure": {"color": -1}}}]},
             "datasets[a].loss.structure.color: Input should be greater than or equal to 0"),
            ({"datasets": [{"name": "a", "path": "x", "loss": {"structur": {}}}]},
             "datasets[a].loss.structur: unknown key. Did you mean 'structure'?")):
        data = {"datasets": [{"name": "a", "path": "x"}], **bad}
        with pytest.raises(ParamsError) as error:
            validate_params(data)
        assert message in str(error.value)


def test_both_families_take_the_weights_and_check_shows_them(latents_project, capsys, tmp_path):
    """Z-Image refuses SDXL's loss weightings but not train.loss.structure; `tuneline check` lists the weights
    each data set's samples get."""
    import yaml

    from tuneline.cli import main
    from tuneline.models.family import get_family

    zimage = get_family("zimage")
    structure = train_params(latents_project, loss={"structure": {"struct": 1.0, "light": 0.5}})
    assert zimage.unsupported_settings(structure.train) == []
    assert zimage.unsupported_settings(train_params(latents_project, loss={"min_snr_gamma": 5.0}).train)
    root = tmp_path / "project"
    shutil.copytree(latents_project.root / "data" / "raw", root / "data" / "raw")
    data = {**latents_project.params_data, "train": {"loss": {"structure": {"struct": 1.0, "light": 0.5}}}}
    data["datasets"] = [{**data["datasets"][0], "loss": {"structure": {"light": 0.0, "color": 0.3}}},
                        data["datasets"][1]]
    (root / "params.yaml").write_text(yaml.safe_dump(data), "utf-8")
    assert main(["--root", str(root), "--params", str(root / "params.yaml"), "check", "--no-memory"]) == 0
    out = capsys.readouterr().out
    assert "data set 'alpha': struct 1, light 0, color 0.3, tex 0" in out
    assert "data set 'beta': struct 1, light 0.5, color 0, tex 0" in out
    data["train"] = {}
    data["datasets"] = latents_project.params_data["datasets"]
    (root / "params.yaml").write_text(yaml.safe_dump(data), "utf-8")
    assert main(["--root", str(root), "--params", str(root / "params.yaml"), "check", "--no-memory"]) == 0
    assert "style/structure loss: off" in capsys.readouterr().out


# --- the honest effect: `light` trains the brightness of the predicted clean latent ---------------

LEVELS = (200, 400, 600, 800)


def brightness_gap(family: str, adapter, modules, latents: torch.Tensor) -> float:
    """Mean |mean L of the predicted clean latent's projection - that of the clean latent| over the images
    at fixed noise, at four noise levels (DDPM timesteps; sigma = t / 1000 for flow matching)."""
    from tuneline.train.structure_loss import latent_to_rgb, rgb_to_lab

    rgb = projection(family)
    count = latents.shape[0]
    batch = hand_batch(latents, ["shapes"] * count, torch.zeros(count, 4))  # "structure": the x0 is computed
    generator = torch.Generator().manual_seed(123)
    gaps = []
    with torch.no_grad():
        for level in LEVELS:
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.full((count,), level)
            if family == "sdxl":
                x0_pred = adapter._per_sample(modules, batch, noise, timesteps, 0)[2]
            else:
                x0_pred = adapter._prediction_and_target(modules, batch, noise, timesteps.float() / 1000)[2]
            predicted = rgb_to_lab(latent_to_rgb(x0_pred, rgb))[:, 0].mean(dim=(1, 2))
            clean = rgb_to_lab(latent_to_rgb(latents, rgb))[:, 0].mean(dim=(1, 2))
            gaps.append((predicted - clean).abs().mean())
    return float(torch.stack(gaps).mean())


def train_on_shapes(family: str, root: Path, light: float, steps: int) -> tuple[float, float]:
    """(gap before, gap after) `steps` LoRA steps (AdamW, clipping at 1 as train.max_grad_norm) on the eight
    demo shapes, a data set whose light weight is `light` (from params: train.loss.structure 0,
    datasets[shapes].loss.structure.light)."""
    from tuneline.config import validate_params

    params = validate_params({"datasets": [{"name": "shapes", "path": "data/raw/shapes",
                                            "loss": {"structure": {"light": light}}}]})
    row = torch.tensor(params.structure_for(params.datasets[0]).weights)
    adapter, modules = loaded_adapter(family, root)
    latents = demo_latents(family, SHAPES)
    before = brightness_gap(family, adapter, modules, latents)
    parameters = [p for module in modules.values() for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        chosen = torch.randperm(len(SHAPES), generator=generator)[:3]
        batch = hand_batch(latents[chosen], ["shapes"] * 3, row.expand(3, 4) if light else None)
        loss, _ = adapter.loss(modules, batch, generator, step)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
    return before, brightness_gap(family, adapter, modules, latents)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_light_weight_trains_the_brightness_towards_the_data_sets(family, tmp_path):
    """The same 100 LoRA steps from the same start with the same draws, with and without a light weight:
    with it, the predicted clean latent's brightness ends closer to each image's own (both runs move it,
    the diffusion loss pulls the same way). Measured here: 0.1106 -> 0.0980 (SDXL), 0.1084 -> 0.1016 (Z-Image);
    other training seeds gave 3-34% (SDXL) and 5-8% (Z-Image) smaller gaps: a small but steady effect on
    tiny random models."""
    before, plain = train_on_shapes(family, tmp_path, 0.0, 100)
    again, weighted = train_on_shapes(family, tmp_path, 5.0, 100)
    print(f"{family}: brightness gap {before:.4f} -> {plain:.4f} without light, {weighted:.4f} with light 5 "
          f"({weighted / plain:.3f})")
    assert again == before
    assert plain < before and weighted < 0.97 * plain, (before, plain, weighted)


def test_the_train_stage_logs_each_term_and_each_data_set(latents_project, tmp_path, capsys):
    """With weights on, the loss curve (metrics/train_loss.csv, kept with the checkpoints) and MLflow get the
    loss's parts at every logged step: the diffusion and style/structure parts, each term, and per data set
    its loss with its terms; the two parts add up to the loss. Nothing more is printed."""
    import csv
    import json

    from accelerate.state import AcceleratorState
    from mlflow import MlflowClient

    from tuneline.core.tracking.tracker import Tracker
    from tuneline.stages.train.stage import LOSS_CURVE, MLFLOW_RUN_FILE
    from tuneline.stages.train.stage import run as run_train

    root = latents_project.root
    tracking = {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "artifact_root": str(tmp_path / "art"),
                "system_metrics": False}
    params = with_dataset_losses(latents_project, [{"structure": {"light": 1.0}}, None],
                                 loss={"structure": {"struct": 0.5, "color": 0.2, "tex": 0.1}})
    params = params.model_copy(update={"tracking": params.tracking.model_copy(update=tracking)})
    AcceleratorState._reset_state(True)
    with Tracker.start(params.tracking, root, run_name="train", stage="train") as tracker:
        run_train(params, root, root / "data/latents", tmp_path / "out", tmp_path / "metrics", tracker=tracker,
                  checkpoint_dir=tmp_path / "checkpoints")
    printed = capsys.readouterr()
    assert "loss/" not in printed.out + printed.err and "dataset/" not in printed.out + printed.err
    with (tmp_path / "metrics" / LOSS_CURVE).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    terms = ("struct", "light", "color", "tex")
    assert list(rows[0]) == ["step", "loss", "lr", "loss/diffusion", "loss/structure", *(f"loss/{t}" for t in terms),
                             *(f"dataset/{d}/{part}" for d in ("alpha", "beta")
                               for part in ("loss", "diffusion", *terms))]
    assert [row["step"] for row in rows] == ["1", "2"]
    for row in rows:
        assert float(row["loss/diffusion"]) + float(row["loss/structure"]) == pytest.approx(float(row["loss"]),
                                                                                            abs=2e-6)
        assert all(float(row[f"loss/{t}"]) > 0 for t in terms)
        present = [d for d in ("alpha", "beta") if row[f"dataset/{d}/loss"]]
        assert present and all(row[f"dataset/{d}/light"] for d in present)
    (run_dir,) = [p for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()]
    run_id = json.loads((run_dir / MLFLOW_RUN_FILE).read_text())["run_id"]
    client = MlflowClient(tracking["tracking_uri"])
    # In MLflow the loss's parts have a chart section of their own, after the loss's (tracker.chart_key).
    for name in ("loss parts/structure", "loss parts/light", "timestep_mean"):
        assert [m.step for m in client.get_metric_history(run_id, name)] == [1, 2], name
    assert client.get_metric_history(run_id, "loss parts/light")[-1].value == pytest.approx(float(rows[-1]["loss/light"]),
                                                                                       abs=1e-6)
