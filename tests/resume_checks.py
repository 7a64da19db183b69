"""What every resume test asserts (SDXL, Z-Image, the autoencoder; in-process and kill -9): a run stopped
and resumed ends bit-identical to a straight one, it trained, and it really resumed where it stopped.

A trainer that never steps "resumes exactly" too, and a kill that lands after the last step compares two
straight runs: so the weights must have moved from the base, and the resumed run's history must show
a second session that started at the checkpoint's step."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

# The autoencoder resume tests' settings per autoencoder.kind (in-process and kill -9): vq trains the whole model,
# with a small codebook whose dead codes restart, so the restarts' draws from the trainer's generator resume too.
AUTOENCODER_KINDS = {"kl": {}, "vq": {"kind": "vq", "mode": "full",
                                      "vq": {"codebook_size": 32, "dead_code_threshold": 0.5}}}


def checkpoint_at(checkpoints: Path, step: int) -> Path:
    """The one run folder's checkpoint of `step` under a checkpoint root (`<root>/<run key>/step_N`)."""
    [folder] = Path(checkpoints).glob(f"*/step_{step:06d}")
    return folder


def latest_step(checkpoints: Path) -> int:
    """The step the one run under `checkpoints` would resume from (its `latest` pointer)."""
    [pointer] = Path(checkpoints).glob("*/latest")
    return int(pointer.read_text("utf-8").strip().removeprefix("step_"))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    """Equal key sets, not empty, every tensor equal (key by key: zip() over two dicts would pass on an empty one)."""
    assert a.keys() == b.keys(), f"{what}: keys differ: {sorted(set(a) ^ set(b))[:5]}"
    assert len(a) > 0, f"{what}: nothing to compare"
    unequal = [key for key in a if not torch.equal(a[key], b[key])]
    assert unequal == [], f"{what}: {len(unequal)} of {len(a)} tensors differ, e.g. {unequal[:3]}"


def _states(training: dict) -> dict[str, torch.Tensor]:
    """Every tensor of every unit's optimizer state, by unit/parameter index/name."""
    return {f"{unit}/{index}/{name}": value for unit, parts in training["units"].items()
            for index, state in parts["optimizer"]["state"].items() for name, value in state.items()
            if isinstance(value, torch.Tensor)}


def assert_resumed_exactly(straight: Path, resumed: Path, base: dict[str, torch.Tensor], *, resumed_at: int,
                           ema: bool) -> None:
    """`straight` and `resumed`: checkpoint folders of the same final step, of a straight run and of one
    that stopped and resumed at step `resumed_at`; `base`: the trained parameters before step 1."""
    from tuneline.train.checkpoint import read_state

    a, b = load_file(straight / "trained.safetensors"), load_file(resumed / "trained.safetensors")
    assert_same_tensors(a, b, "trained weights")
    assert base.keys() == a.keys()
    unmoved = [key for key in a if torch.equal(a[key], base[key])]
    # Every trained module moved; a rare tensor may not (the discriminator's last bias has no gradient
    # while the hinge loss sees every logit on the wrong side, and no weight decay: measured 1 of 118).
    modules, moved = {key.split(".")[0] for key in a}, {key.split(".")[0] for key in a if key not in unmoved}
    assert modules == moved, f"trained modules that never moved from the base: {sorted(modules - moved)}"
    assert len(unmoved) <= 0.02 * len(a), f"{len(unmoved)} of {len(a)} trained tensors never moved from the base, " \
        f"e.g. {unmoved[:3]}"

    ta, tb = (torch.load(folder / "training.pt", weights_only=True) for folder in (straight, resumed))
    assert ta["units"].keys() == tb["units"].keys()
    assert_same_tensors(_states(ta), _states(tb), "optimizer state")
    assert [ta["units"][u]["scheduler"]["last_epoch"] for u in ta["units"]] == \
        [tb["units"][u]["scheduler"]["last_epoch"] for u in tb["units"]]
    if ema:
        assert ta["ema"]["num_updates"] == tb["ema"]["num_updates"] > 0
        assert_same_tensors(ta["ema"]["shadow"], tb["ema"]["shadow"], "EMA shadow")
        ema_weights = ta["ema"]["shadow"]
        assert ema_weights.keys() <= a.keys()
        # An average that lags the weights: neither a copy of them nor the base.
        assert any(not torch.equal(ema_weights[k], a[k].float()) for k in ema_weights)
        assert any(not torch.equal(ema_weights[k], base[k].float()) for k in ema_weights)
    else:
        assert ta["ema"] is None and tb["ema"] is None

    # What a step changes outside the optimizer (a VQ codebook and its EMA statistics), when the adapter has any.
    from tuneline.train.checkpoint import ADAPTER_STATE_FILE

    assert (straight / ADAPTER_STATE_FILE).is_file() == (resumed / ADAPTER_STATE_FILE).is_file()
    if (straight / ADAPTER_STATE_FILE).is_file():
        assert_same_tensors(load_file(straight / ADAPTER_STATE_FILE), load_file(resumed / ADAPTER_STATE_FILE),
                            "adapter state")

    sa, sb = read_state(straight), read_state(resumed)
    assert sa["train_state"]["step"] == sb["train_state"]["step"] > resumed_at > 0
    assert [s["started_at_step"] for s in sa["train_state"]["history"]] == [0]
    # The resumed run's sessions: one from the base, one from the checkpoint it resumed.
    assert [s["started_at_step"] for s in sb["train_state"]["history"]] == [0, resumed_at]
