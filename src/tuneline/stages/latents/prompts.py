"""The render prompts' text embeddings: the latents stage's second output (data/prompt_embeds/).

Besides the captions, the stage encodes every text that live samples and the render stage give the
pipeline: each prompt of render.prompts_file, its negative prompt (the empty one where a prompt has
none: the negative a pipeline encodes for guidance), and the domain-transfer prompts (two or more data
sets, render.transfer). They go through the same text cache (`encode_texts`) into the same text
store as the captions, so a prompt equal to a caption shares its stored file. The output folder links
each file and indexes them by text (tuneline.stages.render.embeds reads it); with every text there,
live samples and the render stage load no text encoder.

Why a folder of its own, not data/latents: a prompt edit then changes only this folder. DVC reruns
the latents stage (every item reused, one text encoded) and render, which depends on it, but
data/latents stays byte-identical, so train does not rerun.

Nothing here decides a stored item's bytes or key (text.py and keys.py do): it is outside CODE.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneline.core.fsutil import atomic_write_bytes, atomic_write_json, link_or_copy, rebuilt_dir
from tuneline.core.params import ParamsError
from tuneline.core.report import StageReport
from tuneline.core.store import ItemStore
from tuneline.stages.latents.keys import SUFFIX
from tuneline.stages.render.embeds import INDEX, index_record, needed_texts

MAX_NAMED = 5


@dataclass
class PromptTexts:
    """What the render stage and live samples will encode, or why nothing is cached for them."""

    texts: list[str] = field(default_factory=list)
    off_because: list[str] = field(default_factory=list)  # why no prompt embedding is cached
    note: str | None = None  # why there are no texts, when that is no fault (no prompts file)
    warnings: list[str] = field(default_factory=list)


def prompt_cache_blockers(params: Any) -> list[str]:
    """Why prompt embeddings would be wrong to cache (empty: cache them). Unlike the captions' cache,
    caption dropout and shuffle do not matter here: a prompt is rendered as written."""
    if not params.latents.text_embeddings:
        return ["latents.text_embeddings: false"]
    if params.train.train_text_encoders:
        return ["a text encoder is trained (train.text_encoder_1/2.mode): live samples and the render stage "
                "encode prompts with the trained encoders"]
    return []


def prompt_texts(params: Any, root: Path, records: list[dict[str, Any]], captioned_dir: Path) -> PromptTexts:
    """Every text of render.prompts_file and of the transfer prompts of the latents manifest's
    `records`. Only the file, render.transfer and the data sets decide them (not the render section's
    sizes, steps or samplers: dvc.yaml's params of the stage say so). A missing prompts file is a note;
    a bad one a warning (the render stage refuses it with the same message)."""
    from tuneline.stages.render.prompts import prompt_pairs, read_prompts_file
    from tuneline.stages.render.transfer import sources_of, transfer_jobs

    config = params.render
    path = Path(root) / config.prompts_file
    if not path.is_file():
        return PromptTexts(note=f"{config.prompts_file} not found (render.prompts_file): no prompt to cache")
    try:
        parsed = read_prompts_file(path)
    except ParamsError as error:
        return PromptTexts(warnings=[f"prompt embeddings not cached: {error}"])
    pairs: list[tuple[str, str | None]] = [*prompt_pairs(parsed)]
    if config.transfer and len(params.datasets) >= 2:  # as the render stage decides it
        sources = sources_of(params, records, captioned_dir)
        if len(sources) >= 2:
            pairs += [(job.prompt, None) for job in transfer_jobs(sources)[0]]
    return PromptTexts(texts=needed_texts(pairs))


def note_prompts(report: StageReport, texts: PromptTexts, keys: dict[str, str], computed: int,
                 truncated: list[str], truncation: str) -> None:
    """The prompt texts in the report: how many are cached, how many were encoded now, why none."""
    report.warnings.extend(texts.warnings)
    if texts.off_because:
        report.extra["prompt_embeddings"] = "off: " + "; ".join(texts.off_because)
    elif texts.note:
        report.extra["prompt_embeddings"] = texts.note
    else:
        report.extra["prompt_embeddings"] = "cached"
    report.extra["prompt_embeddings_texts"] = len(keys)
    report.extra["prompt_embeddings_computed"] = computed
    if truncated:
        named = "; ".join(repr(text[:60] + "...") for text in truncated[:MAX_NAMED])
        report.warnings.append(f"{len(truncated)} prompt(s) are {truncation} and were cut there, as the pipeline "
                               f"cuts them: {named}")


def write_prompt_embeds(out_dir: Path, keys: dict[str, str], text_store: ItemStore, *, family: str,
                        text_format: str, dtype: str, encoders: dict[str, str], prompts_file: str,
                        off_because: list[str]) -> None:
    """Rebuild `out_dir`: each text's stored file (a link) and the index (text -> file)."""
    files = {text: f"{key}{SUFFIX}" for text, key in keys.items()}
    with rebuilt_dir(Path(out_dir)) as staging:
        for text, key in keys.items():
            loose = text_store.path(key, SUFFIX)
            if loose.is_file():
                link_or_copy(loose, staging / files[text])
            else:  # the same text as a caption, whose embedding is packed now (tuneline.core.packs)
                atomic_write_bytes(staging / files[text], text_store.read_bytes(key, SUFFIX))
        atomic_write_json(staging / INDEX, index_record(
            family=family, text_format=text_format, dtype=dtype, encoders=encoders, prompts_file=prompts_file,
            files=files, off_because=off_because))
