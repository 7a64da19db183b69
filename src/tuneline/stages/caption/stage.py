"""Stage `caption`: one caption per bucketed image, from a hand edit, a sidecar, Florence-2 or the default.

Output (data/captioned): the bucketed image packs (hard links of data/bucketed's, so the records'
`image` references stay valid) and manifest.jsonl: the bucket records plus `caption` (the final
caption), `caption_source` (hand_edited | sidecar | model | default), `sidecar_caption`,
`model_caption` and `caption_key`. No file per item: at a million images DVC would check each.

Where a caption comes from, first match wins:

- hand_edited: `data/caption_edits/<data set>/<id>.txt`, used verbatim (tuneline.stages.caption.edits).
- sidecar: the `<image>.txt` beside the raw image, unless `caption.mode` is overwrite.
- model: Florence-2 (`caption.model`, `task`, `num_beams`, ...), unless mode is sidecar_only.
- default: `caption.default_caption`, when the cleaned model caption is empty or, in
  sidecar_only mode, when there is no sidecar. Counted as `defaulted`.

The data set's trigger word is put in front ("trig, caption") unless the caption
already starts with it as a word, in any case; hand edits are left exactly as written.

Caching. Model captions live in the item store (`<store_dir>/caption/`), keyed by the
bucketed image's key (what decided its pixels), the model identity (digests of its
files, or hub id@revision), task, num_beams, max_new_tokens, the resolved dtype and
CODE_VERSION. The store holds the cleaned model caption only: trigger words, sidecars
and the default caption are applied when the output is written, so changing them never
runs the model. The model is loaded only when some caption is missing from the store,
once per run, and unloaded when captioning ends.

Hand edits live in the input folder `data/caption_edits` and win in every mode; a caption edited
in place in `data/captioned`, or kept in the item store by an older tuneline, is moved there
(tuneline.stages.caption.edits, which says why).

Sharding. `shard=(i, n)` (`tuneline caption --shard i/n`) captions only the missing model
captions whose key is in shard i of n (tuneline.core.store.in_shard) into the shared store,
and returns without rebuilding the output folder or writing metrics: run the n shards
(on as many workers), then the normal run, which assembles the output from the store.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tuneline.stages.caption import florence as florence_runner
from tuneline.stages.caption.edits import CaptionEdits, collect_in_place_edits, move_store_edits, repair_dvc_cache
from tuneline.stages.caption.output import Planned, write_output
from tuneline.config import Params
from tuneline.core.codeversion import code_version
from tuneline.stages.caption import CODE
from tuneline.stages.caption.config import CaptionConfig
from tuneline.core import layout
from tuneline.core.fsutil import digest_json
from tuneline.core.manifest import read_manifest
from tuneline.models.ref import is_tiny, model_identity, resolve_model
from tuneline.core.report import StageReport, console
from tuneline.core.packs import open_member
from tuneline.core.store import ItemStore, in_shard

STAGE = "caption"
CODE_VERSION = code_version(CODE)  # changes with the code that makes the items


def caption_key(image_key: str, model_id: str, config: CaptionConfig, dtype: str) -> str:
    """Everything that decides a model caption; not the trigger word, sidecar or default caption."""
    return digest_json({
        "stage": STAGE,
        "code": CODE_VERSION,
        "image": image_key,
        "model": model_id,
        "task": config.task,
        "num_beams": config.num_beams,
        "max_new_tokens": config.max_new_tokens,
        "dtype": dtype,  # resolved: fp16 and fp32 captions differ
    })


def plan_captions(params: Params, records: list[dict[str, Any]], edits: CaptionEdits,
                  report: StageReport) -> list[Planned]:
    """Decide where each item's caption comes from (see the module docstring)."""
    mode = params.caption.mode
    folders = {d.folder for d in params.datasets}
    planned = []
    for record in records:
        if record["dataset"] not in folders:
            report.reject(record["id"], f"data set {record['dataset']!r} is not in params.yaml any more",
                          dataset=record["dataset"])
            continue
        edited = edits.get(record["dataset"], record["id"])
        sidecar = record.get("caption")
        if edited is not None:
            planned.append(Planned(record, "hand_edited", edited))
        elif sidecar and mode != "overwrite":
            planned.append(Planned(record, "sidecar", sidecar))
        elif mode == "sidecar_only":
            planned.append(Planned(record, "default", params.caption.default_caption))
        else:
            planned.append(Planned(record, "model", ""))
    return planned


# An image in a stage output folder: (the folder, its manifest record's member reference).
ImageRef = tuple[Path, dict[str, Any]]


def _load_rgb(image: ImageRef) -> Any:
    from PIL import Image

    with Image.open(open_member(*image)) as opened:
        return opened.convert("RGB")


def generate_captions(config: CaptionConfig, source: Path | str, device: str, dtype: str,
                      items: list[tuple[ImageRef, str]], store: ItemStore, report: StageReport) -> None:
    """Caption (image, key) items with one loaded model, storing each batch as it finishes.

    A killed run keeps every finished batch. The model is unloaded however this ends.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    florence = florence_runner.load_florence(source, config.revision, device, dtype, config.task,
                                             config.num_beams, config.max_new_tokens)
    report.extra["model_loaded"] = True

    def run(batch: list[tuple[ImageRef, str]]) -> list[tuple[str, str]]:
        return florence.caption([_load_rgb(image) for image, _ in batch])

    def on_halve(size: int, halved: int, error: BaseException) -> None:
        report.extra["batch_halvings"] = report.extra.get("batch_halvings", 0) + 1
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        report.warnings.append(f"out of memory at caption batch size {size}; going on with {halved} ({reason})")

    description = f"caption: {config.task} on {device} {dtype}"
    progress = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=console, transient=True)
    try:
        with progress:
            bar = progress.add_task(description, total=len(items))
            for start, results in florence_runner.in_batches(items, config.batch_size, run, on_halve, device):
                for (_, key), (raw, caption) in zip(items[start:start + len(results)], results, strict=True):
                    store.write_json(key, {"caption": caption, "raw": raw, "model": config.model,
                                           "task": config.task})
                report.computed += len(results)
                progress.advance(bar, len(results))
    finally:
        florence.unload()


def report_edits(edits: CaptionEdits, records: list[dict[str, Any]], report: StageReport) -> None:
    """What the run did with edits outside the edits folder, and edits that match no item."""
    folder = layout.CAPTION_EDITS
    report.extra["hand_edits_moved"] = edits.moved_in_place + edits.moved_from_store
    if edits.moved_in_place:
        restored = (f"; the edit went through into {edits.repaired} of DVC's cached copies, which got their "
                    "bytes back" if edits.repaired else "")
        report.warnings.append(f"{edits.moved_in_place} caption(s) edited in place in {layout.CAPTIONED} moved to "
                               f"{folder}/, where edits belong (DVC may link {layout.CAPTIONED} read-only){restored}")
    if edits.moved_from_store:
        report.warnings.append(f"{edits.moved_from_store} caption edit(s) kept by an older tuneline in the item "
                               f"store moved to {folder}/")
    for path in edits.conflicts:
        report.warnings.append(f"{layout.CAPTIONED}/{path} was edited in place while {folder}/{path} was edited "
                               f"too: the edit in {folder}/ is kept")
    orphans = edits.orphans(records)
    if orphans:
        shown = ", ".join(orphans[:5]) + (f" and {len(orphans) - 5} more" if len(orphans) > 5 else "")
        report.warnings.append(f"{len(orphans)} caption edit(s) in {folder}/ match no image (replaced or "
                               f"removed; an edit follows the image's content): {shown}")


def _shard_report(report: StageReport, shard: tuple[int, int], wanted: int, started: float) -> StageReport:
    report.extra.update({"shard": f"{shard[0]}/{shard[1]}", "model_captions_wanted": wanted})
    report.seconds = time.perf_counter() - started
    return report


def run(params: Params, root: Path, bucketed_dir: Path, out_dir: Path, metrics_dir: Path | None = None, *,
        tracker: Any = None, shard: tuple[int, int] | None = None) -> StageReport:
    """Caption every item of `bucketed_dir`; `out_dir` gets manifest.jsonl with every caption (`output.py`).

    With `shard=(i, n)`: only compute shard i's missing captions into the store (see the module docstring).
    """
    started = time.perf_counter()
    root, bucketed_dir, out_dir = Path(root), Path(bucketed_dir), Path(out_dir)
    config = params.caption
    report = StageReport(STAGE)
    report.extra["model_loaded"] = False
    records = read_manifest(bucketed_dir)
    store_dir = root / params.store_dir
    edits = CaptionEdits(root / layout.CAPTION_EDITS)
    if shard is None:  # before anything else: the output folder is about to be rebuilt
        collect_in_place_edits(out_dir, edits)
        repair_dvc_cache(root, edits)
        move_store_edits(store_dir, records, edits)
        report_edits(edits, records, report)
    planned = plan_captions(params, records, edits, report)

    wanted = [item for item in planned if item.source == "model"]
    if wanted:
        device, dtype = florence_runner.resolve_device_dtype(config.device, config.dtype)
        model_id = model_identity(config.model, config.revision, root=root)
        store = ItemStore(store_dir, STAGE)
        stored: dict[str, dict[str, Any] | None] = {}
        for item in wanted:
            item.key = caption_key(item.record["key"], model_id, config, dtype)
            stored[item.key] = store.read_json(item.key)  # None also for an unreadable entry
        missing = list(dict.fromkeys(item.key for item in wanted
                                     if stored[item.key] is None and in_shard(item.key, shard)))
        if missing:
            path_of = {item.key: (bucketed_dir, item.record["image"]) for item in wanted}
            generate_captions(config, resolve_model(config.model, root), device, dtype,
                              [(path_of[key], key) for key in missing], store, report)
            stored.update({key: store.read_json(key) for key in missing})
        if shard is not None:  # a shard only fills the store; the unsharded run writes the output
            return _shard_report(report, shard, len(wanted), started)
        for item in wanted:
            item.text = stored[item.key]["caption"]
        if is_tiny(config.model):
            report.warnings.append(
                f"caption.model {config.model!r} is a tiny RANDOM-weight model: its {len(wanted)} caption(s) "
                "mean nothing (set caption.model to a real Florence-2 for training)")

    if shard is not None:  # nothing for the model: this shard has no work
        return _shard_report(report, shard, 0, started)
    return write_output(out_dir, report, params=params, planned=planned, wanted=len(wanted),
                        bucketed_dir=bucketed_dir, started=started, metrics_dir=metrics_dir)
