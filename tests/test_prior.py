"""Prior regularization (datasets[].role: regularization, prior: class_images | prior_prediction): the prior
prediction target against the base model's own output with the adapters switched off (both families, tiny
RANDOM LoRAs on CPU), the loss split by role by hand, the latents' digest and batches, the settings `tuneline
check` refuses, and an exact resume. No learning-effect test: on the tiny random SDXL, 20-40 steps on a subject
moved the class prompt's prediction from the base model's only 6-25 % less with a prior_prediction item than
without (measured), in about 3-5 s a pair of runs: not a reliable assertion within the test budget."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from conftest import prediction_and_target, tiny_adapters
import torch

FAMILIES = ("sdxl", "zimage")
SIDE = 64  # pixels: 8x8 latents


def perturb_lora(modules: dict[str, Any], seed: int) -> None:
    """Random LoRA up weights (PEFT starts them at 0, where the adapter changes nothing to switch off)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules.values():
            for name, parameter in module.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """One tiny LoRA adapter per family, its up weights random."""
    loaded = tiny_adapters(tmp_path_factory.mktemp("prior-adapters"), FAMILIES)
    for _, modules in loaded.values():
        perturb_lora(modules, 3)
    return loaded


def encoded(adapter, modules, captions: list[str]):
    """The cached text embeddings of `captions` as a batch holds them."""
    if "unet" in modules:
        prompt_embeds, pooled = adapter.conditioning(modules, captions, "cpu")
        return {"prompt_embeds": prompt_embeds.detach(), "pooled": pooled.detach()}
    return {"prompt_embeds": [embed.detach() for embed in adapter.conditioning(captions, "cpu")]}


def family_batch(adapter, modules, latents: torch.Tensor, captions: list[str], prior: list | None) -> dict:
    """A batch shaped as LatentData makes it, with each sample's prior kind (None: no regularization data set)."""
    size = len(captions)
    batch = {"latents": latents, "captions": captions, "original_size": [(SIDE, SIDE)] * size,
             "crop_top_left": [(0, 0)] * size, "target_size": [(SIDE, SIDE)] * size,
             "loss_weight": torch.ones(size), "ids": [f"item{i}" for i in range(size)], "datasets": ["d"] * size,
             **encoded(adapter, modules, captions)}
    if prior is not None:
        batch["prior"] = prior
    return batch


def channels(family: str) -> int:
    return 4 if family == "sdxl" else 16


@pytest.mark.parametrize("family", FAMILIES)
def test_the_prior_target_is_the_base_models_prediction(family, adapters):
    """On a fixed batch, a prior_prediction sample's target is the denoiser's output with its LoRA switched off
    (diffusers' disable_adapters, an independent route), a class_images / subject sample keeps the usual target;
    after it every adapter is active and every requires_grad as before."""
    adapter, modules = adapters[family]
    denoiser = modules[adapter.compiled_module]
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(3, channels(family), 8, 8, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.tensor([150, 500, 800])
    batch = family_batch(adapter, modules, latents, ["sks dog", "a dog", "a dog"],
                         [None, "class_images", "prior_prediction"])
    flags = [p.requires_grad for p in denoiser.parameters()]
    with torch.no_grad():
        _, plain = adapter.per_sample_losses(modules, batch, noise, timesteps, 0)
        prediction, target = prediction_and_target(family, adapter, modules, batch, noise, timesteps)
        denoiser.disable_adapters()
        try:
            base, _ = prediction_and_target(family, adapter, modules, batch, noise, timesteps)
        finally:
            denoiser.enable_adapters()
    assert [p.requires_grad for p in denoiser.parameters()] == flags
    assert float((prediction - base).abs().max()) > 1e-3  # the LoRA changes the output: switching it off shows
    mse = lambda a, b: ((a.double() - b.double()) ** 2).flatten(1).mean(dim=1)  # noqa: E731
    want = torch.cat([mse(prediction, target)[:2], mse(prediction, base)[2:]])
    assert plain.double().tolist() == pytest.approx(want.tolist(), rel=1e-5)
    assert float(mse(prediction, target)[2]) != pytest.approx(float(want[2]), rel=1e-2)
    # The training loss at the adapter's own draws: the prior sample's gradient pulls the LoRA toward the base.
    loss, metrics = adapter.loss(modules, batch, torch.Generator().manual_seed(4), 0)
    loss.backward()
    lora = [p for name, p in denoiser.named_parameters() if "lora_" in name]
    assert lora and all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora)
    for p in lora:
        p.grad = None
    assert set(metrics) >= {"loss/instance", "loss/prior"}
    assert float(metrics["loss/instance"] + 2 * metrics["loss/prior"]) == pytest.approx(3 * float(loss.detach()),
                                                                                        rel=1e-5)


def test_the_trained_adapters_are_switched_off_and_a_frozen_one_stays():
    """trained_adapters_off on a tiny PEFT model with a trained and a frozen adapter: inside, the output is the
    base layer plus the frozen adapter only; after, both active and every requires_grad as before. A module
    without a trained adapter is refused (train.mode full has nothing to switch off)."""
    from peft import LoraConfig, inject_adapter_in_model

    from tuneline.train.prior import trained_adapters_off

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"], init_lora_weights=False), model)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"], init_lora_weights=False), model, adapter_name="frozen")
    layer = model[0]
    layer.set_adapter(["default", "frozen"])
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("default" in name)
    x = torch.randn(3, 4)
    base = layer.base_layer(x)
    frozen = layer.lora_B["frozen"](layer.lora_A["frozen"](x)) * layer.scaling["frozen"]
    trained = layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    assert torch.allclose(model(x), base + frozen + trained, atol=1e-6)
    with trained_adapters_off([model]):
        assert torch.allclose(model(x), base + frozen, atol=1e-6)
    assert torch.allclose(model(x), base + frozen + trained, atol=1e-6)
    assert layer.active_adapters == ["default", "frozen"]
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    with pytest.raises(ValueError, match="prior_prediction needs trained LoRA adapters"):
        with trained_adapters_off([torch.nn.Linear(2, 2)]):
            pass


def test_the_loss_split_by_hand():
    """loss/instance and loss/prior are the means of the weighted per-sample losses over each role's samples; a
    role with no sample in the batch is left out; a run without regularization logs nothing new. A batch with
    no prior_prediction sample keeps its target and never runs the extra forward."""
    from tuneline.train.prior import loss_split, with_prior_targets

    losses = torch.tensor([1.0, 2.0, 3.0, 6.0])
    split = loss_split(losses, {"prior": [None, "class_images", None, "prior_prediction"]})
    assert {k: float(v) for k, v in split.items()} == {"loss/instance": 2.0, "loss/prior": 4.0}
    # The batch mean is the two parts weighted by their counts.
    assert float(losses.mean()) == (2 * 2.0 + 2 * 4.0) / 4
    assert {k: float(v) for k, v in loss_split(losses, {"prior": [None] * 4}).items()} == {"loss/instance": 3.0}
    assert {k: float(v) for k, v in loss_split(losses, {"prior": ["class_images"] * 4}).items()} == {"loss/prior": 3.0}
    assert loss_split(losses, {}) == {}

    def never() -> Any:
        raise AssertionError("no prior_prediction sample: no extra forward")

    target = torch.ones(2, 1, 2, 2)
    assert with_prior_targets(target, {"prior": [None, "class_images"]}, [], never) is target
    assert with_prior_targets(target, {}, [], never) is target


def write_latents(root: Path, datasets: dict[str, int]) -> Path:
    """A latents manifest of `datasets` (name -> item count), all in one 64x64 bucket (no latent files: the data
    digest and the flags read the manifest only)."""
    from tuneline.core.manifest import MANIFEST, write_jsonl

    folder = root / "latents"
    folder.mkdir()
    records = [{"id": f"{name}{i}", "dataset": name, "bucket": [SIDE, SIDE], "latent_key": f"{name}-{i}",
                "caption": f"{name} {i}", "original_size": [SIDE, SIDE], "crop_top_left": [0, 0]}
               for name, count in datasets.items() for i in range(count)]
    write_jsonl(folder / MANIFEST, records)
    return folder


def test_the_data_digest_and_batches_carry_the_prior_only_when_a_data_set_regularizes(tmp_path):
    """Without a regularization data set the digest is the one runs had before (their run key and resume
    hold) and batches carry no prior kinds; with one the digest changes and each sample says its kind; a
    latents folder whose training items all regularize is refused."""
    from tuneline.core.fsutil import digest_json
    from tuneline.core.params import ParamsError
    from tuneline.train.config import TrainConfig
    from tuneline.train.data import DatasetWeights, LatentData

    folder = write_latents(tmp_path, {"subj": 2, "dogs": 2})
    train = TrainConfig(num_steps=1)

    def data(dogs: DatasetWeights) -> LatentData:
        return LatentData(folder, train, {"subj": DatasetWeights(), "dogs": dogs}, lambda bucket: 2)

    plain = data(DatasetWeights(loss_weight=0.5))
    assert not plain.regularization
    older = digest_json([[i.record["latent_key"], i.record["caption"], 1, i.loss_weight] for i in plain.items])
    assert plain.digest() == older
    regularizing = data(DatasetWeights(loss_weight=0.5, prior="prior_prediction"))
    assert regularizing.regularization and regularizing.digest() not in (older, data(
        DatasetWeights(loss_weight=0.5, prior="class_images")).digest())
    zeros = [torch.zeros(4, 8, 8)] * 4
    batch = regularizing._assemble(regularizing.items, zeros, zeros, zeros, [(0, 0)] * 4, ["c"] * 4, [], "cpu")
    assert batch["prior"] == [None, None, "prior_prediction", "prior_prediction"]
    assert batch["loss_weight"].tolist() == [1.0, 1.0, 0.5, 0.5]
    assert "prior" not in plain._assemble(plain.items, zeros, zeros, zeros, [(0, 0)] * 4, ["c"] * 4, [], "cpu")
    with pytest.raises(ParamsError, match="role: regularization"):
        LatentData(folder, train, {"dogs": DatasetWeights(prior="class_images")}, lambda bucket: 2)


def test_the_stage_weights_and_columns():
    """The train stage gives a regularization data set loss_weight x prior_loss_weight and its kind, adds the split
    to the loss curve's columns only when a data set regularizes."""
    from tuneline.config import validate_params
    from tuneline.stages.train.stage import prior_columns

    plain = validate_params({"datasets": [{"name": "subj", "path": "data/raw/subj"}]})
    assert prior_columns(plain) == []
    params = validate_params({"datasets": [
        {"name": "subj", "path": "data/raw/subj"},
        {"name": "dogs", "path": "data/raw/dogs", "role": "regularization", "loss_weight": 0.5,
         "prior_loss_weight": 0.4},
        {"name": "cats", "path": "data/raw/cats", "role": "regularization", "prior": "prior_prediction"}]})
    assert [d.prior_kind for d in params.datasets] == [None, "class_images", "prior_prediction"]
    assert prior_columns(params) == ["loss/instance", "loss/prior"]
    assert [d.loss_weight * d.prior_loss_weight for d in params.datasets] == [1.0, 0.2, 1.0]


@pytest.mark.parametrize("datasets, train, expected", [
    ([{"role": "regularisation"}], {}, "datasets[dogs].role: Input should be 'train' or 'regularization' "
                                       "(got 'regularisation')"),
    ([{"role": "regularization", "prior": "prior_guess"}], {},
     "datasets[dogs].prior: Input should be 'class_images' or 'prior_prediction' (got 'prior_guess')"),
    ([{"prior": "prior_prediction"}], {}, "datasets[dogs]: prior 'prior_prediction' applies to a regularization "
                                          "data set only; set role: regularization (allowed roles: train, "
                                          "regularization)"),
    ([{"role": "regularization", "prior": "prior_prediction"}], {"mode": "full"},
     "datasets[dogs].prior: 'prior_prediction' needs every trained module to be a LoRA"),
    ([{"role": "regularization", "prior": "prior_prediction"}], {"text_encoder_1": {"mode": "full"}},
     "train.text_encoder_1.mode is 'full'; allowed with 'full': prior 'class_images' (allowed priors: "
     "class_images, prior_prediction)"),
    ([{"role": "regularization", "prior": "class_images", "validation": "all"}, {"role": "regularization"}], {},
     "no data set trains a subject beside it; allowed roles: train, regularization"),
])
def test_bad_settings_are_refused_naming_the_key(datasets, train, expected, tmp_path, capsys):
    """`tuneline check` (load_params) names the key, the value and the allowed values."""
    import yaml

    from tuneline.cli import main

    names = ["dogs", "subj"]
    listed = [{"name": names[k], "path": f"data/raw/{names[k]}", **d} for k, d in enumerate(datasets)]
    if len(listed) == 1:
        listed.append({"name": "subj", "path": "data/raw/subj"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"datasets": listed, "train": train}))
    assert main(["--params", str(tmp_path / "params.yaml"), "check"]) == 2
    assert expected in capsys.readouterr().out


# --- training: exact resume and the learning effect ---------------------------------------------------------

class PriorLatents:
    """TrainingData of four fixed random items, two of a subject and two of a prior_prediction data set (latents
    and cached text drawn from each item's index, shaped as the adapter's example batch)."""

    text_cache = True
    kinds = [None, "prior_prediction", None, "prior_prediction"]

    def __init__(self, adapter: Any) -> None:
        self.adapter = adapter

    def digest(self) -> str:
        return "prior-latents-v1"

    def batching(self) -> dict[str, int]:
        return {"64x64": 2}

    def sample_refs(self) -> list[Any]:
        from tuneline.train.sampler import SampleRef

        return [SampleRef(index, (SIDE, SIDE)) for index in range(4)]

    def batch_size_for(self, bucket: tuple[int, int]) -> int:
        return 2

    def batch(self, indices: list[int], generator: Any, python_rng: Any, device: Any) -> dict[str, Any]:
        batch = self.adapter.example_batch(len(indices), (SIDE, SIDE), device)
        for row, index in enumerate(indices):
            drawn = torch.Generator().manual_seed(index)
            for key in ("latents", "prompt_embeds", "pooled"):
                if key in batch:
                    batch[key][row].copy_(torch.randn(batch[key][row].shape, generator=drawn))
        batch["prior"] = [self.kinds[index] for index in indices]
        return batch


def _trainer(root: Path) -> Any:
    from accelerate.state import AcceleratorState

    from tuneline.models.config import ModelConfig
    from tuneline.models.registry import build_adapter
    from tuneline.train.adapter import ModelSource
    from tuneline.train.config import TrainConfig
    from tuneline.train.trainer import Trainer

    AcceleratorState._reset_state(True)  # one process, many trainers
    model = ModelConfig(base="tiny-sdxl")
    train = TrainConfig(num_steps=2, seed=7, lr=1e-2, checkpoint={"every_steps": 1, "keep_last": 2})
    adapter = build_adapter("sdxl", model, train, root)
    trainer = Trainer(train, adapter, PriorLatents(adapter), ModelSource(model.model_dump(mode="json")),
                      root / "checkpoints")
    trainer.setup()
    return trainer


def test_resume_is_exact_with_prior_prediction(tmp_path):
    """A run whose batches hold prior_prediction samples, stopped after step 1 and resumed, ends with the weights
    and optimizer state of a straight 2-step run; the steps log the split."""
    from resume_checks import assert_resumed_exactly, checkpoint_at
    from tuneline.train.trainer import StopRequested

    straight = _trainer(tmp_path / "a")
    base = straight.trained_weights()
    logged: list[dict[str, float]] = []
    straight.fit(on_log=lambda state, result, seconds: logged.append(result.extra))
    assert logged and all({"loss/instance", "loss/prior"} <= set(extra) for extra in logged)

    def stop_at_one(state, result, seconds):
        if state.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(StopRequested):
        _trainer(tmp_path / "b").fit(on_log=stop_at_one)
    resumed = _trainer(tmp_path / "b")
    assert resumed.state.step == 1
    resumed.fit()
    assert_resumed_exactly(checkpoint_at(tmp_path / "a" / "checkpoints", 2),
                           checkpoint_at(tmp_path / "b" / "checkpoints", 2), base, resumed_at=1, ema=False)

