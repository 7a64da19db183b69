"""The latents stage's output folder and report: the manifest assembled from the store, the
summary (latents.json), the warnings and counts. Nothing here decides a stored item's bytes or
key, so it is outside the stage's CODE: editing a message re-encodes nothing. It imports only
tuneline.core and modules in CODE (tests/test_latents.py checks this). The loss masks at latent resolution
(tuneline.core.masks, keyed by that module's own code version) are made here from the bucket stage's
stored masks, once the latents' grid is known, and packed beside the latents (`<pack>.mask.tar`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tuneline.core.fsutil import atomic_write_json, rebuilt_dir
from tuneline.core.manifest import MANIFEST, REJECTED, write_jsonl
from tuneline.core.masks import (LATENT_MASK_SUFFIX, MASK_PACK_EXTENSION, latent_mask_key,
                                 stored_coverage, write_latent_mask)
from tuneline.core.report import StageReport
from tuneline.core.split import TRAIN, VALIDATION, describe, split_of
from tuneline.core.packs import PackItem, member_header, pack_of, read_member
from tuneline.core.store import ItemStore
from tuneline.models.base import ForeignSetting
from tuneline.stages.latents.keys import SUFFIX, caption_of

METADATA_FILE = "latents.json"
# Packs of an output folder (tuneline.core.packs): `<data set>/<pack>.tar` holds the latents files
# (`<id>.safetensors`), `<data set>/<pack>.text.tar` the caption text embeddings of the same items.
PACK_EXTENSION = ".tar"
TEXT_PACK_EXTENSION = ".text.tar"
# Images or captions named in a warning; a VAE that overflows in fp16 would list every image.
MAX_NAMED = 20
FACTORS = ("scaling_factor", "shift_factor")


def ignored_setting_notes(params: Any, settings: Iterable[ForeignSetting]) -> list[str]:
    """The family's notes on other families' settings that are set away from their defaults
    (they change nothing here: reported, not silently dropped)."""
    notes = []
    for setting in settings:
        *path, name = setting.key.split(".")
        section = params
        for part in path:
            section = getattr(section, part)
        value = getattr(section, name)
        if value != type(section).model_fields[name].get_default(call_default_factory=True):
            notes.append(setting.note.format(key=setting.key, value=value))
    return notes


def note_latents(report: StageReport, todo: int, failed: int, vae_load_s: float | None, fp32_retried: list[str],
                 dtype: str, overflow_hint: str | None) -> None:
    """The VAE pass in the report: counts, load time, and the warning for fp32 re-encodes."""
    report.computed = todo - failed
    report.extra["vae_loaded"] = vae_load_s is not None
    if vae_load_s is not None:
        report.extra["vae_load_s"] = round(vae_load_s, 3)
    if not fp32_retried:
        return
    report.extra["fp32_retries"] = len(fp32_retried)
    named = ", ".join(fp32_retried[:MAX_NAMED])
    more = f" and {len(fp32_retried) - MAX_NAMED} more" if len(fp32_retried) > MAX_NAMED else ""
    hint = overflow_hint or "latents.dtype bf16 or fp32 avoids the retries."
    report.warnings.append(
        f"{len(fp32_retried)} image(s) gave NaN/Inf latents in {dtype} and were re-encoded in fp32: "
        f"{named}{more}. {hint}"
    )


def note_texts(report: StageReport, computed: int, truncated: list[str], truncation: str) -> None:
    """The text pass in the report: whether encoders loaded, and the captions that were cut."""
    report.extra["text_encoders_loaded"] = bool(computed)
    if truncated:
        report.extra["captions_truncated"] = len(truncated)
        named = "; ".join(repr(c[:60] + "...") for c in truncated[:MAX_NAMED])
        report.warnings.append(
            f"{len(truncated)} caption(s) are {truncation} and were cut there, as the pipeline cuts them: {named}")


def read_latent_header(folder: Path, ref: dict[str, Any]) -> tuple[dict[str, str], list[int]]:
    """(safetensors metadata, shape of `mean`) of a packed latents file, from its header alone."""
    header = member_header(folder, ref)
    return header.get("__metadata__") or {}, list(header["mean"]["shape"])


def latent_headers(folder: Path, refs: dict[int, dict[str, Any]], records: list[dict[str, Any]]
                   ) -> dict[int, tuple[dict[str, Any], list[int]]]:
    """(the VAE's factors (FACTORS), shape) of each item's latents, reading and parsing one header per
    bucket: a run's latents all come from one VAE (its identity is in every key), so a bucket's crops give
    one shape and the same factors, and a header read per item would cost a file read per image."""
    by_bucket: dict[tuple[int, ...], tuple[dict[str, Any], list[int]]] = {}
    headers = {}
    for i, ref in refs.items():
        bucket = tuple(records[i]["bucket"])
        if bucket not in by_bucket:
            metadata, shape = read_latent_header(folder, ref)
            by_bucket[bucket] = {name: json.loads(metadata[name]) for name in FACTORS}, shape
        headers[i] = by_bucket[bucket]
    return headers


def finish_shard(report: StageReport, records: list[dict[str, Any]], failed: dict[int, str],
                 shard: tuple[int, int], text_computed: int, device: str, dtype: str, started: float) -> StageReport:
    """A shard only fills the store; the unsharded run writes the output."""
    for i in sorted(failed):
        report.reject(records[i].get("source", records[i]["id"]), failed[i], dataset=records[i]["dataset"])
    report.extra.update({"shard": f"{shard[0]}/{shard[1]}", "text_embeddings_computed": text_computed,
                         "device": device, "dtype": dtype})
    report.seconds = time.perf_counter() - started
    return report


def record_splits(params: Any, records: list[dict[str, Any]], failed: dict[int, str]
                  ) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Each record's side of the held-out split (`datasets[].validation`, tuneline.core.split),
    decided over the items kept, and per data set its rule and counts. Not in any item key: changing
    the setting recomputes no latent or text embedding, only this manifest."""
    settings = {dataset.folder: dataset.validation for dataset in params.datasets}
    ids: dict[str, list[str]] = {}
    for i, record in enumerate(records):
        if i not in failed:
            ids.setdefault(record["dataset"], []).append(record["id"])
    sides = split_of(ids, settings)
    splits = [sides.get(record["dataset"], {}).get(record["id"], TRAIN) for record in records]
    summary = {}
    for dataset, side in sorted(sides.items()):
        held = sum(1 for value in side.values() if value == VALIDATION)
        summary[dataset] = {"rule": describe(settings.get(dataset)), "validation_setting": settings.get(dataset),
                            "train": len(side) - held, "validation": held}
    return splits, summary


def store_latent_masks(records: list[dict[str, Any]], shapes: dict[int, list[int]], store: ItemStore,
                       report: StageReport, captioned_dir: Path) -> dict[int, str]:
    """The latent-resolution mask's key of every kept item with a mask (tuneline.core.masks), computing those
    the store lacks from the bucketed crop of the mask in `captioned_dir`'s packs (area average over each latent
    cell; read from the input folder, as the images are, so a clone with pulled outputs and an empty store works).
    Keyed by the cropped mask and the latent grid, not by the latent: a mask edit encodes no image again."""
    keys, computed = {}, 0
    for i, shape in shapes.items():
        record = records[i]
        if "mask_key" not in record:
            continue
        keys[i] = key = latent_mask_key(record["mask_key"], shape[-2:])
        if not store.has(key, LATENT_MASK_SUFFIX):
            write_latent_mask(store.path(key, LATENT_MASK_SUFFIX), read_member(captioned_dir, record["mask"]),
                              shape[-2:])
            computed += 1
    if keys:  # only then: reports of data without masks stay as they were
        report.extra["masks"] = len(keys)
        report.extra["masks_computed"] = computed
    return keys


def write_output(out_dir: Path, report: StageReport, *, records: list[dict[str, Any]], keys: list[str],
                 text_keys: list[str | None], failed: dict[int, str], store: ItemStore, text_store: ItemStore,
                 summary: dict[str, Any], text_computed: int, device: str, base: str, started: float,
                 metrics_dir: Path | None, params: Any, captioned_dir: Path) -> StageReport:
    """Rebuild `out_dir` from the store (links), with its manifest, rejected.jsonl and latents.json
    (`summary` plus the VAE's factors, read from a stored file: a fully cached run never needs
    the VAE config, and the held-out split); finish the report. `params`: the whole params (the
    split's settings; more of the record can come from it without touching the stage's CODE)."""
    splits, split_summary = record_splits(params, records, failed)
    manifest = []
    factors: dict[str, Any] = dict.fromkeys(FACTORS)
    dtype, flip = summary["dtype"], summary["flip"]
    with rebuilt_dir(out_dir) as staging:
        for i in sorted(failed):
            report.reject(records[i].get("source", records[i]["id"]), failed[i], dataset=records[i]["dataset"])
        kept = [i for i in range(len(records)) if i not in failed]
        member = {i: (pack_of(records[i]["dataset"], records[i]["id"], params.pack_digits), f"{records[i]['id']}{SUFFIX}")
                  for i in kept}
        latent_refs = store.pack(staging, [PackItem(*member[i], keys[i], SUFFIX) for i in kept], PACK_EXTENSION)
        text_refs = text_store.pack(staging, [PackItem(*member[i], key, SUFFIX) for i in kept
                                              if (key := text_keys[i]) is not None], TEXT_PACK_EXTENSION)
        headers = latent_headers(staging, {i: latent_refs[member[i]] for i in kept}, records)
        mask_keys = store_latent_masks(records, {i: shape for i, (_, shape) in headers.items()}, store, report,
                                       captioned_dir)
        mask_refs = store.pack(staging, [PackItem(*member[i], mask_keys[i], LATENT_MASK_SUFFIX) for i in kept
                                         if i in mask_keys], MASK_PACK_EXTENSION)
        for i in kept:
            record, key = records[i], keys[i]
            latents = latent_refs[member[i]]
            factors, shape = headers[i]
            texts = text_refs[member[i]] if text_keys[i] is not None else None
            manifest.append({
                **record,
                "latents": latents,
                "latent_key": key,
                "latent_shape": shape,
                "latent_dtype": dtype,
                **factors,
                "has_flip": flip,
                "text_embeddings": texts,
                "text_key": text_keys[i],
                "split": splits[i],
            })
            if i in mask_keys:  # only then: the records of items without a mask stay as they were
                ref = mask_refs[member[i]]
                manifest[-1].update({"latent_mask": ref, "latent_mask_key": mask_keys[i],
                                     "mask_coverage": stored_coverage(staging, ref)})
        report.reused = len(manifest) - report.computed
        summary = {**summary, **factors, "split": split_summary,
                   "latent_stores": "mean and std of the VAE's latent distribution, not scaled: "
                                    "sample, then (latent - shift_factor) * scaling_factor"}
        write_jsonl(staging / MANIFEST, manifest)
        write_jsonl(staging / REJECTED, report.rejected)
        atomic_write_json(staging / METADATA_FILE, summary)

    unique_text = {k for k in text_keys if k is not None}
    report.extra["text_embeddings"] = ("cached" if summary["text_embeddings"]
                                       else "off: " + "; ".join(summary["text_embeddings_off_because"]))
    report.extra["text_embeddings_computed"] = text_computed
    report.extra["text_embeddings_reused"] = len(unique_text) - text_computed
    report.extra["empty_captions"] = sum(1 for r in manifest if not caption_of(r))
    report.extra["validation_items"] = sum(1 for r in manifest if r["split"] == VALIDATION)
    report.extra["train_items"] = len(manifest) - report.extra["validation_items"]
    report.extra["device"] = device
    report.extra["dtype"] = dtype
    if summary["random_tiny_model"]:
        report.extra["model"] = f"{base} (tiny RANDOM weights: latents mean nothing)"
    report.seconds = time.perf_counter() - started
    if metrics_dir is not None:
        report.write_metrics(metrics_dir)
    return report
