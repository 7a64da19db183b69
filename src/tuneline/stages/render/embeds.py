"""The prompt embeddings the latents stage cached (data/prompt_embeds/, written by
tuneline.stages.latents.prompts), read by live samples and the render stage.

With every text a render gives the pipeline in there, neither loads a text encoder: the family's
renderer hands the pipeline the stored tensors (`Renderer.text_inputs`) and only the denoiser and
the VAE run. The folder holds one file per text (each a text-store item of the latents stage, the
same bytes a caption equal to it gets) and an index:

    prompt_embeds.json  {format, family, text_embeddings_format, dtype, encoders, prompts_file,
                         texts: {text: file name}, off_because: [why nothing is cached]}

A reader uses the folder only when its family, text format and encoders' identities are those of the
model it renders (and, for the render stage, its dtype is the render's); else, or when a text is not
in it, it encodes with the text encoders as before and says why in one line.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneline.core.fsutil import canonical_json

if TYPE_CHECKING:
    from tuneline.models.base import Family
    from tuneline.models.config import ModelConfig
    from tuneline.stages.render.prompts import RenderPrompt

INDEX = "prompt_embeds.json"
FORMAT = "tuneline-prompt-embeddings"
SUFFIX = ".safetensors"
# Texts named in a message (a prompts file may hold hundreds).
MAX_NAMED = 3


def needed_texts(pairs: Iterable[tuple[str, str | None]]) -> list[str]:
    """Every text a render of (prompt, negative prompt) pairs may encode, once each, in order: each
    prompt and each negative prompt, and the empty prompt for a pair without a negative (the negative
    a pipeline encodes for guidance, unless its config zeros an empty negative)."""
    texts: dict[str, None] = {}
    for prompt, negative in pairs:
        texts[prompt] = None
        texts[negative or ""] = None
    return list(texts)


def text_encoders_trained(state: Mapping[str, Any]) -> bool:
    """Whether the run of trainer_state.json `state` trained a text encoder; unknown (no train
    section: weights written by other means) counts as trained, so its pipeline folder decides."""
    train = state.get("train_config")
    if not train:
        return True
    return any((train.get(section) or {}).get("mode", "frozen") != "frozen"
               for section in ("text_encoder_1", "text_encoder_2"))


@dataclass
class PromptEmbeddings:
    """text -> its stored tensors (loaded on first use, kept on the host)."""

    folder: Path
    files: Mapping[str, str]
    _loaded: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)

    def __call__(self, text: str) -> dict[str, Any]:
        if text not in self._loaded:
            from safetensors.torch import load_file

            self._loaded[text] = load_file(self.folder / self.files[text])
        return self._loaded[text]

    def missing(self, texts: Iterable[str]) -> list[str]:
        return [text for text in texts if text not in self.files]


def index_record(*, family: str, text_format: str, dtype: str, encoders: Mapping[str, str],
                 prompts_file: str, files: Mapping[str, str], off_because: list[str]) -> dict[str, Any]:
    """The index as the latents stage writes it (a function of its inputs only: DVC tracks it)."""
    return {"format": FORMAT, "family": family, "text_embeddings_format": text_format, "dtype": dtype,
            "encoders": dict(encoders), "prompts_file": prompts_file, "texts": dict(sorted(files.items())),
            "off_because": off_because}


def _named(texts: list[str]) -> str:
    shown = ", ".join(repr(text[:60]) for text in texts[:MAX_NAMED])
    return shown + (f" and {len(texts) - MAX_NAMED} more" if len(texts) > MAX_NAMED else "")


def cached_prompt_embeddings(folder: Path, family: Family, model: ModelConfig, root: Path | None,
                             texts: list[str], dtype: str | None = None) -> tuple[PromptEmbeddings | None, str]:
    """(the cached embeddings, "") when `folder` holds every one of `texts` as `model`'s text encoders
    make them (in `dtype`, unless None); else (None, why not: one sentence ending in what to do; "" when
    the latents stage cached none on purpose: latents.text_embeddings off, trained text encoders)."""
    import json

    from tuneline.core.params import ParamsError

    folder = Path(folder)
    rerun = "run the latents stage (dvc repro) to cache them"
    try:
        index = json.loads((folder / INDEX).read_text("utf-8"))
    except FileNotFoundError:
        return None, f"{folder} has no {INDEX}: {rerun}"
    except ValueError as error:
        return None, f"{folder / INDEX} is unreadable ({error}): {rerun}"
    if index.get("format") != FORMAT:
        return None, f"{folder / INDEX} is not a {FORMAT} index: {rerun}"
    if index.get("off_because"):  # switched off on purpose (its report says why): nothing to warn about
        return None, ""
    cache = family.load("text_cache")()
    if (index.get("family"), index.get("text_embeddings_format")) != (family.name, cache.format):
        return None, (f"the cached prompt embeddings are {index.get('family')}'s, the model is {family.name}: "
                      f"{rerun}")
    if dtype is not None and index.get("dtype") != dtype:
        return None, (f"the prompt embeddings were cached in {index.get('dtype')} (latents.dtype), the render "
                      f"runs in {dtype} (render.dtype): set both alike to use them")
    try:
        identities = {name: source.identity(root) for name, source in cache.sources(model, root).items()}
    except (ParamsError, FileNotFoundError) as error:
        return None, f"the text encoders of model.base cannot be identified ({error})"
    if canonical_json(identities) != canonical_json(index.get("encoders") or {}):
        return None, f"the prompt embeddings were cached with other text encoders than model.base's: {rerun}"
    embeddings = PromptEmbeddings(folder, index.get("texts") or {})
    missing = embeddings.missing(texts)
    if missing:
        return None, f"{len(missing)} prompt text(s) are not cached ({_named(missing)}): {rerun}"
    return embeddings, ""


def render_prompt_embeddings(model: ModelConfig, root: Path, family: Family, state: Mapping[str, Any], dtype: str,
                             prompts: list[RenderPrompt], transfer_prompts: list[str],
                             diagnostics_latents: Path | None) -> tuple[PromptEmbeddings | None, str]:
    """The render stage's cached embeddings of every text it renders (`prompts`, the transfer prompts),
    or (None, why not: "" when that is expected, the run of trainer_state `state` having trained a text
    encoder). A diagnostic sheet to draw (`diagnostics_latents`: the latents folder its samples come
    from) encodes training captions: it needs that folder's caption cache (latents.json)."""
    import json

    from tuneline.core import layout

    if text_encoders_trained(state):
        return None, ""
    if diagnostics_latents is not None:
        try:
            captions = json.loads((diagnostics_latents / "latents.json").read_text("utf-8")).get("text_embeddings")
        except (OSError, ValueError):
            captions = False
        if not captions:
            return None, f"the diagnostic sheet needs the captions' embeddings, and {diagnostics_latents} has none"
    pairs = [(prompt.prompt, prompt.negative_prompt) for prompt in prompts]
    texts = needed_texts(pairs + [(text, None) for text in transfer_prompts])
    return cached_prompt_embeddings(Path(root) / layout.PROMPT_EMBEDS, family, model, root, texts, dtype)
