"""The report's plots as PNG files (matplotlib's object API: no pyplot state, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure

from flux_lora.lifecycle.outcome import LOSS_TAG, scalar_series
from flux_lora.report.collect import Cell

SMOOTHING = 0.8  # EMA weight of the previous value (TensorBoard's slider default is 0.6; ablations are noisier)
_PALETTE = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#7f7f7f",
)


def cell_colour(index: int) -> str:
    return _PALETTE[index % len(_PALETTE)]


def _figure() -> tuple[Figure, object]:
    figure = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
    return figure, figure.add_subplot()


def _mean_by_step(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    by_step: dict[int, list[float]] = {}
    for curve in curves:
        for step, value in curve:
            by_step.setdefault(step, []).append(value)
    return [(step, math.fsum(v) / len(v)) for step, v in sorted(by_step.items())]


def smooth(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Exponential moving average, debiased like TensorBoard's so the first points are not pulled to 0."""
    out, last, norm = [], 0.0, 0.0
    for value in values:
        last = weight * last + (1 - weight) * value
        norm = weight * norm + (1 - weight)
        out.append(last / norm)
    return out


def plot_validation(cells: list[Cell], target: Path, images: str = "") -> Path | None:
    """Validation loss vs step: each cell's mean over seeds (thick), each seed (thin); step 0 is the base model.
    `images` says which images it was measured on (the title carries it)."""
    figure, axes = _figure()
    drawn = False
    for index, cell in enumerate(cells):
        curves = []
        for run in cell.runs:
            # A file from elsewhere (python -m flux_lora.eval --lora) may not know its step: it has no place on this axis.
            curve = [
                (p["step"], p["loss"])
                for p in ((run.evaluation or {}).get("validation") or {}).get("curve", [])
                if p.get("loss") is not None and p.get("step") is not None
            ]
            if curve:
                curves.append(curve)
                axes.plot(*zip(*curve), color=cell_colour(index), linewidth=0.7, alpha=0.35)
        if curves:
            axes.plot(
                *zip(*_mean_by_step(curves)),
                color=cell_colour(index),
                linewidth=2,
                marker="o",
                markersize=3,
                label=f"{cell.name} (n={len(curves)})",
            )
            drawn = True
    if not drawn:
        return None
    axes.set(
        xlabel="step (0 = no LoRA)",
        ylabel="validation loss (plain flow-matching MSE)",
        title="Validation loss vs step" + (f" ({images})" if images else ""),
    )
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncols=2)
    figure.savefig(target)
    return target


def plot_training_loss(cells: list[Cell], target: Path) -> tuple[Path | None, list[str]]:
    """Training loss per step, smoothed, one colour per cell; dashed where the loss is weighted differently."""
    figure, axes = _figure()
    notes: list[str] = []
    drawn = False
    for index, cell in enumerate(cells):
        scaled = any(run.loss_scale for run in cell.runs)
        labelled = False
        for run in cell.runs:
            points = scalar_series(run.home / "logs", LOSS_TAG)
            if not points:
                continue
            steps = [p[0] for p in points]
            label = None if labelled else cell.name + (" (other scale)" if scaled else "")
            axes.plot(
                steps,
                smooth([p[1] for p in points]),
                color=cell_colour(index),
                linewidth=1.2,
                linestyle="--" if scaled else "-",
                label=label,
            )
            labelled = drawn = True
        if scaled and labelled:
            notes.append(
                f"{cell.name}: loss is {cell.runs[0].loss_scale}, so on another scale: compare its samples and validation loss, not this curve"
            )
    if not drawn:
        return None, notes
    axes.set(xlabel="step", ylabel=f"training loss (EMA {SMOOTHING})", title="Training loss (smoothed)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncols=2)
    figure.savefig(target)
    return target, notes


def plot_identity(cells: list[Cell], target: Path) -> Path | None:
    """Identity similarity (mean cosine to the training faces) vs LoRA strength, mean over seeds per cell."""
    figure, axes = _figure()
    drawn = False
    floors, ceilings = [], []
    for index, cell in enumerate(cells):
        curves = []
        for run in cell.runs:
            likeness = (run.evaluation or {}).get("likeness") or {}
            curve = [
                (float(k), v["mean_cosine"])
                for k, v in (likeness.get("by_strength") or {}).items()
                if v.get("mean_cosine") is not None
            ]
            if curve:
                curves.append(sorted(curve))
            floors += [(likeness.get("floor") or {}).get("mean_cosine")]
            ceilings += [(likeness.get("ceiling") or {}).get("mean_cosine")]
        if curves:
            points = _mean_by_step([[(round(s * 1000), v) for s, v in c] for c in curves])
            axes.plot(
                [s / 1000 for s, _ in points],
                [v for _, v in points],
                color=cell_colour(index),
                marker="o",
                label=cell.name,
            )
            drawn = True
    if not drawn:
        return None
    for values, label, style in ((floors, "floor: no LoRA", ":"), (ceilings, "ceiling: training faces", "--")):
        known = [v for v in values if v is not None]
        if known:
            axes.axhline(math.fsum(known) / len(known), color="grey", linestyle=style, label=label)
    axes.set(
        xlabel="LoRA strength", ylabel="mean cosine to training faces", title="Identity similarity vs LoRA strength"
    )
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncols=2)
    figure.savefig(target)
    return target


def plot_likeness_by_step(cells: list[Cell], target: Path) -> Path | None:
    """Identity similarity vs step per cell (mean over seeds): to the held-out faces where the runs held some out
    (solid), to the training faces (dashed). None when no generated image had a face."""
    figure, axes = _figure()
    drawn = False
    for index, cell in enumerate(cells):
        for block, style in (("held_out_faces", "-"), ("training_faces", "--")):
            curves = []
            for run in cell.runs:
                points = ((run.evaluation or {}).get("likeness_by_step") or {}).get("points") or []
                curve = [
                    (p["step"], (p.get(block) or {}).get("mean_cosine")) for p in points if p.get("step") is not None
                ]
                curve = [(step, value) for step, value in curve if value is not None]
                if curve:
                    curves.append(curve)
            if curves:
                words = "held-out" if block == "held_out_faces" else "training"
                axes.plot(
                    *zip(*_mean_by_step(curves)),
                    color=cell_colour(index),
                    linestyle=style,
                    marker="o",
                    markersize=3,
                    label=f"{cell.name}: {words} faces",
                )
                drawn = True
    if not drawn:
        return None
    axes.set(
        xlabel="step",
        ylabel="mean cosine of generated faces",
        title="Identity similarity vs step (held-out faces solid, training dashed)",
    )
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncols=2)
    figure.savefig(target)
    return target
