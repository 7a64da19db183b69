"""Stage `latents`: encode every captioned image through the VAE once, and optionally its caption.

Two caches, each one file per item in its own store:
- latents (`vae.py`): the VAE's latent distribution of each image, one path for every family;
- text embeddings (`text.py`): each distinct caption encoded by the model family's text cache
  (`Family.text_cache`, tuneline.models.contracts.TextCache), only while that is valid for the
  training run (tuneline.train.cached_text: off with caption dropout or shuffle, or trained
  text encoders, with the reason in the report).
Their keys are in `keys.py`. The output folder, the summary and the report (`output.py`) are
rebuilt every run from the store and decide no stored byte, so they are outside CODE.

A second output, `prompts_dir` (data/prompt_embeds/, `prompts.py`, also outside CODE): the text
embeddings of the render prompts, encoded with the captions into the same text store, so live
samples and the render stage load no text encoder. A prompt edit changes only that folder.

Sharding. `shard=(i, n)` (`tuneline latents --shard i/n`) encodes only the missing latents
and text embeddings whose key is in shard i of n (tuneline.core.store.in_shard) into the shared
store, and returns without rebuilding the output folder or writing metrics: run the n
shards (on as many workers), then the normal run, which assembles the output from the store
and encodes the prompt texts.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tuneline.config import Params
from tuneline.core import layout
from tuneline.core.manifest import read_manifest
from tuneline.core.params import ParamsError
from tuneline.core.report import StageReport
from tuneline.core.store import ItemStore, in_shard
from tuneline.models.ref import is_tiny
from tuneline.models.contracts import TextCache
from tuneline.stages.latents.keys import STAGE, SUFFIX, TEXT_STAGE, caption_of, latent_key, text_key
from tuneline.stages.latents.output import (finish_shard, ignored_setting_notes, note_latents, note_texts,
                                            write_output)
from tuneline.stages.latents.prompts import (PromptTexts, note_prompts, prompt_cache_blockers, prompt_texts,
                                             write_prompt_embeds)
from tuneline.stages.latents.text import encode_texts
from tuneline.stages.latents.vae import LatentsEncoded, encode_latents
from tuneline.train.cached_text import text_cache_blockers


def run(params: Params, root: Path, captioned_dir: Path, out_dir: Path, metrics_dir: Path | None = None, *,
        tracker: Any = None, shard: tuple[int, int] | None = None, prompts_dir: Path | None = None) -> StageReport:
    """Cache the latents (and, when valid, text embeddings) of every item of `captioned_dir` into `out_dir`,
    and the render prompts' text embeddings into `prompts_dir` (default <root>/data/prompt_embeds).

    With `shard=(i, n)`: only compute shard i's missing entries into the store (see the module docstring).
    """
    from tuneline.models.family import family_of
    from tuneline.models.loading import resolve_device, resolve_dtype, vae_source

    started = time.perf_counter()
    root = Path(root)
    config = params.latents
    report = StageReport(STAGE)
    records = read_manifest(captioned_dir)
    store = ItemStore(root / params.store_dir, STAGE)
    text_store = ItemStore(root / params.store_dir, TEXT_STAGE)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    vae_identity = vae_source(params.model, root).identity(root)
    family = family_of(params.model, root)
    cache: TextCache = family.load("text_cache")()
    report.extra["family"] = family.name
    report.warnings.extend(ignored_setting_notes(params, family.ignored_settings))

    # Text cache: decided (and its keys computed) before any model loads, so a bad base fails fast. The
    # prompts' cache is on more often: caption dropout and shuffle change no prompt.
    blockers = text_cache_blockers(params.train) if config.text_embeddings else []
    prompt_blockers = prompt_cache_blockers(params)
    identities: dict[str, str] = {}
    if not prompt_blockers:
        try:
            identities = {name: source.identity(root) for name, source in cache.sources(params.model, root).items()}
        except ParamsError as error:
            prompt_blockers.append(str(error))
            if not blockers:
                blockers.append(str(error))
    text_on = config.text_embeddings and not blockers

    keys = [latent_key(record["key"], vae_identity, dtype, config.flip) for record in records]
    todo = [i for i, key in enumerate(keys) if not store.has(key, SUFFIX) and in_shard(key, shard)]
    encoded = (encode_latents(params, root, captioned_dir, records, todo, keys, store, device, dtype, vae_identity)
               if todo else LatentsEncoded())
    note_latents(report, len(todo), len(encoded.failed), encoded.vae_load_s, encoded.fp32_retried, dtype,
                 family.vae_overflow_hint)

    quantize = params.model.quantize  # a quantized text encoder is in the key
    text_keys = [text_key(cache.key_fields(caption_of(r), identities, dtype, quantize)) if text_on else None
                 for r in records]
    missing_text = {key: caption_of(r) for key, r in zip(text_keys, records)
                    if key is not None and not text_store.has(key, SUFFIX) and in_shard(key, shard)}
    # The prompts' texts: by the assembling run only, with the captions (the encoders load once).
    prompts = PromptTexts(off_because=prompt_blockers)
    if shard is None and not prompt_blockers:
        kept = [record for i, record in enumerate(records) if i not in encoded.failed]
        prompts = prompt_texts(params, root, kept, captioned_dir)
    prompt_keys = {text: text_key(cache.key_fields(text, identities, dtype, quantize)) for text in prompts.texts}
    missing_prompts = {key: text for text, key in prompt_keys.items()
                       if key not in missing_text and not text_store.has(key, SUFFIX)}
    truncated = (encode_texts(params.model, root, {**missing_text, **missing_prompts}, text_store, device, dtype,
                              identities, cache)
                 if missing_text or missing_prompts else [])
    captions = set(missing_text.values())
    note_texts(report, len(missing_text), [text for text in truncated if text in captions], cache.truncation)
    if shard is not None:
        return finish_shard(report, records, encoded.failed, shard, len(missing_text), device, dtype, started)
    report.extra["text_encoders_loaded"] = bool(missing_text or missing_prompts)
    note_prompts(report, prompts, prompt_keys, len(missing_prompts),
                 [text for text in truncated if text in set(missing_prompts.values())], cache.truncation)
    write_prompt_embeds(prompts_dir or root / layout.PROMPT_EMBEDS, prompt_keys, text_store, family=family.name,
                        text_format=cache.format, dtype=dtype, encoders=identities,
                        prompts_file=params.render.prompts_file, off_because=prompts.off_because)

    summary = {
        "family": family.name,
        "vae": params.model.vae or params.model.base,
        "vae_identity": vae_identity,
        "dtype": dtype,
        "flip": config.flip,
        "text_embeddings": text_on,
        "text_embeddings_off_because": blockers if config.text_embeddings else ["latents.text_embeddings: false"],
        "text_encoders": identities if text_on else {},
        "text_embeddings_format": cache.format if text_on else None,
        **(cache.summary() if text_on else {}),
        "random_tiny_model": is_tiny(params.model.base) or is_tiny(params.model.vae or ""),
    }
    return write_output(out_dir, report, records=records, keys=keys, text_keys=text_keys, failed=encoded.failed,
                        store=store, text_store=text_store, summary=summary, text_computed=len(missing_text),
                        device=device, base=params.model.base, started=started, metrics_dir=metrics_dir,
                        params=params, captioned_dir=Path(captioned_dir))
