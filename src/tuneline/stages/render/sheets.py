"""Labelled image grids: the contact sheet (prompts x checkpoints), the diagnostic sheet, and the layout they share."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

LABEL_WIDTH = 200  # left column with the row labels
HEADER_HEIGHT = 24  # top row with the column labels
BACKGROUND = (32, 32, 32)
EMPTY = (64, 64, 64)
TEXT = (235, 235, 235)
_STEP = re.compile(r"^step_(\d+)$")


def sheet_size(rows: int, columns: int, tile: int) -> tuple[int, int]:
    """(width, height) of a sheet of rows x columns tiles with labels."""
    return LABEL_WIDTH + columns * tile, HEADER_HEIGHT + rows * tile


def grid_sheet(cells: Sequence[Sequence[Any]], row_labels: Sequence[str], column_labels: Sequence[str],
               tile: int) -> Any:
    """A sheet of PIL images (None: an empty, marked cell), each fitted into a tile, with labels."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    font = ImageFont.load_default()
    sheet = Image.new("RGB", sheet_size(len(row_labels), len(column_labels), tile), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for c, label in enumerate(column_labels):
        draw.text((LABEL_WIDTH + c * tile + 4, 6), _fit(label, tile), fill=TEXT, font=font)
    for r, label in enumerate(row_labels):
        top = HEADER_HEIGHT + r * tile
        lines = textwrap.wrap(label, width=max(8, LABEL_WIDTH // 7))[: max(1, tile // 14)]
        draw.multiline_text((6, top + 4), "\n".join(lines), fill=TEXT, font=font)
        for c, image in enumerate(cells[r]):
            left = LABEL_WIDTH + c * tile
            if image is None:
                draw.rectangle((left + 1, top + 1, left + tile - 2, top + tile - 2), fill=EMPTY)
                draw.text((left + 6, top + tile // 2 - 6), "not rendered", fill=TEXT, font=font)
                continue
            fitted = ImageOps.contain(image.convert("RGB"), (tile, tile))
            sheet.paste(fitted, (left + (tile - fitted.width) // 2, top + (tile - fitted.height) // 2))
    return sheet


def _fit(label: str, width: int) -> str:
    limit = max(4, width // 7)
    return label if len(label) <= limit else label[: limit - 1] + "…"


def live_steps(*live_dirs: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every live/step_N folder, in step order; the first folder listed wins a tie."""
    found: dict[int, Path] = {}
    for live_dir in live_dirs:
        if not Path(live_dir).is_dir():
            continue
        for folder in Path(live_dir).iterdir():
            match = _STEP.match(folder.name)
            if match and folder.is_dir():
                found.setdefault(int(match.group(1)), folder)
    return sorted(found.items())


def contact_sheet(columns: Sequence[tuple[str, Path]], prompts: Sequence[Any], out_path: Path,
                  tile: int = 256) -> Path:
    """Rows: prompts; columns: (label, folder holding <prompt index>.png), e.g. base, step_10, final."""
    from PIL import Image

    from tuneline.stages.render.generate import save_png

    cells = []
    for prompt in prompts:
        row = []
        for _, folder in columns:
            path = Path(folder) / f"{prompt.index}.png"
            if path.is_file():
                with Image.open(path) as image:
                    row.append(image.convert("RGB"))
            else:
                row.append(None)
        cells.append(row)
    labels = [f"{p.index}: {p.prompt} (seed {p.seed})" for p in prompts]
    sheet = grid_sheet(cells, labels, [label for label, _ in columns], tile)
    return save_png(sheet, out_path)


def diagnostic_sheet(pipeline: Any, params: Any, latents_dir: Path, out_path: Path, config: Any,
                     tile: int | None = None) -> tuple[Path, list[str]]:
    """renders/diagnostics.png: the rows the family's renderer draws from a few training samples (its
    RenderFacts.diagnostics is None), with the render section's diagnostic_* settings; (path, warnings)."""
    from tuneline.stages.render.generate import family_of_pipeline, save_png

    trigger_words = {dataset.folder: dataset.trigger_word for dataset in params.datasets}
    rows, columns, warnings = family_of_pipeline(pipeline).build_renderer().diagnostic_rows(
        pipeline, latents_dir, config.diagnostic_timesteps, config.diagnostic_samples, config.diagnostic_token,
        trigger_words, config.seed)
    sheet = grid_sheet([tiles for _, tiles in rows], [label for label, _ in rows], columns,
                       tile or config.sheet_tile)
    return save_png(sheet, out_path), warnings
