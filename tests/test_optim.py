"""Optimizers: construction per name, availability checks, and bit-exact resume through a file."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from tuneline.train.config import OptimizerConfig
from tuneline.train.optim import OptimizerUnavailable, build_optimizer, check_optimizer_available

RESUMABLE = ["adamw", "lion", "adafactor", "prodigy"]


def tiny_model(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))


def groups(model: torch.nn.Sequential, lr: float, second_lr: float | None = None) -> list[dict]:
    # Two groups, as the trainer builds them (UNet + a text encoder); Prodigy needs equal rates.
    return [
        {"params": list(model[0].parameters()), "lr": lr, "name": "unet"},
        {"params": list(model[1].parameters()), "lr": lr if second_lr is None else second_lr, "name": "text_encoder_1"},
    ]


def lr_for(name: str) -> float:
    return 1.0 if name == "prodigy" else 1e-2


def second_lr_for(name: str) -> float:
    return 1.0 if name == "prodigy" else 5e-3


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        # The batch depends on the step only, so a resumed run sees the same data.
        generator = torch.Generator().manual_seed(1000 + step)
        inputs = torch.randn(5, 4, generator=generator)
        target = torch.randn(5, 3, generator=generator)
        loss = torch.nn.functional.mse_loss(model(inputs), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("name", RESUMABLE)
def test_resume_through_file_is_bit_exact(name: str, tmp_path: Path) -> None:
    config = OptimizerConfig(name=name, weight_decay=0.05)
    straight = tiny_model(0)
    train(straight, build_optimizer(config, groups(straight, lr_for(name), second_lr_for(name))), range(6))

    first = tiny_model(0)
    optimizer = build_optimizer(config, groups(first, lr_for(name), second_lr_for(name)))
    train(first, optimizer, range(3))
    torch.save({"model": first.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "ckpt.pt")

    # A different init proves the weights come from the checkpoint; default torch.load is weights_only.
    resumed = tiny_model(123)
    checkpoint = torch.load(tmp_path / "ckpt.pt")
    resumed.load_state_dict(checkpoint["model"])
    optimizer = build_optimizer(config, groups(resumed, lr_for(name), second_lr_for(name)))
    optimizer.load_state_dict(checkpoint["optimizer"])
    train(resumed, optimizer, range(3, 6))

    for (key, want), got in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(want, got), f"{name}: {key} differs after resume"
    # The optimizer really moved the weights.
    assert not torch.equal(straight[0].weight, tiny_model(0)[0].weight)


@pytest.mark.parametrize("name", RESUMABLE)
def test_groups_keep_name_and_lr(name: str) -> None:
    model = tiny_model(0)
    optimizer = build_optimizer(OptimizerConfig(name=name), groups(model, lr_for(name), second_lr_for(name)))
    assert [group["name"] for group in optimizer.param_groups] == ["unet", "text_encoder_1"]
    assert [group["lr"] for group in optimizer.param_groups] == [lr_for(name), second_lr_for(name)]


def test_each_name_builds_the_library_optimizer() -> None:
    from lion_pytorch import Lion
    from prodigyopt import Prodigy
    from transformers.optimization import Adafactor

    model = tiny_model(0)
    config = OptimizerConfig(betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    adamw = build_optimizer(config, groups(model, 1e-3))
    assert type(adamw) is torch.optim.AdamW
    assert adamw.param_groups[0]["betas"] == (0.8, 0.95)
    assert adamw.param_groups[0]["eps"] == 1e-6
    assert adamw.param_groups[0]["weight_decay"] == 0.1

    lion = build_optimizer(config.model_copy(update={"name": "lion"}), groups(model, 1e-3))
    assert isinstance(lion, Lion) and lion.param_groups[0]["betas"] == (0.8, 0.95)

    adafactor = build_optimizer(config.model_copy(update={"name": "adafactor"}), groups(model, 1e-3))
    assert isinstance(adafactor, Adafactor)
    group = adafactor.param_groups[0]
    # The external schedule must drive the step size.
    assert (group["relative_step"], group["scale_parameter"], group["warmup_init"]) == (False, False, False)
    assert group["weight_decay"] == 0.1

    prodigy = build_optimizer(config.model_copy(update={"name": "prodigy"}), groups(model, 1.0))
    assert isinstance(prodigy, Prodigy) and prodigy.param_groups[0]["betas"] == (0.8, 0.95)


def test_prodigy_warns_about_small_lr(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_model(0)
    with caplog.at_level(logging.WARNING, logger="tuneline.train.optim"):
        build_optimizer(OptimizerConfig(name="prodigy"), groups(model, 1e-4))
    assert "expects lr=1.0" in caplog.text and "'unet'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tuneline.train.optim"):
        build_optimizer(OptimizerConfig(name="prodigy"), [{"params": model.parameters(), "lr": 1.0, "name": "unet"}])
    assert caplog.text == ""


def test_prodigy_rejects_different_group_rates() -> None:
    with pytest.raises(ValueError, match="text_encoder_1=0.5"):
        build_optimizer(OptimizerConfig(name="prodigy"), groups(tiny_model(0), 1.0, 0.5))


def test_adamw8bit_needs_cuda_and_says_what_to_use() -> None:
    config = OptimizerConfig(name="adamw8bit")
    with pytest.raises(OptimizerUnavailable) as error:
        check_optimizer_available(config, "cpu")
    message = str(error.value)
    assert "adamw8bit" in message and "adamw" in message
    # Without bitsandbytes the message says what to install; with it, that a CUDA GPU is needed.
    assert "pip install" in message or "CUDA" in message
    assert isinstance(error.value, ValueError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_build_adamw8bit_fails_before_compute_without_cuda() -> None:
    with pytest.raises(OptimizerUnavailable):
        build_optimizer(OptimizerConfig(name="adamw8bit"), groups(tiny_model(0), 1e-3))


@pytest.mark.parametrize("name", RESUMABLE)
def test_available_optimizers_pass_the_check_on_cpu(name: str) -> None:
    check_optimizer_available(OptimizerConfig(name=name), "cpu")


def test_group_without_name_is_rejected() -> None:
    model = tiny_model(0)
    with pytest.raises(ValueError, match="name"):
        build_optimizer(OptimizerConfig(), [{"params": model.parameters(), "lr": 1e-3}])


def test_adamw_is_fused_on_cuda_and_torchs_default_elsewhere() -> None:
    model = tiny_model(0)
    cuda = build_optimizer(OptimizerConfig(name="adamw"), groups(model, 1e-2), device_type="cuda")
    assert all(group["fused"] for group in cuda.param_groups)  # one kernel per step for every tensor
    cpu = build_optimizer(OptimizerConfig(name="adamw"), groups(model, 1e-2))
    assert not any(group["fused"] for group in cpu.param_groups)
    # Fused kernels exist on the CPU too: the same object steps there (the device is checked at step time).
    train(model, cuda, range(2))
    assert all(torch.isfinite(p).all() for p in model.parameters())
