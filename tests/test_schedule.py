"""Learning-rate schedule: numbers at chosen steps, and a scheduler that resumes exactly."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tuneline.train.config import ScheduleConfig
from tuneline.train.schedule import build_scheduler, lr_factor


def test_warmup_is_linear_from_the_first_step() -> None:
    config = ScheduleConfig(name="constant", warmup_steps=4)
    assert [lr_factor(step, 100, config) for step in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(10_000, 100, config) == 1.0


def test_linear_decays_to_min_factor_at_total() -> None:
    config = ScheduleConfig(name="linear", warmup_steps=10, min_factor=0.1)
    assert lr_factor(9, 110, config) == 1.0  # last warmup step
    assert lr_factor(10, 110, config) == 1.0  # decay starts at 1
    assert lr_factor(60, 110, config) == pytest.approx(0.55)  # half way: (1 + 0.1) / 2
    assert lr_factor(109, 110, config) == pytest.approx(0.1 + 0.9 / 100)
    assert lr_factor(110, 110, config) == 0.1
    assert lr_factor(500, 110, config) == 0.1  # floor, never below


def test_cosine_midpoint_and_floor() -> None:
    config = ScheduleConfig(name="cosine", warmup_steps=20, min_factor=0.2)
    assert lr_factor(19, 220, config) == 1.0
    assert lr_factor(20, 220, config) == 1.0
    assert lr_factor(120, 220, config) == pytest.approx((1 + 0.2) / 2)
    assert lr_factor(70, 220, config) == pytest.approx(0.2 + 0.8 * (1 + math.cos(math.pi / 4)) / 2)
    assert lr_factor(220, 220, config) == pytest.approx(0.2)
    assert min(lr_factor(step, 220, config) for step in range(20, 300)) == pytest.approx(0.2)


def test_cosine_with_restarts_doubling_cycles() -> None:
    # Cycles of 10, 20, 40 steps after a warmup of 5.
    config = ScheduleConfig(name="cosine_with_restarts", warmup_steps=5, cycle_steps=10, cycle_mult=2.0, min_factor=0.1)
    factors = {step: lr_factor(step, 200, config) for step in range(200)}
    assert factors[4] == 1.0
    assert factors[5] == 1.0  # first cycle starts
    assert factors[10] == pytest.approx(0.55)  # midpoint of the first cycle
    assert factors[14] == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * 0.9)) / 2)
    assert factors[15] == 1.0  # restart: second cycle (20 steps)
    assert factors[25] == pytest.approx(0.55)
    assert factors[35] == 1.0  # third cycle (40 steps)
    assert factors[55] == pytest.approx(0.55)
    assert factors[75] == 1.0  # fourth cycle (80 steps)
    assert factors[155] == 1.0  # fifth cycle
    assert min(factors.values()) >= 0.1


def test_cosine_with_restarts_default_cycle_splits_the_run_in_four() -> None:
    config = ScheduleConfig(name="cosine_with_restarts", warmup_steps=2, min_factor=0.0)
    # (42 - 2) / 4 = 10 steps per cycle.
    restarts = [step for step in range(1, 42) if lr_factor(step, 42, config) == 1.0 and step >= 2]
    assert restarts == [2, 12, 22, 32]
    assert lr_factor(7, 42, config) == pytest.approx(0.5)
    # 41 / 4 rounds up to 11.
    assert lr_factor(13, 43, config) == 1.0


@pytest.mark.parametrize("mult", [1.0, 1.5, 2.0, 3.0, 1.0001])
def test_restart_cycles_match_a_plain_loop(mult: float) -> None:
    config = ScheduleConfig(name="cosine_with_restarts", cycle_steps=3, cycle_mult=mult, min_factor=0.05)
    for step in range(400):
        start, length = 0.0, 3.0
        while start + length <= step:
            start, length = start + length, length * mult
        want = 0.05 + 0.95 * (1 + math.cos(math.pi * (step - start) / length)) / 2
        assert lr_factor(step, 400, config) == pytest.approx(want, abs=1e-9), step


def test_scheduler_drives_each_group_and_counts_optimizer_steps() -> None:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(
        [{"params": [model.weight], "lr": 1.0, "name": "unet"}, {"params": [model.bias], "lr": 0.5, "name": "te"}]
    )
    scheduler = build_scheduler(optimizer, ScheduleConfig(name="linear", warmup_steps=2), total_steps=6)
    seen = []
    for _ in range(6):
        seen.extend(group["lr"] for group in optimizer.param_groups)
        optimizer.step()
        scheduler.step()
    # Pairs (unet, te) per step: warmup 1/2, 2/2, then linear over 4 steps.
    assert seen == pytest.approx([0.5, 0.25, 1.0, 0.5, 1.0, 0.5, 0.75, 0.375, 0.5, 0.25, 0.25, 0.125])


def test_scheduler_state_round_trips_through_a_file(tmp_path: Path) -> None:
    config = ScheduleConfig(name="cosine_with_restarts", warmup_steps=3, cycle_steps=4, cycle_mult=2.0)

    def fresh() -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        model = torch.nn.Linear(2, 2)
        optimizer = torch.optim.AdamW([{"params": model.parameters(), "lr": 1e-3, "name": "unet"}])
        return optimizer, build_scheduler(optimizer, config, total_steps=40)

    def run(optimizer, scheduler, steps: int) -> list[float]:
        rates = []
        for _ in range(steps):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return rates

    straight = run(*fresh(), 20)

    optimizer, scheduler = fresh()
    first = run(optimizer, scheduler, 9)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp_path / "ckpt.pt")
    checkpoint = torch.load(tmp_path / "ckpt.pt")  # weights_only: the state holds numbers only
    optimizer, scheduler = fresh()
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    assert scheduler.last_epoch == 9
    assert first + run(optimizer, scheduler, 11) == straight


def test_bad_total_is_rejected() -> None:
    with pytest.raises(ValueError, match="total_steps"):
        lr_factor(0, 0, ScheduleConfig())
