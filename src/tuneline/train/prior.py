"""Prior regularization (datasets[].role: regularization), so a LoRA of one subject does not drift its whole class.

A regularization data set's samples train beside the subject's in the same batches, weighted by its
prior_loss_weight (times its loss_weight) and logged apart (`loss/instance`, `loss/prior`), in one of two ways:

- class_images: DreamBooth prior preservation (diffusers' train_dreambooth_lora_sdxl.py --with_prior_preservation):
  the data set's images of the class and their captions train as usual. diffusers stacks instance and class
  halves and adds mean(instance) + prior_loss_weight * mean(class); here each sample carries its weight in the
  batch's weighted mean, so batches of any mix (or of one data set) count every sample alike.
- prior_prediction: OneTrainer's PRIOR_PREDICTION concept type (modules/trainer/GenericTrainer.py): the target of
  those samples is the frozen model's own prediction at the same noisy input, conditioning and timestep with the
  trained adapters switched off (no grad), so no class images need to be generated: the LoRA learns to change
  nothing there. Like OneTrainer, the prediction is made for the whole batch (the conditioning must match exactly)
  and only when the batch holds such a sample. LoRA only (train.mode full has nothing to switch off). A frozen
  model.training_adapter stays on: it is part of the model the LoRA trains on.

Both families call `with_prior_targets` where they form the target and add `loss_split` to their logged facts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

TRAIN = "train"
REGULARIZATION = "regularization"
ROLES = (TRAIN, REGULARIZATION)
CLASS_IMAGES = "class_images"
PRIOR_PREDICTION = "prior_prediction"
PRIORS = (CLASS_IMAGES, PRIOR_PREDICTION)
# The batch key: each sample's prior (one of PRIORS, or None for a sample of a data set that trains), present only
# when some data set is a regularization one (a run without one computes and logs what it did before).
BATCH_KEY = "prior"
METRICS = ("loss/instance", "loss/prior")


def _tuner_layers(module: Any) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [layer for layer in module.modules() if isinstance(layer, BaseTunerLayer)]


def _trained_adapters(layer: Any) -> set[str]:
    """The adapter names of a PEFT layer that have a parameter requiring grad (the trained LoRA, not a frozen one)."""
    import torch

    names: set[str] = set()
    for part in layer.adapter_layer_names:  # ModuleDicts (LoRA) or ParameterDicts (LoHa, LoKr)
        for name, holder in getattr(layer, part).items():
            parameters = [holder] if isinstance(holder, torch.nn.Parameter) else list(holder.parameters())
            if any(parameter.requires_grad for parameter in parameters):
                names.add(name)
    return names


@contextlib.contextmanager
def trained_adapters_off(modules: Iterable[Any]) -> Iterator[None]:
    """Inside the body, the trained PEFT adapters of `modules` are inactive (frozen adapters stay as they are):
    the modules compute what the base model does. Every requires_grad and active set is restored after (PEFT's
    set_adapter marks active adapters trainable). ValueError when no module has a trained adapter: a fully trained
    module cannot show its prior."""
    switched: list[tuple[Any, list[str], set[str]]] = []
    flags: list[tuple[Any, bool]] = []
    for module in modules:
        flags += [(parameter, parameter.requires_grad) for parameter in module.parameters()]
        for layer in _tuner_layers(module):
            trained = _trained_adapters(layer)
            active = list(layer.active_adapters)
            if trained & set(active):
                switched.append((layer, active, trained))
    if not switched:
        raise ValueError("prior_prediction needs trained LoRA adapters to switch off (train.mode lora); the trained "
                         "modules have none")
    try:
        for layer, active, trained in switched:
            layer.set_adapter([name for name in active if name not in trained])
        yield
    finally:
        for layer, active, _ in switched:
            layer.set_adapter(active)
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def prior_prediction_rows(batch: dict[str, Any]) -> list[bool]:
    """Per sample: is its target the base model's prediction (a host list: deciding costs no device sync)."""
    return [kind == PRIOR_PREDICTION for kind in batch.get(BATCH_KEY) or ()]


def with_prior_targets(target: Any, batch: dict[str, Any], modules: Iterable[Any], predict: Callable[[], Any]) -> Any:
    """`target` with the rows of prior_prediction samples replaced by `predict()` (the denoiser's output at the
    step's own inputs, which the caller computes the same way as its training prediction) run with the trained
    adapters of `modules` off and without a graph; `target` itself when the batch has no such sample."""
    import torch

    from tuneline.models.loading import host_to_device

    rows = prior_prediction_rows(batch)
    if not any(rows):
        return target
    with torch.no_grad(), trained_adapters_off(modules):
        prior = predict().detach().to(target.dtype)
    mask = host_to_device(torch.tensor(rows), target.device).reshape(-1, *([1] * (target.ndim - 1)))
    return torch.where(mask, prior, target)


def loss_split(losses: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """`loss/instance` and `loss/prior`: the mean of the (weighted) per-sample `losses` over the samples of data
    sets that train and over those of regularization data sets (device tensors: no host sync); a group with no
    sample in the batch is left out. Nothing when the run has no regularization data set."""
    import torch

    from tuneline.models.loading import host_to_device

    kinds = batch.get(BATCH_KEY)
    if kinds is None:
        return {}
    metrics: dict[str, Any] = {}
    for name, members in zip(METRICS, ([kind is None for kind in kinds], [kind is not None for kind in kinds])):
        if any(members):
            weights = torch.tensor(members, dtype=torch.float32) / sum(members)
            metrics[name] = (host_to_device(weights, losses.device) * losses.detach().float()).sum()
    return metrics
