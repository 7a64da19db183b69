"""The learning-rate schedule: a factor of each group's base lr per optimizer step.

`lr_factor` is a pure function (easy to plot and test); `build_scheduler` wraps it
in a torch `LambdaLR`, whose `state_dict` holds only numbers, so it checkpoints and
resumes exactly.
"""

from __future__ import annotations

import math

import torch

from tuneline.train.config import ScheduleConfig


def lr_factor(step: int, total_steps: int, config: ScheduleConfig) -> float:
    """The factor of the base learning rate for the optimizer step after `step` steps.

    `step` is the number of optimizer steps already taken (0 for the first step).

    - Warmup: for step < warmup_steps the factor is (step + 1) / warmup_steps, so
      the first step is not wasted at lr 0 and step warmup_steps - 1 reaches 1.
    - After warmup, with p = (step - warmup_steps) / (total_steps - warmup_steps):
      constant: 1; linear: 1 -> min_factor linearly in p; cosine:
      min + (1 - min) * (1 + cos(pi * p)) / 2; cosine_with_restarts: the same
      cosine within each cycle, cycles of cycle_steps (null: (total_steps -
      warmup_steps) / 4 rounded up), each cycle_mult times longer than the last.
    - Decaying schedules stay at min_factor from total_steps on.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")

    warmup = config.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if config.name == "constant":
        return 1.0

    floor = config.min_factor
    if step >= total_steps:
        return floor
    # max(1, ...): a warmup as long as the run leaves no decay phase to divide by.
    decay_steps = max(1, total_steps - warmup)
    elapsed = step - warmup

    if config.name == "linear":
        return floor + (1.0 - floor) * (1.0 - elapsed / decay_steps)
    if config.name == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * elapsed / decay_steps))
    if config.name == "cosine_with_restarts":
        first = config.cycle_steps if config.cycle_steps is not None else math.ceil(decay_steps / 4)
        position, length = _cycle_position(elapsed, float(first), config.cycle_mult)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * position / length))
    raise ValueError(
        f"train.schedule.name={config.name!r} is unknown; allowed: constant, linear, cosine, cosine_with_restarts"
    )


def _cycle_position(elapsed: int, first: float, mult: float) -> tuple[float, float]:
    """(steps into the current cycle, length of the current cycle) for cycles first, first*mult, ..."""
    if mult == 1.0:
        return elapsed % first, first
    # Closed form for the cycle index (a loop would be long for mult barely above 1),
    # then nudged by one either way where float rounding lands on a boundary.
    index = int(math.log1p(elapsed * (mult - 1.0) / first) / math.log(mult))
    start = first * (mult**index - 1.0) / (mult - 1.0)
    if start > elapsed:
        index -= 1
    elif start + first * mult**index <= elapsed:
        index += 1
    start = first * (mult**index - 1.0) / (mult - 1.0)
    return elapsed - start, first * mult**index


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: ScheduleConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` that sets every group's lr to its base lr times `lr_factor`.

    Call `scheduler.step()` once after each `optimizer.step()`; its `last_epoch` is
    then the number of optimizer steps taken. To resume: build the optimizer and
    this scheduler as at the start, then load the optimizer's and the scheduler's
    state dicts (the factor function is rebuilt from the config, not stored).
    """
    # Validate now rather than at the first step inside torch.
    lr_factor(0, total_steps, config)

    # A plain closure: LambdaLR stores nothing of it in state_dict, so the state
    # loads with torch.load(weights_only=True).
    def factor(step: int) -> float:
        return lr_factor(step, total_steps, config)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
