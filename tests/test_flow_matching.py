"""Flow-matching math: hand-computed numbers, and the sign/timestep convention proved against the
installed diffusers' FlowMatchEulerDiscreteScheduler and ZImagePipeline (a perfect transformer
trained on our target makes the real sampler walk our straight line)."""

from __future__ import annotations

import math

import pytest
import torch

from tuneline.core.params import ParamsError, validate_model
from tuneline.train.config import FlowMatchingConfig
from tuneline.train.flow_matching import (
    ZIMAGE_OUTPUT_SIGN,
    calculate_shift,
    flow_matching_loss,
    image_seq_len,
    loss_weighting,
    noisy_latents,
    sample_density,
    sample_sigmas,
    scheduler_shift,
    static_shift,
    time_shift,
    velocity_target,
    zimage_timestep,
    zimage_velocity,
)

X0 = torch.tensor([[2.0, -1.0], [0.5, 4.0]])
NOISE = torch.tensor([[1.0, 3.0], [-2.0, 0.0]])
# Flux-like dynamic shifting, as a Z-Image/Flux scheduler config may carry it.
DYNAMIC = {"num_train_timesteps": 1000, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
           "base_image_seq_len": 256, "max_image_seq_len": 4096}


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


# --- the path and its target ---------------------------------------------------------------


def test_noisy_latents_and_target_by_hand() -> None:
    x_t = noisy_latents(X0, NOISE, torch.tensor([0.25, 0.5]))
    assert x_t.tolist() == [[1.75, 0.0], [-0.75, 2.0]]  # 0.75*x0 + 0.25*noise ; 0.5*x0 + 0.5*noise
    assert velocity_target(X0, NOISE).tolist() == [[-1.0, 4.0], [-2.5, -4.0]]
    assert noisy_latents(X0, NOISE, 0.0).tolist() == X0.tolist()
    assert noisy_latents(X0, NOISE, 1.0).tolist() == NOISE.tolist()
    images = torch.ones(2, 3, 4, 4)
    assert noisy_latents(images, torch.zeros_like(images), torch.tensor([0.25, 1.0]))[:, 0, 0, 0].tolist() == [0.75, 0.0]
    with pytest.raises(ValueError, match=r"sigmas must have shape \(2,\)"):
        noisy_latents(X0, NOISE, torch.tensor([0.1, 0.2, 0.3]))


def test_zimage_timestep_and_sign() -> None:
    assert zimage_timestep(torch.tensor([1.0, 0.75, 0.0])).tolist() == [0.0, 0.25, 1.0]
    assert ZIMAGE_OUTPUT_SIGN == -1.0
    assert zimage_velocity(X0 - NOISE).tolist() == velocity_target(X0, NOISE).tolist()


def test_scale_noise_is_noisy_latents(diffusers) -> None:
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    x0, noise = torch.randn(3, 4, 2, 2, generator=generator(1)), torch.randn(3, 4, 2, 2, generator=generator(2))
    steps = torch.tensor([0, 500, 900])
    expected = scheduler.scale_noise(x0, scheduler.timesteps[steps], noise)
    torch.testing.assert_close(noisy_latents(x0, noise, scheduler.sigmas[steps]), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("config", [{"shift": 3.0}, DYNAMIC], ids=["static", "dynamic"])
def test_one_euler_step_from_our_target_stays_on_the_line(diffusers, config) -> None:
    """What ZImagePipeline does per step (-output into scheduler.step) with a transformer that
    outputs our velocity times ZIMAGE_OUTPUT_SIGN lands on our x_t at the next sigma."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**config)
    scheduler.set_timesteps(sigmas=torch.linspace(1.0, 0.25, 4).tolist(), mu=0.8)
    x0, noise = torch.randn(2, 4, 3, 3, generator=generator(3)), torch.randn(2, 4, 3, 3, generator=generator(4))
    for index, t in enumerate(scheduler.timesteps):
        sigma, sigma_next = scheduler.sigmas[index], scheduler.sigmas[index + 1]
        x_t = noisy_latents(x0, noise, sigma)
        transformer_output = ZIMAGE_OUTPUT_SIGN * velocity_target(x0, noise)  # a perfect Z-Image transformer
        stepped = scheduler.step(-transformer_output, t, x_t, return_dict=False)[0]  # pipeline_z_image.py 568-571
        torch.testing.assert_close(stepped, noisy_latents(x0, noise, sigma_next), rtol=0, atol=1e-5)
    # A transformer trained on the velocity without the sign walks away from the data.
    scheduler.set_timesteps(sigmas=[1.0, 0.5], mu=0.8)
    wrong = scheduler.step(-velocity_target(x0, noise), scheduler.timesteps[0], noise, return_dict=False)[0]
    assert (wrong - noisy_latents(x0, noise, scheduler.sigmas[1])).abs().max() > 0.5


class OracleTransformer(torch.nn.Module):
    """Stands in for ZImageTransformer2DModel: a perfect model for one (x0, noise) pair, which
    records the latents and times the pipeline feeds it."""

    in_channels = 4

    def __init__(self, x0: torch.Tensor, noise: torch.Tensor) -> None:
        super().__init__()
        self.x0, self.noise = x0, noise
        self.inputs: list[torch.Tensor] = []
        self.times: list[torch.Tensor] = []

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, latents, t, cap_feats, joint_attention_kwargs=None, return_dict=True):
        self.inputs.append(torch.stack(latents).squeeze(2))
        self.times.append(t.clone())
        output = ZIMAGE_OUTPUT_SIGN * velocity_target(self.x0, self.noise)
        return (list(output.unsqueeze(2).unbind(0)),)


@pytest.mark.parametrize("config", [{"shift": 3.0}, DYNAMIC], ids=["static", "dynamic"])
def test_zimage_pipeline_follows_our_path(diffusers, config) -> None:
    """The real ZImagePipeline.__call__ with a perfect transformer: the time it feeds is
    zimage_timestep(sigma), its latents at each step are our noisy_latents at the sigma that
    scheduler_shift gives for this resolution, and it ends on x0."""
    latent_size = (16, 8)  # 128x64 pixels, VAE x8
    x0 = torch.randn(1, 4, *latent_size, generator=generator(5))
    noise = torch.randn(1, 4, *latent_size, generator=generator(6))
    transformer = OracleTransformer(x0, noise)
    pipe = diffusers.ZImagePipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**config), vae=None,
                                    text_encoder=None, tokenizer=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt_embeds=[torch.zeros(3, 8)], guidance_scale=0.0, height=128, width=64, num_inference_steps=4,
               latents=noise.clone(), output_type="latent").images

    sigmas = scheduler_shift(torch.linspace(1.0, 0.25, 4), dict(pipe.scheduler.config), latent_size)
    torch.testing.assert_close(pipe.scheduler.sigmas[:-1], sigmas, rtol=0, atol=1e-6)
    assert torch.cat(transformer.times).tolist() == zimage_timestep(pipe.scheduler.sigmas[:-1]).tolist()
    for seen, sigma in zip(transformer.inputs, sigmas):
        torch.testing.assert_close(seen, noisy_latents(x0, noise, sigma.expand(1)), rtol=0, atol=1e-5)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)


# --- shifts --------------------------------------------------------------------------------


def test_calculate_shift_and_time_shift_by_hand(diffusers) -> None:
    assert calculate_shift(256) == pytest.approx(0.5)
    assert calculate_shift(4096) == pytest.approx(1.15)
    assert calculate_shift(2176) == pytest.approx(0.825)  # half way
    assert calculate_shift(1024, 256, 4096, 0.5, 1.15) == pytest.approx(0.5 + 0.65 * 768 / 3840)
    assert image_seq_len((128, 128)) == 4096 and image_seq_len((16, 9)) == 32  # 1024px; odd sides floor
    from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift as pipeline_calculate_shift

    for tokens in (64, 256, 1024, 4096, 9000):
        assert calculate_shift(tokens) == pipeline_calculate_shift(tokens)

    t = torch.tensor([0.25, 0.5, 1.0])
    assert time_shift(math.log(3), t).tolist() == pytest.approx([0.5, 0.75, 1.0])  # 3/(3+3), 3/(3+1)
    assert time_shift(2.0, t, kind="linear").tolist() == pytest.approx([0.4, 2 / 3, 1.0])  # 2/(2+3), 2/(2+1)
    assert time_shift(0.7, torch.tensor([0.0])).tolist() == [0.0]
    # exp(mu) = s with exponent 1 is the static shift s.
    torch.testing.assert_close(time_shift(math.log(3), t), static_shift(t, 3.0))
    assert static_shift(torch.tensor([0.5]), 3.0).tolist() == [0.75]


@pytest.mark.parametrize(
    "config",
    [{"shift": 3.0}, {}, DYNAMIC, {**DYNAMIC, "time_shift_type": "linear"}, {**DYNAMIC, "max_shift": 2.0}],
    ids=["static3", "default", "dynamic", "linear", "max2"],
)
def test_scheduler_shift_matches_set_timesteps(diffusers, config) -> None:
    from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift as pipeline_calculate_shift

    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**config)
    latent_size = (64, 96)
    get = scheduler.config.get  # mu as pipeline_z_image.py lines 471-480 compute it
    mu = pipeline_calculate_shift((64 // 2) * (96 // 2), get("base_image_seq_len", 256),
                                  get("max_image_seq_len", 4096), get("base_shift", 0.5), get("max_shift", 1.15))
    base = torch.linspace(1.0, 0.05, 20)
    scheduler.set_timesteps(sigmas=base.tolist(), mu=mu)  # what ZImagePipeline calls
    torch.testing.assert_close(scheduler_shift(base, dict(scheduler.config), latent_size), scheduler.sigmas[:-1],
                               rtol=0, atol=1e-6)


def test_auto_shift_depends_on_resolution() -> None:
    small = sample_sigmas(8, "uniform", generator(), shift="auto", scheduler_config=DYNAMIC, latent_size=(32, 32))
    large = sample_sigmas(8, "uniform", generator(), shift="auto", scheduler_config=DYNAMIC, latent_size=(128, 128))
    drawn = sample_density("uniform", 8, generator())
    torch.testing.assert_close(small, time_shift(calculate_shift(256), drawn))  # base_image_seq_len: mu 0.5
    torch.testing.assert_close(large, time_shift(1.15, drawn))
    assert bool((large > small).all())  # more tokens, more noise
    static = sample_sigmas(8, "uniform", generator(), shift="auto", scheduler_config={"shift": 3.0},
                           latent_size=(128, 128))
    torch.testing.assert_close(static, static_shift(drawn, 3.0))
    with pytest.raises(ValueError, match="needs the scheduler_config and the latent_size"):
        sample_sigmas(8, shift="auto")
    with pytest.raises(ValueError, match="shift must be 'auto'"):
        sample_sigmas(8, shift="atuo")


# --- sigma sampling ------------------------------------------------------------------------


def test_logit_normal_statistics() -> None:
    sigmas = sample_sigmas(20000, "logit_normal", generator(7), logit_mean=0.5, logit_std=0.8)
    logits = torch.logit(sigmas.double())
    assert float(logits.mean()) == pytest.approx(0.5, abs=0.02)
    assert float(logits.std()) == pytest.approx(0.8, abs=0.02)
    assert float(sigmas.mean()) > 0.55  # logit_mean > 0 leans towards noise


def test_uniform_and_mode() -> None:
    uniform = sample_sigmas(20000, "uniform", generator(8))
    assert 0.0 <= float(uniform.min()) and float(uniform.max()) < 1.0
    assert float(uniform.mean()) == pytest.approx(0.5, abs=0.01)
    mode = sample_sigmas(20000, "mode", generator(9), mode_scale=1.29)
    u = torch.rand(20000, generator=generator(9))
    torch.testing.assert_close(mode, 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u))
    assert float(mode.mean()) == pytest.approx(0.5, abs=0.01)  # symmetric about 0.5
    middle = float(((mode > 0.25) & (mode < 0.75)).float().mean())
    assert middle > 0.6  # uniform would put 0.5 there
    torch.testing.assert_close(sample_sigmas(5, "mode", generator(9), shift=3.0),
                               static_shift(sample_density("mode", 5, generator(9)), 3.0))
    with pytest.raises(ValueError, match="allowed: uniform, logit_normal, mode"):
        sample_sigmas(4, "lognorm")


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode"])
def test_same_draws_as_diffusers(diffusers, scheme) -> None:
    from diffusers.training_utils import compute_density_for_timestep_sampling

    theirs = compute_density_for_timestep_sampling(scheme, 64, logit_mean=0.3, logit_std=1.2, mode_scale=1.29,
                                                   generator=generator(11))
    ours = sample_sigmas(64, scheme, generator(11), logit_mean=0.3, logit_std=1.2, mode_scale=1.29)
    assert torch.equal(ours, theirs)


# --- loss ----------------------------------------------------------------------------------


def test_loss_weighting_by_hand_and_as_diffusers(diffusers) -> None:
    sigmas = torch.tensor([0.5, 0.25, 0.9])
    assert loss_weighting("none", sigmas).tolist() == [1.0, 1.0, 1.0]
    assert loss_weighting("sigma_sqrt", sigmas).tolist() == pytest.approx([4.0, 16.0, 1 / 0.81])
    assert loss_weighting("cosmap", sigmas).tolist() == pytest.approx(
        [4 / math.pi, 2 / (math.pi * 0.625), 2 / (math.pi * (1 - 1.8 + 1.62))])
    with pytest.raises(ValueError, match="allowed: none, sigma_sqrt, cosmap"):
        loss_weighting("cos_map", sigmas)
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    drawn = sample_sigmas(32, "logit_normal", generator(12))
    for scheme in ("none", "sigma_sqrt", "cosmap"):
        assert torch.equal(loss_weighting(scheme, drawn), compute_loss_weighting_for_sd3(scheme, drawn))


def test_flow_matching_loss_by_hand() -> None:
    prediction = torch.zeros(2, 2, 1, 1)
    target = torch.tensor([[1.0, 1.0], [2.0, 0.0]]).reshape(2, 2, 1, 1)  # per-sample MSE: 1, 2
    weighting, dataset_weight = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 0.5])
    assert flow_matching_loss(prediction, target).item() == 1.5
    assert flow_matching_loss(prediction, target, weighting, dataset_weight, reduce=False).tolist() == [2.0, 1.0]
    assert flow_matching_loss(prediction, target, weighting, dataset_weight).item() == 1.5
    assert flow_matching_loss(prediction.half(), target.half(), weighting).dtype == torch.float32
    # diffusers' SD3/Flux scripts: mean over (weighting * err^2) per sample, then over the batch.
    pred, tgt = torch.randn(3, 4, 5, 5, generator=generator(13)), torch.randn(3, 4, 5, 5, generator=generator(14))
    w = loss_weighting("cosmap", torch.tensor([0.2, 0.5, 0.7]))
    theirs = torch.mean((w.reshape(3, 1, 1, 1) * (pred - tgt) ** 2).reshape(3, -1), 1).mean()
    torch.testing.assert_close(flow_matching_loss(pred, tgt, w), theirs)


# --- settings ------------------------------------------------------------------------------


def test_flow_matching_config() -> None:
    config = FlowMatchingConfig()
    assert (config.timestep_sampling, config.shift, config.loss_weighting) == ("logit_normal", "auto", "none")
    assert FlowMatchingConfig(shift="3").shift == 3.0  # YAML may give numbers as strings
    assert FlowMatchingConfig(shift=3).shift == 3.0

    def error_of(data) -> str:
        with pytest.raises(ParamsError) as caught:
            validate_model(FlowMatchingConfig, data, "params.yaml")
        return str(caught.value)

    message = error_of({"timestep_sampling": "logit-normal", "loss_weighting": "cos_map", "shift": "atuo"})
    assert "timestep_sampling: Input should be 'uniform', 'logit_normal' or 'mode' (got 'logit-normal')" in message
    assert "loss_weighting: Input should be 'none', 'sigma_sqrt' or 'cosmap' (got 'cos_map')" in message
    assert "shift: expected 'auto'" in message and "or a number > 0 (got 'atuo')" in message
    assert "shift: expected 'auto'" in error_of({"shift": 0})
    assert "shift: expected 'auto'" in error_of({"shift": True})
    assert "logit_std" in error_of({"logit_std": 0})
    assert "Did you mean 'mode_scale'?" in error_of({"mode_scal": 1.0})
