"""train.masked_loss: the mask-weighted per-sample loss against hand computations on fixed tensors (l2 and
huber, with and without normalize and the unmasked_weight floor), an update that leaves masked-out positions
where they are, the mask carried through ingest (alpha or <stem>_mask.png), bucket (the image's own resize and
crop) and latents (area average to the latent grid), keyed apart from the crops and latents, the batch's mask
(flipped with its latent), both families' losses through tiny RANDOM adapters, the run key of the defaults and
what `tuneline check` says."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import Project, item_bytes, item_image, photo, prediction_and_target, through_latents, tiny_adapters

FAMILIES = ("sdxl", "zimage")

# One sample, one channel, 2x2: squared errors 1, 4, 9, 16 against a zero target.
PREDICTION = [[1.0, 2.0], [3.0, 4.0]]
MASK = [[1.0, 0.0], [0.5, 0.0]]


def masked(enabled=True, **settings):
    from tuneline.train.config import MaskedLossConfig

    return MaskedLossConfig(enabled=enabled, **settings)


def weights(**settings):
    from tuneline.train.loss import mask_weights

    return mask_weights({"mask": torch.tensor([[MASK]])}, masked(**settings))


def loss_of(kind: str, mask, c: float = 1.0):
    from tuneline.train.config import LossConfig
    from tuneline.train.loss import NoiseLevels, per_sample_loss

    levels = NoiseLevels(torch.tensor([500.0]), 1000, torch.tensor([1.0]))
    config = LossConfig(type=kind, huber_c=c, huber_schedule="constant")
    return float(per_sample_loss(torch.tensor([[PREDICTION]]), torch.zeros(1, 1, 2, 2), config, levels, mask)[0])


def test_masked_l2_and_huber_by_hand():
    # l2: plain 30/4; weights (1, 0, .5, 0): 5.5/4, normalized by their mean 1.5/4 -> 5.5/1.5;
    # floor .25: weights (1, .25, .5, .25): 10.5/4, normalized by 2/4 -> 10.5/2.
    assert loss_of("l2", None) == pytest.approx(7.5)
    assert loss_of("l2", weights(normalize=False)) == pytest.approx(1.375)
    assert loss_of("l2", weights()) == pytest.approx(5.5 / 1.5)
    assert loss_of("l2", weights(unmasked_weight=0.25, normalize=False)) == pytest.approx(2.625)
    assert loss_of("l2", weights(unmasked_weight=0.25)) == pytest.approx(5.25)
    assert loss_of("l2", weights(unmasked_weight=1.0)) == pytest.approx(7.5)
    # huber, c = 1: 2c(sqrt(r^2 + c^2) - c) per element, weighted the same way.
    huber = [2 * (math.sqrt(r * r + 1) - 1) for r in (1, 2, 3, 4)]
    assert loss_of("huber", weights()) == pytest.approx((huber[0] + 0.5 * huber[2]) / 1.5, rel=1e-6)
    assert loss_of("smooth_l1", weights(unmasked_weight=0.25, normalize=False), c=0.5) == pytest.approx(
        sum(w * 2 * (math.sqrt(r * r + 0.25) - 0.5) for w, r in zip((1, .25, .5, .25), (1, 2, 3, 4))) / 4, rel=1e-6)
    # All black, no floor: nothing to train on, a loss of 0 (not 0/0).
    from tuneline.train.loss import mask_weights

    black = mask_weights({"mask": torch.zeros(1, 1, 2, 2)}, masked())
    assert loss_of("l2", black) == 0.0


def test_off_or_without_a_mask_the_loss_is_the_plain_one_bit_for_bit():
    from tuneline.train.flow_matching import flow_matching_loss
    from tuneline.train.loss import MaskWeights, mask_weights, per_sample_mse

    batch = {"mask": torch.tensor([[MASK]])}
    assert mask_weights(batch, masked(enabled=False)) is None and mask_weights({}, masked()) is None
    prediction = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    target = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    plain = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    assert torch.equal(per_sample_mse(prediction, target), plain)
    # A (batch, 1, h, w) mask broadcasts over the channels; the flow-matching path takes the same weights.
    mask = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    by_hand = (((prediction - target) ** 2) * mask).mean(dim=(1, 2, 3)) / mask.mean(dim=(1, 2, 3))
    got = flow_matching_loss(prediction, target, reduce=False, mask=MaskWeights(mask, True))
    assert torch.allclose(got, by_hand, rtol=1e-6)


def test_an_update_leaves_the_masked_out_positions_where_they_are():
    """A free prediction (one parameter per latent position) after one SGD step: the positions the mask keeps
    move toward the target; with unmasked_weight 0 the masked-out ones get no gradient and stay exactly; with
    a floor of 0.5 they move half as far as full-weight ones (normalize off)."""
    from tuneline.train.loss import mask_weights, per_sample_mse

    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :, :2] = 1.0  # left half trains, right half is ignored
    target = torch.ones(1, 2, 4, 4)
    for floor in (0.0, 0.5):
        prediction = torch.zeros(1, 2, 4, 4, requires_grad=True)
        loss = per_sample_mse(prediction, target, mask_weights({"mask": mask},
                                                               masked(unmasked_weight=floor, normalize=False)))
        loss.sum().backward()
        with torch.no_grad():
            moved = -prediction.grad * 10.0
        assert torch.all(moved[..., :2] > 0)
        if floor == 0.0:
            assert torch.equal(prediction.grad[..., 2:], torch.zeros(1, 2, 4, 2))
        else:
            assert torch.allclose(moved[..., 2:], 0.5 * moved[..., :2])


def test_area_downsampling_to_the_latent_grid():
    from safetensors.numpy import load

    from tuneline.core.masks import area_downsample, latent_mask_bytes

    mask = np.zeros((16, 24), np.float32)
    mask[:8, :8] = 1.0  # one whole cell of a 2x3 grid of 8x8 cells
    mask[8:, 20:] = 1.0  # half of the bottom-right cell
    mask[0, 8] = 0.5  # one pixel at half weight in the top-middle cell
    assert area_downsample(mask, (2, 3)).tolist() == [[1.0, 0.5 / 64, 0.0], [0.0, 0.0, 0.5]]
    # A grid that does not divide the image: the box filter's average (a uniform mask stays uniform).
    assert np.allclose(area_downsample(np.full((10, 10), 0.25, np.float32), (3, 3)), 0.25)
    png = io.BytesIO()
    Image.fromarray((mask * 255).astype(np.uint8), "L").save(png, format="PNG")
    data, coverage = latent_mask_bytes(png.getvalue(), (2, 3))
    stored = load(data)["mask"]
    assert stored.shape == (1, 2, 3) and stored.dtype == np.float16
    assert np.allclose(stored[0], [[1.0, 127 / 255 / 64, 0.0], [0.0, 0.0, 0.5]], atol=1e-3)
    assert coverage == pytest.approx((1 + 127 / 255 / 64 + 0.5) / 6, rel=1e-5)


# --- the data stages ------------------------------------------------------------------------------------------

def _masked_project(root) -> Project:
    """alpha: a photo with a `<stem>_mask.png` that is its own red channel, a photo with an alpha channel and a
    plain photo; through ingest -> bucket (crops that resize and cut) -> caption -> latents (tiny SDXL VAE)."""
    project = Project(root)
    project.params_data["datasets"] = [{"name": "alpha", "path": "data/raw/alpha"}]
    project.params_data["bucket"].update(resolution=64, divisible_by=32, batch_size=1)
    project.params_data["caption"] = {"mode": "sidecar_only"}
    project.params_data["latents"] = {"flip": True}
    folder = project.raw("alpha")
    red = photo((120, 80), seed=1)
    red.save(folder / "red.png")
    red.getchannel("R").save(folder / "red_mask.png")
    seethrough = photo((80, 120), seed=2).convert("RGBA")
    alpha = np.zeros((120, 80), np.uint8)
    alpha[:, :40] = 255
    seethrough.putalpha(Image.fromarray(alpha, "L"))
    seethrough.save(folder / "see.png")
    photo((96, 96), seed=3).save(folder / "plain.png")
    return through_latents(project)


@pytest.fixture(scope="module")
def masked_project(tmp_path_factory):
    return _masked_project(tmp_path_factory.mktemp("masked"))


def _by_name(project: Project, stage_dir: str) -> dict:
    return {r["source"].split("/")[-1]: r for r in project.manifest(stage_dir)}


def test_ingest_finds_alpha_and_mask_files(masked_project):
    records = _by_name(masked_project, "data/ingested")
    assert sorted(records) == ["plain.png", "red.png", "see.png"]  # a _mask file is never an image
    assert records["red.png"]["mask"]["source"] == "file"
    assert records["red.png"]["mask"]["file"] == "data/raw/alpha/red_mask.png"
    assert records["see.png"]["mask"] == {"source": "alpha"}
    assert "mask" not in records["plain.png"]


def test_bucket_gives_the_mask_the_images_resize_and_crop(masked_project):
    folder = masked_project.root / "data/bucketed"
    records = _by_name(masked_project, "data/bucketed")
    red = records["red.png"]
    assert red["resized_size"] != red["original_size"] and red["mask_source"] == "file"
    mask = np.asarray(Image.open(io.BytesIO(item_bytes(folder, red, "mask"))), dtype=int)
    crop = np.asarray(item_image(folder, red), dtype=int)
    assert mask.shape == crop.shape[:2]
    assert np.abs(mask - crop[..., 0]).max() <= 1  # the red channel of the crop, within rounding
    see = records["see.png"]
    alpha = np.asarray(Image.open(io.BytesIO(item_bytes(folder, see, "mask"))), dtype=float)
    left = see["crop_top_left"][1]
    edge = see["resized_size"][0] / 2 - left  # the alpha's edge in crop pixels
    assert alpha[:, :int(edge) - 2].min() == 255 and alpha[:, int(edge) + 2:].max() == 0
    assert "mask" not in records["plain.png"] and "mask_key" not in records["plain.png"]


def test_latents_store_the_area_averaged_mask(masked_project):
    from safetensors.torch import load

    folder = masked_project.root / "data/latents"
    records = _by_name(masked_project, "data/latents")
    red = records["red.png"]
    stored = load(item_bytes(folder, red, "latent_mask"))["mask"].float()
    latent = load(item_bytes(folder, red, "latents"))["mean"]
    assert stored.shape == (1, *latent.shape[-2:])
    bucketed = np.asarray(Image.open(io.BytesIO(item_bytes(masked_project.root / "data/bucketed",
                                                           _by_name(masked_project, "data/bucketed")["red.png"],
                                                           "mask"))), dtype=np.float64) / 255
    h, w = stored.shape[-2:]
    cells = bucketed.reshape(h, bucketed.shape[0] // h, w, bucketed.shape[1] // w).mean(axis=(1, 3))
    assert np.allclose(stored[0].numpy(), cells, atol=1e-3)
    assert red["mask_coverage"] == pytest.approx(cells.mean(), abs=1e-4)
    assert "latent_mask" not in records["plain.png"]


def test_the_batch_carries_the_mask_flipped_with_its_latent(masked_project):
    import random

    from tuneline.train.config import TrainConfig
    from tuneline.train.data import DatasetWeights, LatentData

    folder = masked_project.root / "data/latents"
    on = TrainConfig(num_steps=1, flip=True, masked_loss={"enabled": True})
    data = LatentData(folder, on, {"alpha": DatasetWeights()}, lambda bucket: 1)
    off = LatentData(folder, TrainConfig(num_steps=1, flip=True), {"alpha": DatasetWeights()}, lambda bucket: 1)
    assert off.digest() != data.digest()  # the masks are in the data identity only with masked loss on
    index = next(i for i, item in enumerate(data.items) if item.record.get("mask_source") == "alpha")
    plain = next(i for i, item in enumerate(data.items) if "latent_mask" not in item.record)
    stored = data._mask(data.items[index], torch.zeros(data.items[index].record["latent_shape"]))
    seen = set()
    for seed in range(8):
        batch = data.batch([index], torch.Generator().manual_seed(0), random.Random(seed), "cpu")
        flipped = not torch.equal(batch["mask"][0], stored)
        if flipped:
            assert torch.equal(batch["mask"][0], stored.flip(-1))
        seen.add(flipped)
    assert seen == {True, False}
    assert torch.equal(data.batch([plain], torch.Generator(), random.Random(0), "cpu")["mask"],
                       torch.ones(1, 1, *data.items[plain].record["latent_shape"][1:]))
    assert "mask" not in off.batch([index], torch.Generator(), random.Random(0), "cpu")


def test_a_mask_edit_recomputes_that_mask_only(tmp_path):
    project = _masked_project(tmp_path)
    before = _by_name(project, "data/latents")
    mask_file = project.raw("alpha") / "red_mask.png"
    edited = np.asarray(Image.open(mask_file)).copy()
    edited[:, :60] = 0
    Image.fromarray(edited, "L").save(mask_file)
    through_latents(project)
    after = _by_name(project, "data/latents")
    reports = {stage: json.loads((project.root / "reports" / f"{stage}.json").read_text())
               for stage in ("bucket", "latents")}
    assert reports["bucket"]["computed"] == 0 and reports["bucket"]["masks_computed"] == 1
    assert reports["latents"]["computed"] == 0 and reports["latents"]["masks_computed"] == 1
    assert {name: r["latent_key"] for name, r in after.items()} == {name: r["latent_key"] for name, r in before.items()}
    assert after["red.png"]["latent_mask_key"] != before["red.png"]["latent_mask_key"]
    assert after["see.png"]["latent_mask_key"] == before["see.png"]["latent_mask_key"]
    assert after["red.png"]["mask_coverage"] < before["red.png"]["mask_coverage"]


def test_ingest_rejects_a_mask_of_another_size_and_a_mask_without_its_image(project):
    folder = project.raw("alpha")
    photo((96, 64)).save(folder / "a.png")
    Image.new("L", (64, 64), 255).save(folder / "a_mask.png")
    Image.new("L", (64, 64), 255).save(folder / "lonely_mask.png")
    project.ingest()
    assert project.manifest("data/ingested") == []
    reasons = {r["source"].split("/")[-1]: r["reason"] for r in project.rejected("data/ingested")}
    assert "a_mask.png is 64x64, the image is 96x64" in reasons["a.png"]
    assert reasons["lonely_mask.png"].startswith("mask file without an image")


# --- the trainer side ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return tiny_adapters(tmp_path_factory.mktemp("masked-adapters"), FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_both_families_weight_their_loss_by_the_mask(family, adapters, monkeypatch):
    """The adapter's per-sample loss with a batch mask is the hand-weighted mean of its squared (or huber)
    error, times the data-set weight; the plain squared error beside it stays unmasked."""
    from test_robust_loss import family_batch
    from tuneline.train.config import LossConfig

    adapter, modules = adapters[family]
    batch = family_batch(family, adapter, modules)
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, :4] = 1.0
    mask[1, :, :, 2:] = 0.5
    batch["mask"] = mask
    noise = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(2))
    steps = torch.tensor([100, 700])
    with torch.no_grad():
        prediction, target = prediction_and_target(family, adapter, modules, batch, noise, steps)
        squared = (prediction.double() - target.double()) ** 2
        for loss, floor, normalize in (("l2", 0.0, True), ("l2", 0.25, False), ("huber", 0.0, True)):
            update = {"masked_loss": masked(unmasked_weight=floor, normalize=normalize),
                      "loss": LossConfig(type=loss, huber_c=1.0, huber_schedule="constant")}
            monkeypatch.setattr(adapter, "config", adapter.config.model_copy(update=update))
            weighted, plain = adapter.per_sample_losses(modules, batch, noise, steps, 0)
            elementwise = squared if loss == "l2" else 2 * (torch.sqrt(squared + 1) - 1)
            w = mask.double().clamp(min=floor).expand_as(squared)
            want = (elementwise * w).mean(dim=(1, 2, 3))
            if normalize:
                want = want / w.mean(dim=(1, 2, 3))
            assert weighted.double().tolist() == pytest.approx((want * batch["loss_weight"].double()).tolist(),
                                                               rel=2e-5), (loss, floor, normalize)
            assert plain.double().tolist() == pytest.approx(squared.mean(dim=(1, 2, 3)).tolist(), rel=1e-5)
            monkeypatch.undo()


def test_the_run_key_of_the_default_is_the_one_before_the_setting():
    from tuneline.train import checkpoint
    from tuneline.train.config import TrainConfig

    current = TrainConfig(num_steps=10).model_dump(mode="json")
    older = {key: value for key, value in current.items() if key != "masked_loss"}

    def key(train):
        return checkpoint.run_key(train, {"base": "tiny-sdxl"}, "data", 1, {"64x64": 2})

    assert key(current) == key(older)
    assert checkpoint.compare_configs(older, current) == ([], [])
    changed = TrainConfig(num_steps=10, masked_loss={"enabled": True}).model_dump(mode="json")
    assert key(changed) != key(current)


def test_check_names_masked_loss_without_masks_and_warns_on_full_coverage(masked_project, tmp_path):
    from tuneline.core.manifest import MANIFEST, read_manifest, write_jsonl
    from tuneline.core.params import ParamsError
    from tuneline.preflight import masked_loss_problems

    on = masked_project.params(train={"masked_loss": {"enabled": True}})
    assert masked_loss_problems(on, masked_project.root) == ([], [])
    assert masked_loss_problems(masked_project.params(), masked_project.root) == ([], [])
    # No ingest yet: a warning that says what is checked later.
    bare = Project(tmp_path)
    errors, warnings = masked_loss_problems(bare.params(train={"masked_loss": {"enabled": True}}), tmp_path)
    assert errors == [] and "data/ingested does not exist yet" in warnings[0]
    # Ingested, no mask anywhere: an error naming the key.
    photo((96, 96)).save(bare.raw("alpha") / "x.png")
    bare.ingest()
    errors, _ = masked_loss_problems(bare.params(train={"masked_loss": {"enabled": True}}), tmp_path)
    assert errors and errors[0].startswith("train.masked_loss.enabled: true, but no image")
    from tuneline.preflight import preflight

    with pytest.raises(ParamsError, match="train.masked_loss.enabled"):
        preflight(bare.params(train={"masked_loss": {"enabled": True}}), tmp_path, stages=("train",))
    # Every mask white: a warning.
    latents = masked_project.root / "data/latents"
    records = read_manifest(latents)
    write_jsonl(tmp_path / MANIFEST, records)
    try:
        write_jsonl(latents / MANIFEST, [{**r, "mask_coverage": 1.0} if "mask_coverage" in r else r
                                         for r in records])
        errors, warnings = masked_loss_problems(on, masked_project.root)
        assert errors == [] and "covers the whole image" in warnings[0]
    finally:
        write_jsonl(latents / MANIFEST, records)


def test_resume_with_masked_loss_is_exact(masked_project, tmp_path):
    """Masked loss and flips on: a run stopped after step 1 and resumed ends as a straight 2-step run (the masks
    draw nothing from the random streams), and it differs from the unmasked run's weights."""
    import os
    import signal

    from conftest import make_trainer, train_params
    from resume_checks import assert_resumed_exactly, checkpoint_at
    from safetensors.torch import load_file
    from tuneline.train.trainer import StopRequested

    params = train_params(masked_project, num_steps=2, flip=True, ema={"enabled": True, "decay": 0.9},
                          checkpoint={"every_steps": 1, "keep_last": 2}, masked_loss={"enabled": True})
    straight = make_trainer(masked_project, tmp_path / "a", params)
    base = straight.trained_weights()
    straight.fit()

    def stop_at_one(state, result, seconds):
        if state.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(StopRequested):
        make_trainer(masked_project, tmp_path / "b", params).fit(on_log=stop_at_one)
    resumed = make_trainer(masked_project, tmp_path / "b", params)
    assert resumed.state.step == 1
    resumed.fit()
    assert_resumed_exactly(checkpoint_at(tmp_path / "a" / "checkpoints", 2),
                           checkpoint_at(tmp_path / "b" / "checkpoints", 2), base, resumed_at=1, ema=True)
    plain = make_trainer(masked_project, tmp_path / "c",
                         train_params(masked_project, num_steps=2, flip=True, ema={"enabled": True, "decay": 0.9},
                                      checkpoint={"every_steps": 1, "keep_last": 2}))
    plain.fit()
    masked_weights = load_file(checkpoint_at(tmp_path / "a" / "checkpoints", 2) / "trained.safetensors")
    plain_weights = load_file(checkpoint_at(tmp_path / "c" / "checkpoints", 2) / "trained.safetensors")
    assert any(not torch.equal(masked_weights[k], plain_weights[k]) for k in masked_weights)


def test_latents_make_masks_from_the_input_folder_with_an_empty_store(tmp_path):
    """A clone that pulled data/captioned (DVC) has no item store: the latents stage reads each mask's crop
    from the captioned folder's packs, as it reads the images, and makes the same latent masks."""
    import shutil

    from tuneline.stages.latents.stage import run as run_latents

    project = _masked_project(tmp_path)
    before = _by_name(project, "data/latents")
    masks = {name: item_bytes(project.root / "data/latents", before[name], "latent_mask") for name in ("red.png", "see.png")}
    shutil.rmtree(project.root / ".tuneline/store")
    report = run_latents(project.params(), project.root, project.root / "data/captioned", project.root / "data/latents")
    assert report.extra["masks_computed"] == report.extra["masks"] == 2
    after = _by_name(project, "data/latents")
    for name in ("red.png", "see.png"):
        assert after[name]["latent_mask_key"] == before[name]["latent_mask_key"]
        assert item_bytes(project.root / "data/latents", after[name], "latent_mask") == masks[name]
