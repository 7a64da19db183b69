"""Which release of its family `model.base` is (`model.variant`: base, turbo), and what follows from it:
the render defaults when render.steps / render.guidance_scale are null, and the warning given when a
step-distilled release is trained without a training adapter.

    choice = resolve_variant(params.model, family, root)
    choice.steps, choice.guidance_scale      # render defaults (the variant's, else the family's)
    choice.reason                            # how it was decided, for reports

The variants are the family's (RenderFacts.variants): SDXL has one (base), Z-Image two (base, turbo).
`model.variant` set wins; otherwise the variant is read from what the model says about itself, without
loading anything: the hub id, the folder or file name (a hub cache snapshot: the repository's name),
then the model card (README.md: its title and front matter). Nothing named: the family's first variant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tuneline.core.params import ParamsError

if TYPE_CHECKING:
    from tuneline.models.base import Family, Variant
    from tuneline.models.config import ModelConfig
    from tuneline.train.config import TrainConfig

MODEL_CARD = "README.md"
# Front matter keys of a model card that name what a checkpoint is (base_model: what it was made from).
_CARD_KEYS = ("model_name", "base_model", "tags")


@dataclass(frozen=True)
class VariantChoice:
    """The variant of `model.base` and how it was decided."""

    variant: Variant
    reason: str  # "model.variant", "hub id 'Tongyi-MAI/Z-Image-Turbo' names it", ...
    detected: bool  # False: set by model.variant, the family's only variant, or nothing named one
    steps: int  # render default: the variant's, else the family's
    guidance_scale: float


def variant_named(family: Family, name: str) -> Variant:
    """The family's variant called `name`; ParamsError naming the allowed values otherwise."""
    for variant in family.render.variants:
        if variant.name == name:
            return variant
    allowed = ", ".join(v.name for v in family.render.variants)
    raise ParamsError(f"model.variant: {name!r} is not a {family.title} variant; allowed: {allowed} (or null to "
                      "detect it from the model)")


def _normalized(text: str) -> str:
    return re.sub(r"[\s_./\\:]+", "-", text.lower())


def _match(variants: tuple[Variant, ...], text: str) -> Variant | None:
    """The variant whose longest marker occurs in `text` ("de-turbo" beats "turbo")."""
    normalized = _normalized(text)
    best, length = None, 0
    for variant in variants:
        for marker in variant.markers:
            if marker in normalized and len(marker) > length:
                best, length = variant, len(marker)
    return best


def _card_text(card: Path) -> str:
    """A model card's title and the front matter keys that name the checkpoint, as one line."""
    import yaml

    try:
        text = card.read_text("utf-8", errors="replace")
    except OSError:
        return ""
    parts: list[str] = []
    body = text
    if text.startswith("---"):
        head, _, body = text[3:].partition("\n---")
        try:
            front = yaml.safe_load(head)
        except yaml.YAMLError:
            front = None
        if isinstance(front, dict):
            for key in _CARD_KEYS:
                value = front.get(key)
                values = value if isinstance(value, list) else [value]
                parts += [str(v) for v in values if isinstance(v, (str, int, float))]
    for line in body.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or stripped.lower().startswith("<h1"):
            parts.append(re.sub(r"<[^>]+>", " ", stripped.lstrip("#")))  # the title, tags removed
            break
    return " ".join(parts)


def _hub_card(repo: str, revision: str | None) -> Path | None:
    """The hub model card when it is in the local HF cache (never downloaded for this)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo, MODEL_CARD, revision=revision)
    return Path(found) if isinstance(found, str) else None


def _named_texts(model: ModelConfig, root: Path | None) -> list[tuple[str, str]]:
    """(where, text) of everything that may name the variant, in the order it is trusted."""
    from tuneline.models.ref import is_tiny, resolve_model

    if is_tiny(model.base):  # a tiny RANDOM model: its id is all it says (and it is not built for this)
        return [("tiny model id", model.base)]
    resolved = resolve_model(model.base, root)
    if isinstance(resolved, str):
        texts = [("hub id", resolved)]
        card = _hub_card(resolved, model.revision)
        return texts + ([(f"model card {card}", _card_text(card))] if card else [])
    path = Path(resolved)
    texts = [("file name" if path.is_file() else "folder name", path.name)]
    # A snapshot in the HF cache: .../models--Org--Name/snapshots/<commit>
    texts += [("hub cache folder", part.removeprefix("models--").replace("--", "/"))
              for part in path.parts if part.startswith("models--")]
    card = path / MODEL_CARD if path.is_dir() else None
    if card is not None and card.is_file():
        texts.append((f"model card {card}", _card_text(card)))
    return texts


def resolve_variant(model: ModelConfig, family: Family, root: Path | None = None) -> VariantChoice:
    """The variant of `model.base` (model.variant, else detected) with its render defaults."""
    facts = family.render
    variants = facts.variants

    def choice(variant: Variant, reason: str, detected: bool) -> VariantChoice:
        steps = variant.steps if variant.steps is not None else facts.steps
        guidance = variant.guidance_scale if variant.guidance_scale is not None else facts.guidance_scale
        return VariantChoice(variant, reason, detected, steps, guidance)

    if model.variant is not None:
        return choice(variant_named(family, model.variant), "model.variant", False)
    if len(variants) == 1:
        return choice(variants[0], f"the only {family.title} variant", False)
    for where, text in _named_texts(model, root):
        found = _match(variants, text)
        if found is not None:
            return choice(found, f"detected: the {where} {text!r} names it", True)
    return choice(variants[0], f"not detected (nothing in model.base {model.base!r}, its name or model card names "
                               f"a {family.title} variant): the default, {variants[0].name}", False)


def undetected_warning(choice: VariantChoice, model: ModelConfig, family: Family) -> str | None:
    """For `tuneline check`: a family with several variants where none was named (tiny models aside)."""
    from tuneline.models.ref import is_tiny

    if choice.detected or model.variant is not None or len(family.render.variants) == 1 or is_tiny(model.base):
        return None
    others = ", ".join(v.name for v in family.render.variants if v is not choice.variant)
    return (f"model.variant: {choice.reason}; render defaults {choice.steps} steps, guidance {choice.guidance_scale} "
            f"when render.steps / render.guidance_scale are null. Set model.variant ({others}) if model.base is "
            "another release")


def training_warning(choice: VariantChoice, model: ModelConfig, train: TrainConfig, family: Family) -> str | None:
    """The one warning for training a step-distilled variant without a training adapter, with the fix."""
    variant = choice.variant
    if not variant.distilled or model.training_adapter is not None:
        return None
    what = f"model.base {model.base!r} is {family.title} {variant.name}, a step-distilled model ({choice.reason})"
    if train.mode == "lora":
        example = f" (e.g. {variant.adapter_example})" if variant.adapter_example else ""
        return (f"{what}: {variant.problem}. Fix: set model.training_adapter to a de-distilling LoRA{example}, which "
                f"is active during the training steps only and never in the result, or {variant.advice}")
    return (f"{what}: fine-tuning it fully undoes its step distillation, and a training adapter cannot be used "
            f"with train.mode full. Fix: {variant.advice}")


def variant_problems(model: ModelConfig, family: Family) -> list[str]:
    """model.variant that the family does not have, one line (for preflight)."""
    if model.variant is None:
        return []
    try:
        variant_named(family, model.variant)
    except ParamsError as error:
        return [str(error)]
    return []
