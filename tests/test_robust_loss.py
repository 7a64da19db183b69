"""train.loss.type (l2 | huber | smooth_l1) with its Huber threshold schedule (constant | exponential | snr):
the thresholds and the per-sample losses against hand computations on fixed tensors for DDPM timesteps and
flow-matching sigmas, l2 bit for bit as before, the settings `tuneline check` refuses, the run key of a run
that leaves them at their defaults, and both families' training and validation losses through tiny RANDOM
adapters (CPU)."""

from __future__ import annotations

import math

import pytest

from conftest import prediction_and_target, tiny_adapters
import torch

FAMILIES = ("sdxl", "zimage")
SCHEDULES = ("constant", "exponential", "snr")

# Two samples of four elements each: residuals r = prediction - target, from 0 to well past c.
RESIDUALS = [[0.0, 0.3, -1.0, 2.0], [0.5, -0.5, 0.05, -4.0]]
# DDPM: alpha_bar 0.5 at t = 250 (SNR 1, sigma 1) and 0.8 at t = 600 (sigma sqrt(0.2 / 0.8) = 0.5).
TIMESTEPS = [250, 600]
ALPHA_BARS = [0.5, 0.8]
# Flow matching: sigma 0.5 (SNR 1 again) and 0.2; c = 0.1.
FLOW_SIGMAS = [0.5, 0.2]
C = 0.1
# The thresholds by hand (c = 0.1): constant c; exponential c^(t/1000); snr (1 - c)/(1 + s)^2 + c with s = 1/sqrt(SNR).
DDPM_THRESHOLDS = {"constant": [0.1, 0.1], "exponential": [0.1 ** 0.25, 0.1 ** 0.6],
                   "snr": [0.9 / 4 + 0.1, 0.9 / 2.25 + 0.1]}  # 0.325, 0.5
FLOW_THRESHOLDS = {"constant": [0.1, 0.1], "exponential": [0.1 ** 0.5, 0.1 ** 0.2],
                   "snr": [0.1 + 0.9 * 0.25, 0.1 + 0.9 * 0.64]}  # s = sigma/(1 - sigma): 1, 0.25 -> 0.325, 0.676


def config(**loss):
    from tuneline.train.config import LossConfig

    return LossConfig(**loss)


def ddpm_levels():
    from tuneline.train.loss import ddpm_noise_levels

    alphas_cumprod = torch.linspace(0.999, 0.001, 1000)
    for t, alpha_bar in zip(TIMESTEPS, ALPHA_BARS):
        alphas_cumprod[t] = alpha_bar
    return ddpm_noise_levels(alphas_cumprod, torch.tensor(TIMESTEPS), 1000)


def fixed_pair():
    """(prediction, target) of shape (2, 2, 1, 2) whose residuals are RESIDUALS."""
    target = torch.tensor([[0.2, -0.1, 0.7, 0.0], [1.0, 0.3, -0.4, 0.25]])
    prediction = target + torch.tensor(RESIDUALS)
    return prediction.reshape(2, 2, 1, 2), target.reshape(2, 2, 1, 2)


def by_hand(kind: str, thresholds: list[float]) -> list[float]:
    """Each sample's mean of 2c(sqrt(r^2 + c^2) - c) (huber) or 2(sqrt(r^2 + c^2) - c) (smooth_l1), in float64."""
    out = []
    for row, c in zip(RESIDUALS, thresholds):
        terms = [2 * (math.sqrt(r * r + c * c) - c) * (c if kind == "huber" else 1.0) for r in row]
        out.append(sum(terms) / len(terms))
    return out


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_thresholds_by_hand(schedule):
    from tuneline.train.flow_matching import flow_noise_levels
    from tuneline.train.loss import huber_threshold

    loss = config(type="huber", huber_c=C, huber_schedule=schedule)
    ddpm = huber_threshold(loss, ddpm_levels())
    flow = huber_threshold(loss, flow_noise_levels(torch.tensor(FLOW_SIGMAS)))
    assert ddpm.dtype == flow.dtype == torch.float32
    assert ddpm.tolist() == pytest.approx(DDPM_THRESHOLDS[schedule], rel=1e-6)
    assert flow.tolist() == pytest.approx(FLOW_THRESHOLDS[schedule], rel=1e-6)


@pytest.mark.parametrize("kind", ("huber", "smooth_l1"))
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_per_sample_losses_by_hand(kind, schedule):
    """Both objectives, each schedule: the per-sample loss is the hand computation at the hand thresholds, and
    sd-scripts' own expression (conditional_loss, copied) gives the same numbers."""
    from tuneline.train.flow_matching import flow_matching_loss, flow_noise_levels
    from tuneline.train.loss import per_sample_loss

    loss = config(type=kind, huber_c=C, huber_schedule=schedule)
    prediction, target = fixed_pair()
    ddpm = per_sample_loss(prediction, target, loss, ddpm_levels())
    assert ddpm.tolist() == pytest.approx(by_hand(kind, DDPM_THRESHOLDS[schedule]), rel=1e-6)
    sigmas = torch.tensor(FLOW_SIGMAS)
    flow = per_sample_loss(prediction, target, loss, flow_noise_levels(sigmas))
    assert flow.tolist() == pytest.approx(by_hand(kind, FLOW_THRESHOLDS[schedule]), rel=1e-6)
    # kohya sd-scripts, library/train_util.py conditional_loss(..., reduction="none"), then the mean per sample.
    c = torch.tensor(DDPM_THRESHOLDS[schedule]).view(-1, 1, 1, 1)
    theirs = 2 * (torch.sqrt((prediction - target) ** 2 + c**2) - c) * (c if kind == "huber" else 1.0)
    torch.testing.assert_close(ddpm, theirs.mean(dim=(1, 2, 3)), rtol=1e-6, atol=1e-7)
    # The flow loss: the same per-sample loss times the sigma weighting and the data-set weight.
    weighting, dataset_weight = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 3.0])
    weighted = flow_matching_loss(prediction, target, weighting, dataset_weight, reduce=False, loss=loss, sigmas=sigmas)
    torch.testing.assert_close(weighted, flow * weighting * dataset_weight)
    with pytest.raises(ValueError, match="needs the sigmas"):
        flow_matching_loss(prediction, target, loss=loss)


def test_l2_is_the_squared_error_bit_for_bit():
    from tuneline.train.flow_matching import flow_matching_loss
    from tuneline.train.loss import per_sample_loss, per_sample_loss_and_mse, per_sample_mse

    generator = torch.Generator().manual_seed(0)
    prediction = torch.randn(2, 4, 5, 6, generator=generator).half()
    target = torch.randn(2, 4, 5, 6, generator=generator).half()
    levels = ddpm_levels()
    want = per_sample_mse(prediction, target)
    assert torch.equal(per_sample_loss(prediction, target, config(), levels), want)
    both = per_sample_loss_and_mse(prediction, target, config(), levels)
    assert both[0] is both[1] and torch.equal(both[0], want)
    # l2 ignores the Huber settings; the flow loss without a loss config is l2.
    ignored = config(huber_c=0.5, huber_schedule="constant")
    assert torch.equal(per_sample_loss(prediction, target, ignored, levels), want)
    weighting = torch.tensor([2.0, 0.5])
    assert torch.equal(flow_matching_loss(prediction, target, weighting, loss=config(), sigmas=weighting / 4),
                       flow_matching_loss(prediction, target, weighting))
    # Huber: the loss, and the plain squared error beside it.
    loss, squared = per_sample_loss_and_mse(prediction, target, config(type="huber"), ddpm_levels())
    assert torch.equal(squared, want) and not torch.allclose(loss, want)


def test_limits_small_residuals_and_the_clean_and_noisy_ends():
    """huber -> r^2 for |r| << c and 2c|r| - 2c^2 far out; smooth_l1 = huber / c. A residual of 1e-4 at c = 1
    keeps its digits (sd-scripts' sqrt(r^2 + c^2) - c gives 0 in fp32); r = 0 has a zero, finite gradient. The
    snr schedule is 1 at the clean end and c at pure noise (zero-terminal DDPM alpha_bar 0, flow sigma 1)."""
    from tuneline.train.flow_matching import flow_noise_levels
    from tuneline.train.loss import huber_threshold, per_sample_loss

    constant = flow_noise_levels(torch.tensor([0.5]))
    tiny, target = torch.tensor([[1e-4]]), torch.zeros(1, 1)
    huber = per_sample_loss(tiny, target, config(type="huber", huber_c=1.0, huber_schedule="constant"), constant)
    assert float(huber) == pytest.approx(1e-8, rel=1e-6)
    assert float(2 * (torch.sqrt(tiny**2 + 1.0) - 1.0)) == 0.0  # the direct form in fp32
    far = per_sample_loss(torch.tensor([[50.0]]), target, config(type="huber", huber_c=0.1, huber_schedule="constant"),
                          constant)
    assert float(far) == pytest.approx(2 * 0.1 * 50 - 2 * 0.1**2, rel=1e-4)
    smooth = per_sample_loss(torch.tensor([[50.0]]), target,
                             config(type="smooth_l1", huber_c=0.1, huber_schedule="constant"), constant)
    assert float(smooth) == pytest.approx(float(far) / 0.1, rel=1e-6)
    prediction = torch.zeros(2, 3, requires_grad=True)
    per_sample_loss(prediction, torch.zeros(2, 3), config(type="smooth_l1"), constant).sum().backward()
    assert torch.equal(prediction.grad, torch.zeros(2, 3))

    from tuneline.train.loss import ddpm_noise_levels

    snr = config(type="huber", huber_c=0.2, huber_schedule="snr")
    ends = huber_threshold(snr, flow_noise_levels(torch.tensor([0.0, 1.0])))
    assert ends.tolist() == pytest.approx([1.0, 0.2])
    zero_terminal = ddpm_noise_levels(torch.tensor([1.0, 0.0]), torch.tensor([0, 1]), 1000)
    assert huber_threshold(snr, zero_terminal).tolist() == pytest.approx([1.0, 0.2])
    exponential = huber_threshold(config(type="huber", huber_c=0.2, huber_schedule="exponential"), zero_terminal)
    assert exponential.tolist() == pytest.approx([1.0, 0.2 ** (1 / 1000)])


# --- settings: tuneline check, both families, the run key --------------------------------------------

def check_message(loss: dict) -> str:
    from tuneline.config import validate_params
    from tuneline.core.params import ParamsError

    with pytest.raises(ParamsError) as caught:
        validate_params({"datasets": [{"name": "a", "path": "x"}], "train": {"loss": loss}})
    return str(caught.value)


def test_bad_settings_are_named_with_the_allowed_values():
    from tuneline.config import validate_params
    from tuneline.models.family import FAMILIES

    assert "train.loss.type: Input should be 'l2', 'huber' or 'smooth_l1' (got 'l1')" in check_message({"type": "l1"})
    assert ("train.loss.huber_schedule: Input should be 'constant', 'exponential' or 'snr' (got 'cosine')"
            in check_message({"huber_schedule": "cosine"}))
    assert "train.loss.huber_c: Input should be greater than 0 (got 0)" in check_message({"huber_c": 0})
    grows = check_message({"type": "smooth_l1", "huber_c": 2.0, "huber_schedule": "exponential"})
    assert "train.loss: huber_c: 2.0 with huber_schedule 'exponential'" in grows
    assert "allowed: 0 < huber_c <= 1, or huber_schedule 'constant'" in grows
    # A constant threshold may exceed 1; l2 ignores the Huber settings. Both families take every setting.
    for loss in ({"type": "huber", "huber_c": 2.0, "huber_schedule": "constant"}, {"huber_c": 2.0},
                 {"type": "smooth_l1", "huber_c": 0.05, "huber_schedule": "exponential"}):
        params = validate_params({"datasets": [{"name": "a", "path": "x"}], "train": {"loss": loss}})
        for family in FAMILIES.values():
            assert family.unsupported_settings(params.train) == [], (family.name, loss)


def test_the_run_key_of_the_defaults_is_the_one_before_the_settings():
    """At their defaults the three settings are left out of the run key, and an older checkpoint's config
    (without them) compares equal; huber (or a changed threshold) is another run, named as a train.loss change."""
    from tuneline.train import checkpoint
    from tuneline.train.config import TrainConfig

    current = TrainConfig(num_steps=10).model_dump(mode="json")
    older = {**current, "loss": {key: value for key, value in current["loss"].items()
                                 if key not in ("type", "huber_c", "huber_schedule")}}

    def key(train):
        return checkpoint.run_key(train, {"base": "tiny-sdxl"}, "data", 1, {"64x64": 2})

    assert key(current) == key(older)
    assert checkpoint.compare_configs(older, current) == ([], [])
    for loss in ({"type": "huber"}, {"huber_c": 0.2}, {"huber_schedule": "constant"}):
        changed = TrainConfig(num_steps=10, loss=loss).model_dump(mode="json")
        assert key(changed) != key(current), loss
        safe, unsafe = checkpoint.compare_configs(older, changed)
        assert safe == [] and [line.split(":")[0] for line in unsafe] == ["train.loss"], loss


# --- both families, through tiny adapters --------------------------------------------------------------

@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """One untrained LoRA adapter per family (l2; the tests swap train.loss on it)."""
    return tiny_adapters(tmp_path_factory.mktemp("robust-loss"), FAMILIES)


def family_batch(family: str, adapter, modules) -> dict:
    """Two 8x8 latents with their captions encoded once, shaped as LatentData makes a batch."""
    channels = 4 if family == "sdxl" else 16
    latents = torch.randn(2, channels, 8, 8, generator=torch.Generator().manual_seed(1))
    captions = ["a red square", "a blue circle"]
    batch = {"latents": latents, "captions": captions, "original_size": [(64, 64)] * 2,
             "crop_top_left": [(0, 0)] * 2, "target_size": [(64, 64)] * 2, "loss_weight": torch.tensor([1.0, 0.5])}
    if family == "sdxl":
        batch["prompt_embeds"], batch["pooled"] = adapter.conditioning(modules, captions, "cpu")
    else:
        batch["prompt_embeds"] = adapter.conditioning(captions, "cpu")
    return batch


def thresholds_by_hand(family: str, adapter, schedule: str, timesteps: list[int]) -> list[float]:
    """c per sample from the timestep (SDXL: its scheduler's alpha_bar; Z-Image: sigma = t / 1000), in float64."""
    out = []
    for t in timesteps:
        if schedule == "constant":
            out.append(C)
        elif schedule == "exponential":
            out.append(C ** (t / (adapter.noise_scheduler.config.num_train_timesteps if family == "sdxl" else 1000)))
        else:
            if family == "sdxl":
                alpha_bar = float(adapter.noise_scheduler.alphas_cumprod[t])
                s = math.sqrt((1 - alpha_bar) / alpha_bar)
            else:
                s = (t / 1000) / (1 - t / 1000)
            out.append((1 - C) / (1 + s) ** 2 + C)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_both_families_train_and_validate_on_the_same_robust_loss(family, adapters, monkeypatch):
    """With train.loss.type huber / smooth_l1 and each schedule, the adapter's validation losses are the
    hand-computed per-sample loss times the data-set weight (the plain squared error beside it), and the
    training loss at the same draws is their mean."""
    adapter, modules = adapters[family]
    batch = family_batch(family, adapter, modules)
    timesteps = [100, 700]
    noise = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(2))
    steps = torch.tensor(timesteps)
    with torch.no_grad():
        prediction, target = prediction_and_target(family, adapter, modules, batch, noise, steps)
        residuals = (prediction.double() - target.double()).flatten(1)
        squared = (residuals**2).mean(dim=1)
        for kind, schedule in (("huber", "snr"), ("smooth_l1", "exponential"), ("huber", "constant")):
            train = adapter.config.model_copy(update={"loss": config(type=kind, huber_c=C, huber_schedule=schedule)})
            monkeypatch.setattr(adapter, "config", train)
            weighted, plain = adapter.per_sample_losses(modules, batch, noise, steps, 0)
            c = torch.tensor(thresholds_by_hand(family, adapter, schedule, timesteps), dtype=torch.float64)[:, None]
            elementwise = 2 * (torch.sqrt(residuals**2 + c**2) - c) * (c if kind == "huber" else 1.0)
            want = elementwise.mean(dim=1) * batch["loss_weight"].double()
            assert weighted.double().tolist() == pytest.approx(want.tolist(), rel=2e-5), (kind, schedule)
            assert plain.double().tolist() == pytest.approx(squared.tolist(), rel=1e-5)
            # Training: the adapter's own draws, then the validation loss at the same noise and noise levels.
            loss, _ = adapter.loss(modules, batch, torch.Generator().manual_seed(7), 0)
            generator = torch.Generator().manual_seed(7)
            drawn_noise = torch.randn(batch["latents"].shape, generator=generator)
            if family == "sdxl":
                drawn = torch.randint(0, 1000, (2,), generator=generator)
            else:
                drawn = adapter.sigmas(2, (8, 8), generator, "cpu") * 1000
            at_draws, _ = adapter.per_sample_losses(modules, batch, drawn_noise, drawn, 0)
            assert float(loss) == pytest.approx(float(at_draws.mean()), rel=1e-5), (kind, schedule)
        monkeypatch.undo()
        l2_weighted, l2_plain = adapter.per_sample_losses(modules, batch, noise, steps, 0)
    assert torch.equal(l2_plain, plain) and not torch.allclose(l2_weighted, weighted)
