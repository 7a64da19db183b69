"""The loss curve as a PNG: `dvc plots show` embeds it, so it shows without network (the
Vega plots of its HTML page load their library from a CDN), and it goes to MLflow.

The picture is a function of the rows alone: same history, same bytes (matplotlib's Agg
renderer with its bundled font, no "Software" text chunk, no timestamp), so rewriting it
after a session that trained nothing leaves DVC's output unchanged.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

from tuneline.core.fsutil import atomic_write_bytes


def loss_curve_png(rows: Sequence[dict[str, Any]], title: str = "train",
                   validation_rows: Sequence[dict[str, Any]] = ()) -> bytes:
    """A PNG with panels over the step: the loss (top), the validation loss (middle, when
    `validation_rows` has rows: weighted and unweighted, the best step marked) and the learning rate
    (bottom).

    `rows` are loss-curve rows (step, loss, lr as numbers or strings; empty values skipped);
    `validation_rows` validation-curve rows (step, loss, loss_unweighted, ...).
    """
    # Object-oriented matplotlib with the Agg canvas: no pyplot, no global backend switch,
    # nothing that needs a display. Imported here: the stage module stays cheap to import.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    def column(name: str, source: Sequence[dict[str, Any]] = rows) -> tuple[list[int], list[float]]:
        pairs = [(int(row["step"]), float(row[name])) for row in source if row.get(name) not in (None, "")]
        return [s for s, _ in pairs], [v for _, v in pairs]

    if validation_rows:
        figure = Figure(figsize=(8, 8), dpi=100)
        FigureCanvasAgg(figure)
        loss_axes, val_axes, lr_axes = figure.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [2, 2, 1]})
        val_steps, val_losses = column("loss", validation_rows)
        plain_steps, plain_losses = column("loss_unweighted", validation_rows)
        val_axes.plot(val_steps, val_losses, color="tab:green", linewidth=1.2, marker="o", markersize=3,
                      label="validation loss")
        if plain_losses != val_losses:
            val_axes.plot(plain_steps, plain_losses, color="tab:gray", linewidth=1.0, linestyle="--",
                          label="unweighted")
        if val_losses:
            best = min(range(len(val_losses)), key=lambda i: (val_losses[i], val_steps[i]))
            val_axes.plot([val_steps[best]], [val_losses[best]], marker="*", color="tab:red", markersize=12,
                          linestyle="none", label=f"best {val_losses[best]:.4f} at step {val_steps[best]}")
        val_axes.set_ylabel("validation loss")
        val_axes.grid(True, alpha=0.3)
        val_axes.legend(loc="upper right", fontsize=8)
    else:
        figure = Figure(figsize=(8, 6), dpi=100)
        FigureCanvasAgg(figure)
        loss_axes, lr_axes = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    steps, losses = column("loss")
    loss_axes.plot(steps, losses, color="tab:blue", linewidth=1.2, marker="o" if len(steps) < 30 else None,
                   markersize=3)
    loss_axes.set_ylabel("loss")
    loss_axes.set_title(f"{title}: {len(steps)} logged steps" + (f", last loss {losses[-1]:.4f}" if losses else ""))
    loss_axes.grid(True, alpha=0.3)
    if not steps:
        loss_axes.text(0.5, 0.5, "no steps logged", ha="center", va="center", transform=loss_axes.transAxes)
    lr_steps, lrs = column("lr")
    lr_axes.plot(lr_steps, lrs, color="tab:orange", linewidth=1.2)
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_xlabel("step")
    lr_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    lr_axes.grid(True, alpha=0.3)
    lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    figure.tight_layout()
    buffer = io.BytesIO()
    # PNG metadata: matplotlib writes "Software: matplotlib version..., https://matplotlib.org"
    # unless told not to; PNG gets no date from it (PDF and SVG would).
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def write_loss_curve_png(rows: Sequence[dict[str, Any]], path: Path, title: str = "train",
                         validation_rows: Sequence[dict[str, Any]] = ()) -> Path:
    atomic_write_bytes(Path(path), loss_curve_png(rows, title, validation_rows))
    return Path(path)
