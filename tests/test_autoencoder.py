"""Stage autoencoder on the tiny RANDOM VAE: two optimization units on the trainer core."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import Project, save_photo
from resume_checks import AUTOENCODER_KINDS, assert_resumed_exactly


@pytest.fixture(scope="module")
def bucket_project(tmp_path_factory):
    os.environ.setdefault("TUNELINE_HOME", str(tmp_path_factory.getbasetemp() / "tuneline-home"))
    root = tmp_path_factory.mktemp("ae-project")
    project = Project(root)
    project.params_data["bucket"].update(resolution=64, divisible_by=32, batch_size=2)
    for i in range(3):
        save_photo(project.raw("alpha") / f"a{i}.png", (64, 64), seed=i)
        save_photo(project.raw("beta") / f"b{i}.png", (64, 64), seed=10 + i)
    params = project.params()
    project.ingest(params)
    project.bucket(params)
    return project


def ae_params(project: Project, **settings):
    from tuneline.config import validate_params

    section = {"enabled": True, "crop_size": 32, "batch_size": 2, "num_steps": 4, "seed": 3, "lr": 1e-3,
               "checkpoint": {"every_steps": 2, "keep_last": 3},
               "discriminator": {"start": 0, "every": 1, "channels": 8, "layers": 2, "lr": 1e-3}}
    for key, value in settings.items():
        section[key] = {**section[key], **value} if isinstance(value, dict) and key in section else value
    return validate_params({**project.params_data, "autoencoder": section})


def make_ae_trainer(project: Project, run: Path, params):
    from accelerate.state import AcceleratorState

    from tuneline.stages.autoencoder.data import ImageData
    from tuneline.stages.autoencoder.stage import build_trainer

    AcceleratorState._reset_state(True)
    trainer = build_trainer(params, project.root, ImageData(params, project.root / "data/bucketed"),
                            run / "checkpoints")
    trainer.setup()
    return trainer


def test_registry_finds_both_families():
    from tuneline.models.autoencoder.adapter import AutoencoderAdapter
    from tuneline.models.registry import adapter_class
    from tuneline.models.sdxl.adapter import SDXLAdapter

    assert adapter_class("sdxl") is SDXLAdapter and adapter_class("autoencoder_kl") is AutoencoderAdapter
    with pytest.raises(KeyError, match="autoencoder_kl, autoencoder_vq, sdxl"):
        adapter_class("flux")


def test_discriminator_steps_only_after_start_and_every_nth(bucket_project, tmp_path):
    trainer = make_ae_trainer(bucket_project, tmp_path, ae_params(
        bucket_project, num_steps=8, discriminator={"start": 2, "every": 3}, checkpoint={"every_steps": 100}))
    disc = trainer.modules["discriminator"]
    decoder = trainer.modules["vae"].decoder.conv_out.weight
    encoder = trainer.modules["vae"].encoder.conv_in.weight.detach().clone()
    changed, decoder_changed, logged = [], [], []
    for _ in range(8):
        before = [p.detach().clone() for p in disc.parameters()]
        decoder_before = decoder.detach().clone()
        result = trainer.train_step(trainer.next_batches())
        changed.append(not all(torch.equal(a, b) for a, b in zip(before, disc.parameters())))
        decoder_changed.append(not torch.equal(decoder_before, decoder))
        logged.append(result.unit_numbers() | result.extra)
    steps = [s for s, c in zip(range(1, 9), changed) if c]
    assert steps == [3, 6]  # s > disc_start (2) and s % disc_every (3) == 0
    assert all(decoder_changed)
    assert torch.equal(encoder, trainer.modules["vae"].encoder.conv_in.weight)  # mode decoder: encoder frozen
    assert [row["discriminator/stepped"] for row in logged] == [float(s in (3, 6)) for s in range(1, 9)]
    assert all("discriminator/grad_norm" in row for s, row in zip(range(1, 9), logged) if s in (3, 6))
    assert [row["adaptive_weight"] > 0 for row in logged] == [False, False] + [True] * 6
    assert all(row["disc_start"] == 2 and row["disc_every"] == 3 and "autoencoder/grad_norm" in row for row in logged)


def test_adaptive_weight_equals_the_hand_computed_ratio(bucket_project, tmp_path):
    from tuneline.models.autoencoder.adapter import adaptive_weight

    trainer = make_ae_trainer(bucket_project, tmp_path, ae_params(bucket_project))
    vae, disc = trainer.modules["vae"], trainer.modules["discriminator"]
    batch = trainer.data.batch([0, 1], torch.Generator().manual_seed(0), __import__("random").Random(0), "cpu")
    x = batch["pixels"]
    last = vae.decoder.conv_out.weight

    def losses():
        reconstruction = vae.decode(vae.encode(x).latent_dist.mode()).sample
        return (reconstruction - x).abs().mean(), -disc(reconstruction).mean()

    nll, gan = losses()
    weight = adaptive_weight(nll, gan, last, 0.5)
    # By hand: two separate backward passes, the gradients read off the layer.
    vae.zero_grad(set_to_none=True)
    losses()[0].backward()
    nll_norm = last.grad.norm().item()
    vae.zero_grad(set_to_none=True)
    disc.zero_grad(set_to_none=True)
    losses()[1].backward()
    gan_norm = last.grad.norm().item()
    assert gan_norm > 0 and nll_norm > 0
    assert weight.item() == pytest.approx(0.5 * nll_norm / (gan_norm + 1e-4), rel=1e-5)


def test_kl_term_is_on_ldm_scale(bucket_project, tmp_path):
    """kl_weight means what it means in LDM's config (1e-6): the KL summed over the latent against the
    reconstruction summed over the pixels, per image; with a per-pixel mean reconstruction the KL is
    divided by the pixels (not 3*H*W times too strong: at 256 px crops 1e-6 would act like 0.2)."""
    trainer = make_ae_trainer(bucket_project, tmp_path, ae_params(
        bucket_project, mode="full", kl_weight=0.5, discriminator={"start": 100}))
    batch = trainer.data.batch([0, 1], torch.Generator().manual_seed(0), __import__("random").Random(0), "cpu")
    losses, extra = trainer.adapter.unit_losses(trainer.modules, batch, torch.Generator().manual_seed(1), 0,
                                                ["autoencoder"])
    x = batch["pixels"]
    by_hand = trainer.modules["vae"].encode(x).latent_dist.kl().mean() / (3 * x.shape[2] * x.shape[3])
    assert extra["kl"].item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert losses["autoencoder"].item() == pytest.approx((extra["reconstruction"] + 0.5 * extra["kl"]).item(),
                                                         rel=1e-5)


@pytest.mark.parametrize("kind", AUTOENCODER_KINDS)
def test_resume_is_exact_with_both_optimizers(bucket_project, tmp_path, kind):
    from tuneline.train.trainer import StopRequested

    settings = {"num_steps": 4, "ema": {"enabled": True, "decay": 0.9},
                "discriminator": {"start": 1, "every": 1}, "schedule": {"name": "cosine", "warmup_steps": 1},
                **AUTOENCODER_KINDS[kind]}
    straight = make_ae_trainer(bucket_project, tmp_path / "a", ae_params(bucket_project, **settings))
    base = straight.trained_weights()
    straight.fit()

    def stop_at_two(state, result, seconds):
        if state.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    halves = make_ae_trainer(bucket_project, tmp_path / "b", ae_params(bucket_project, **settings))
    with pytest.raises(StopRequested):
        halves.fit(on_log=stop_at_two)
    resumed = make_ae_trainer(bucket_project, tmp_path / "b", ae_params(bucket_project, **settings))
    assert resumed.state.step == 2
    assert any("step_000002 at step 2" in m for m in resumed.messages)
    resumed.fit()
    [a] = (tmp_path / "a/checkpoints").glob("*/step_000004")
    [b] = (tmp_path / "b/checkpoints").glob("*/step_000004")
    wa, wb = load_file(a / "trained.safetensors"), load_file(b / "trained.safetensors")
    assert any(k.startswith("discriminator.") for k in wa) and any(k.startswith("vae.decoder.") for k in wa)
    assert any(k.startswith("vae.encoder.") for k in wa) == (kind == "vq")  # kl: decoder mode; vq: full
    assert not any(k.startswith("vae.quantize.") for k in wa)  # the codebook: in no optimizer, not "trained"
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ta, tb = (torch.load(f / "training.pt", weights_only=True) for f in (a, b))
    assert set(ta["units"]) == {"autoencoder", "discriminator"}
    # Equal key sets, not empty, key by key (EMA too), moved from the base, resumed at step 2.
    assert_resumed_exactly(a, b, base, resumed_at=2, ema=True)
    assert not any(k.startswith("discriminator.") for k in ta["ema"]["shadow"])
    assert {k.split(".")[0] for k in ta["ema"]["shadow"]} == {"vae"}
    if kind == "vq":  # the codebook and its EMA statistics resumed (assert_resumed_exactly compared them)
        from tuneline.train.checkpoint import ADAPTER_STATE_FILE

        state = load_file(a / ADAPTER_STATE_FILE)
        assert set(state) == {"vae.quantize.embedding.weight", "codebook_ema.cluster_size",
                              "codebook_ema.embed_avg", "codebook_ema.last_used"}
        assert state["codebook_ema.cluster_size"].sum() > 0 and int(state["codebook_ema.last_used"].max()) == 4
    else:
        assert not (a / "adapter_state.safetensors").exists()


@pytest.fixture(scope="module")
def demo_bucket_project(tmp_path_factory):
    """The repository's demo data (data/raw: shapes and stripes), ingested and bucketed at 64 px."""
    import shutil

    os.environ.setdefault("TUNELINE_HOME", str(tmp_path_factory.getbasetemp() / "tuneline-home"))
    root = tmp_path_factory.mktemp("ae-demo")
    project = Project(root)
    project.params_data["datasets"] = [{"name": name, "path": f"data/raw/{name}"} for name in ("shapes", "stripes")]
    project.params_data["bucket"].update(resolution=64, divisible_by=32, batch_size=2)
    for name in ("shapes", "stripes"):
        shutil.copytree(Path(__file__).resolve().parents[1] / "data/raw" / name, project.raw(name), dirs_exist_ok=True)
    params = project.params()
    project.ingest(params)
    project.bucket(params)
    return project


def test_stage_learns_writes_a_vae_and_metrics(demo_bucket_project, tmp_path):
    """On the demo data the tiny VAE's held-out PSNR rises by >= 1 dB (issue 16); the output loads in diffusers.

    Full mode: the tiny VAE is random, so in decoder mode the frozen encoder's latents are mostly
    posterior noise (std ~1.06 against ~0.25 for the means) and 300 decoder steps gain ~0.3 dB;
    training the encoder too gains ~2 dB (measured 8.52 -> 10.63 with the GAN on from step 200).
    """
    import json

    from diffusers import AutoencoderKL

    from tuneline.stages.autoencoder.stage import run

    torch.set_num_threads(1)  # the budget: about 30 s on one core
    project = demo_bucket_project
    params = ae_params(project, mode="full", num_steps=300, eval_every=100, lr=2e-3, batch_size=4,
                       ema={"enabled": True, "decay": 0.9}, discriminator={"start": 200, "every": 2},
                       checkpoint={"every_steps": 1000})
    out = tmp_path / "models/autoencoder"
    report = run(params, project.root, project.root / "data/bucketed", out, tmp_path / "metrics",
                 checkpoint_dir=tmp_path / "checkpoints")
    metrics = json.loads((tmp_path / "metrics/autoencoder.json").read_text())
    assert metrics["steps"] == 300
    assert metrics["psnr"] - metrics["psnr_base"] >= 1.0, metrics
    assert report.extra["psnr"] == metrics["psnr"] and report.extra["psnr_base"] == metrics["psnr_base"]
    history = report.extra["history"]
    assert [row["step"] for row in history] == [100, 200, 300]
    assert history[-1]["psnr"] > history[0]["psnr"] > metrics["psnr_base"]
    final = metrics.get("final", metrics)  # per data set: psnr/<data set>, ssim/<data set>
    assert set(final) >= {"psnr/shapes", "psnr/stripes", "ssim/shapes", "ssim/stripes"}
    assert AutoencoderKL.from_pretrained(out).config.latent_channels == 4
    assert set(report.extra["sheets"]) == {"shapes", "stripes"}
    assert (out / "sheets/shapes.png").is_file() and (out / "sheets/stripes.png").is_file()
    assert any("perceptual is none" in w for w in report.warnings)


def test_disabled_stage_is_a_recorded_no_op(bucket_project, tmp_path):
    import json

    from tuneline.stages.autoencoder.stage import is_trained, run

    report = run(bucket_project.params(), bucket_project.root, bucket_project.root / "data/bucketed",
                 tmp_path / "out", tmp_path / "metrics")
    assert not is_trained(tmp_path / "out") and json.loads((tmp_path / "metrics/autoencoder.json").read_text())[
        "enabled"] == 0
    assert any("enabled is false" in w for w in report.warnings)
