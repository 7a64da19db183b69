"""EMA of the trained weights: the averaging numbers, swap, and an exact state round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tuneline.train.config import EmaConfig
from tuneline.train.ema import EMA


def linear(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 2).to(dtype)


def set_weights(model: torch.nn.Linear, value: float) -> None:
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(value)


def test_constant_weights_are_the_average() -> None:
    model = linear()
    ema = EMA(model.named_parameters(), EmaConfig(enabled=True, decay=0.9))
    for step in range(1, 8):
        assert ema.update(step)
    assert ema.num_updates == 7
    for name, param in model.named_parameters():
        assert torch.equal(ema.shadow[name], param.detach())


@pytest.mark.parametrize("warmup", [False, True])
def test_known_sequence_matches_hand_computation(warmup: bool) -> None:
    model = linear()
    ema = EMA(model.named_parameters(), EmaConfig(enabled=True, decay=0.8, warmup=warmup))
    values = [1.0, 2.0, 4.0, -1.0]
    for step, value in enumerate(values, start=1):
        set_weights(model, value)
        ema.update(step)
    # First update copies; then d = 0.8, or with warmup min(0.8, (1+n)/(10+n)) = 2/11, 3/12, 4/13.
    decays = [2 / 11, 3 / 12, 4 / 13] if warmup else [0.8, 0.8, 0.8]
    want = values[0]
    for decay, value in zip(decays, values[1:]):
        want = decay * want + (1 - decay) * value
    assert ema.shadow["weight"] == pytest.approx(torch.full((2, 3), want), rel=1e-6)
    assert ema.shadow["bias"] == pytest.approx(torch.full((2,), want), rel=1e-6)


def test_warmup_decay_is_capped_by_config_decay() -> None:
    ema = EMA(linear().named_parameters(), EmaConfig(enabled=True, decay=0.3, warmup=True))
    seen = []
    for step in range(1, 6):
        seen.append(ema.decay())
        ema.update(step)
    # 4/13 > 0.3: the cap takes over from the third averaging update.
    assert seen == pytest.approx([0.0, 2 / 11, 3 / 12, 0.3, 0.3])


def test_start_step_and_every() -> None:
    model = linear()
    ema = EMA(model.named_parameters(), EmaConfig(enabled=True, decay=0.5, warmup=False, start_step=4, every=3))
    applied = []
    for step in range(1, 13):
        set_weights(model, float(step))
        if ema.update(step):
            applied.append(step)
    assert applied == [6, 9, 12]
    # Copy at 6, then 0.5 * 6 + 0.5 * 9 = 7.5, then 0.5 * 7.5 + 0.5 * 12 = 9.75.
    assert torch.equal(ema.shadow["bias"], torch.full((2,), 9.75))


def test_shadow_is_fp32_and_on_cpu_when_asked() -> None:
    model = linear(dtype=torch.bfloat16)
    ema = EMA(model.named_parameters(), EmaConfig(enabled=True, on_cpu=True))
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in ema.shadow.values())
    # The shadow is a copy, not the parameter's storage.
    set_weights(model, 3.0)
    assert not torch.equal(ema.shadow["bias"], torch.full((2,), 3.0))


def test_swap_uses_ema_weights_and_restores_live_ones_exactly() -> None:
    model = linear(dtype=torch.bfloat16)
    ema = EMA(model.named_parameters(), EmaConfig(enabled=True, decay=0.9, warmup=False))
    ema.update(1)
    with torch.no_grad():
        model.weight.add_(torch.randn(2, 3, dtype=torch.bfloat16))
    ema.update(2)
    live = {name: param.detach().clone() for name, param in model.named_parameters()}

    with ema.swap():
        assert torch.equal(model.weight, ema.shadow["weight"].to(torch.bfloat16))
        assert not torch.equal(model.weight, live["weight"])
    for name, param in model.named_parameters():
        assert torch.equal(param, live[name])

    # Restored even when the block fails (an eval that raises must not corrupt training).
    with pytest.raises(RuntimeError):
        with ema.swap():
            raise RuntimeError("eval failed")
    for name, param in model.named_parameters():
        assert torch.equal(param, live[name])


def test_copy_to_writes_ema_weights() -> None:
    model = linear()
    ema = EMA(model.named_parameters(), EmaConfig(enabled=True))
    ema.update(1)
    set_weights(model, 5.0)
    ema.copy_to()
    assert torch.equal(model.weight, ema.shadow["weight"])
    assert not torch.equal(model.weight, torch.full((2, 3), 5.0))


def test_state_round_trips_exactly_through_a_file(tmp_path: Path) -> None:
    config = EmaConfig(enabled=True, decay=0.95)
    model = linear()
    ema = EMA(model.named_parameters(), config)
    for step in range(1, 4):
        set_weights(model, step * 0.3)
        ema.update(step)
    torch.save(ema.state_dict(), tmp_path / "ema.pt")

    resumed = EMA(linear(seed=9).named_parameters(), config)
    resumed.load_state_dict(torch.load(tmp_path / "ema.pt"))
    assert resumed.num_updates == 3
    for name in ema.shadow:
        assert torch.equal(resumed.shadow[name], ema.shadow[name])
    # Both continue identically: num_updates decides the next decay.
    assert resumed.decay() == ema.decay()


def test_mismatched_state_is_rejected() -> None:
    ema = EMA(linear().named_parameters(), EmaConfig(enabled=True))
    with pytest.raises(ValueError, match="missing"):
        ema.load_state_dict({"num_updates": 1, "shadow": {"weight": torch.zeros(2, 3)}})
    with pytest.raises(ValueError, match="shape"):
        ema.load_state_dict({"num_updates": 1, "shadow": {"weight": torch.zeros(3, 3), "bias": torch.zeros(2)}})
