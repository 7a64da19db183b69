"""The caption stage's output folder and report: the final captions (trigger words, defaults, hand edits
as given) in the manifest, and the bucketed image packs linked beside it. Nothing here decides a stored
model caption or its key, so it is outside the stage's CODE: changing the output runs no model."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneline.core.fsutil import link_or_copy, rebuilt_dir
from tuneline.core.manifest import MANIFEST, REJECTED, write_jsonl
from tuneline.core.report import StageReport
from tuneline.models.ref import is_tiny
from tuneline.stages.caption.text import with_trigger


@dataclass
class Planned:
    """Where one item's caption comes from (the stage's plan)."""

    record: dict[str, Any]
    source: str  # hand_edited | sidecar | model | default
    text: str  # the caption before the trigger word; filled in for "model" after generation
    key: str | None = None


def write_output(out_dir: Path, report: StageReport, *, params: Any, planned: list[Planned], wanted: int,
                 bucketed_dir: Path, started: float, metrics_dir: Path | None) -> StageReport:
    """Rebuild `out_dir` (manifest.jsonl, rejected.jsonl, the image packs) and finish the report;
    `wanted`: how many captions were the model's to give."""
    config = params.caption
    triggers = {d.folder: d.trigger_word for d in params.datasets}
    counts: Counter[str] = Counter()
    manifest = []
    with rebuilt_dir(out_dir) as staging:
        # The image packs, linked (the same files as data/bucketed): latents reads the images here.
        # With the mask packs of the items that have a loss mask (train.masked_loss).
        for pack in sorted({item.record["image"]["pack"] for item in planned}
                           | {item.record["mask"]["pack"] for item in planned if "mask" in item.record}):
            link_or_copy(bucketed_dir / pack, staging / pack)
        for item in planned:
            record = item.record
            source, text = item.source, item.text
            if source == "model" and not text:
                source, text = "default", config.default_caption
            final = text if source == "hand_edited" else with_trigger(triggers[record["dataset"]], text)
            counts[source] += 1
            manifest.append({
                **record,
                "caption": final,
                "caption_source": source,
                "sidecar_caption": record.get("caption"),
                "model_caption": item.text if item.source == "model" else None,
                "caption_key": item.key,
            })
        write_jsonl(staging / MANIFEST, manifest)
        write_jsonl(staging / REJECTED, report.rejected)

    # Only model captions come from the store; sidecar, default and hand-edited captions are taken as given.
    report.reused = wanted - report.computed
    report.given = len(manifest) - wanted
    report.extra.update({
        "model": config.model,
        "random_tiny_model": is_tiny(config.model),
        "mode": config.mode,
        "model_captions_reused": wanted - report.computed,
        "from_sidecar": counts["sidecar"],
        "defaulted": counts["default"],
        "hand_edited": counts["hand_edited"],
    })
    report.seconds = time.perf_counter() - started
    if metrics_dir is not None:
        report.write_metrics(metrics_dir)
    return report
