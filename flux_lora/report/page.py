"""report.html (self-contained: opens from disk, no server, no network) and report.md, for a sweep or one run.

Everything is read from the run directories; pictures are copied or drawn into `report_files/` beside the
page, so the sweep folder can be copied elsewhere and still opens whole.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flux_lora.cost import estimated_and_took
from flux_lora.identity import config_differences
from flux_lora.report import plots
from flux_lora.report.collect import (
    EVAL_METRIC_KEYS,
    IMAGE_SET_WORDS,
    METRIC_BY_KEY,
    METRICS,
    PRIMARY_METRIC,
    Cell,
    Metric,
    RunRecord,
    collect,
    find_baseline,
    with_ratings,
)
from flux_lora.report.ratings import RatingSummary, summarize_ratings
from flux_lora.report.samples import eval_base_image, run_samples, thumbnail
from flux_lora.report.stats import ALPHA, Comparison, Estimate, Verdict, compare_to_baseline, mean_interval
from flux_lora.report.summary import find_run_dirs

FILES_DIR = "report_files"
# Keys that differ between cells by construction, not by recipe.
_NOT_A_DIFFERENCE = ("name", "ablation.", "profile.seed", "eval.")


@dataclass(frozen=True)
class Cellout:
    """One table cell: its text, a CSS class for the page, and an optional hover title."""

    text: str
    css: str = ""
    title: str = ""


@dataclass
class TableData:
    headers: list[str]
    rows: list[list[Cellout]] = field(default_factory=list)


@dataclass
class ReportData:
    title: str
    root: Path
    generated: str
    runs: int
    cells: list[Cell]
    seeds_per_cell: int
    notes: list[str]
    cells_table: TableData
    stats_table: TableData
    runs_table: TableData
    rating_table: TableData | None
    agreement_table: TableData | None
    ratings: RatingSummary | None
    plots: list[tuple[str, str]]  # (relative path, caption)
    plot_notes: list[str]
    grid: TableData | None  # cells containing image paths relative to the page
    grid_caption: str
    differences: list[tuple[str, list[str]]]


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _estimate_text(estimate: Estimate | None, spec: str) -> tuple[str, str]:
    """`1.4312 ±0.0004` and the interval as a hover title."""
    if estimate is None:
        return "-", "not measured"
    if estimate.half_width is None:
        return format(estimate.mean, spec), f"n={estimate.n}"
    return (
        f"{estimate.mean:{spec}} ±{estimate.half_width:{spec}}",
        f"95% interval [{estimate.low:{spec}}, {estimate.high:{spec}}], n={estimate.n}",
    )


def _verdict_css(comparison: Comparison | None) -> str:
    if comparison is None:
        return ""
    return {Verdict.better: "better", Verdict.worse: "worse", Verdict.same: "same"}.get(comparison.verdict, "")


def cell_statistics(
    cells: list[Cell], baseline: Cell | None
) -> dict[str, dict[str, tuple[Estimate | None, Comparison | None]]]:
    """metric -> cell -> (mean and interval over seeds, comparison with baseline or None)."""
    out: dict[str, dict[str, tuple[Estimate | None, Comparison | None]]] = {}
    for metric in METRICS:
        comparisons: dict[str, Comparison] = {}
        if baseline is not None and metric.lower_is_better is not None:
            others = {
                c.name: c.values(metric.key) for c in cells if c is not baseline and _comparable(metric, c, baseline)
            }
            comparisons = compare_to_baseline(baseline.values(metric.key), others, metric.lower_is_better)
        out[metric.key] = {c.name: (mean_interval(c.values(metric.key)), comparisons.get(c.name)) for c in cells}
    return out


def _comparable(metric: Metric, cell: Cell, baseline: Cell) -> bool:
    """Training losses under different weightings (min-SNR) are not on one scale; evaluations on other terms (image
    set, resolution, sigmas, base model, device, dtype, generation seeds and strengths) are not either."""
    if metric.key in EVAL_METRIC_KEYS:
        return not cell.evaluated_on_other_terms(baseline)
    if metric.key != "train_loss":
        return True
    return {r.loss_scale for r in cell.runs} == {r.loss_scale for r in baseline.runs}


def validation_words(cells: list[Cell]) -> str:
    """Which images the validation numbers were measured on, for every label that shows them."""
    sets = {b.get("images") for c in cells for b in c.bases if b.get("images")}
    if not sets:
        return ""
    if len(sets) > 1:
        return "mixed image sets"
    (only,) = sets
    return IMAGE_SET_WORDS.get(only, str(only))


def _labelled(metric: Metric, cells: list[Cell]) -> Metric:
    words = validation_words(cells) if metric.key in ("val_final", "val_best") else ""
    return dataclasses.replace(metric, label=f"{metric.label} ({words})") if words else metric


def _changes_text(cell: Cell) -> str:
    def value(v: Any) -> Any:
        return v["name"] if isinstance(v, dict) and "name" in v else v  # a whole group (optimizer): its option name

    return ", ".join(f"{k}={value(v)}" for k, v in cell.changes.items()) or (
        "(reference)" if cell.name == "baseline" else "-"
    )


def _state_css(cell: Cell) -> str:
    states = {r.row.state for r in cell.runs}
    if states <= {"succeeded", "skipped: done", "dry_run"}:
        return "ok"
    if states & {"failed", "refused", "interrupted", "dead"}:
        return "bad"
    return "live"


def _visible_metrics(cells: list[Cell]) -> list[Metric]:
    """Columns with at least one value (a rating column only once someone rated)."""
    return [
        _labelled(m, cells)
        for m in METRICS
        if any(c.values(m.key) or any(r.metrics.get(m.key) is not None for r in c.runs) for c in cells)
    ]


def build_cells_table(cells: list[Cell], stats: dict, baseline: Cell | None) -> TableData:
    metrics = _visible_metrics(cells)
    words = validation_words(cells)
    primary = METRIC_BY_KEY[PRIMARY_METRIC].label + (f", {words}" if words else "")
    table = TableData(
        [
            "cell",
            "changes",
            "seeds",
            "state",
            "steps",
            *[m.label for m in metrics],
            "best step",
            "best step (likeness)",
            "load check",
            f"vs baseline ({primary})",
        ]
    )
    for cell in cells:
        row = [
            Cellout(cell.name, "name"),
            Cellout(_changes_text(cell)),
            Cellout(", ".join(str(r.seed) for r in cell.runs if r.seed is not None) or "-"),
            Cellout(cell.state_line(), _state_css(cell)),
            Cellout(", ".join(sorted({str(r.steps) for r in cell.runs if r.steps is not None})) or "-"),
        ]
        for metric in metrics:
            estimate, comparison = stats[metric.key][cell.name]
            text, title = _estimate_text(estimate, metric.spec)
            if (
                metric.key == "train_loss"
                and baseline is not None
                and estimate is not None
                and not _comparable(metric, cell, baseline)
            ):
                text, title = f"{text} (other scale)", f"{title}; {cell.runs[0].loss_scale}: not compared with baseline"
            if comparison is not None and comparison.p_holm is not None:
                title += f"; vs baseline: {comparison.verdict.value} (Holm p={comparison.p_holm:.3g})"
            row.append(Cellout(text, _verdict_css(comparison), title))
        best_steps = sorted({r.best_step for r in cell.runs if r.best_step is not None})
        row.append(Cellout(", ".join(map(str, best_steps)) or "-"))
        by_likeness = sorted({r.best_step_likeness for r in cell.runs if r.best_step_likeness is not None})
        row.append(
            Cellout(
                ", ".join(map(str, by_likeness)) or "-",
                title="no face in any generated image" if not by_likeness else "",
            )
        )
        checks = [r.load_check for r in cell.runs if r.load_check is not None]
        row.append(
            Cellout(
                "-" if not checks else ("pass" if all(checks) else f"FAIL {checks.count(False)}/{len(checks)}"),
                "" if all(checks) else "bad",
            )
        )
        row.append(_primary_mark(cell, stats, baseline))
        table.rows.append(row)
    return table


def _primary_mark(cell: Cell, stats: dict, baseline: Cell | None) -> Cellout:
    if baseline is None:
        return Cellout("-", title="no baseline cell in this sweep")
    if cell is baseline:
        return Cellout("reference")
    other_terms = cell.evaluated_on_other_terms(baseline)
    if other_terms:
        return Cellout("not compared: evaluated on other terms", title="; ".join(other_terms))
    _, comparison = stats[PRIMARY_METRIC][cell.name]
    if comparison is None or comparison.verdict == Verdict.untested:
        return Cellout("-", title="needs 2+ evaluated seeds in this cell and in baseline")
    mark = {Verdict.better: "better", Verdict.worse: "worse", Verdict.same: "≈ no detectable difference"}[
        comparison.verdict
    ]
    return Cellout(
        f"{mark} (p={comparison.p_holm:.2g})",
        _verdict_css(comparison) + " mark",
        f"Welch p={comparison.p:.3g}, Holm-adjusted p={comparison.p_holm:.3g}",
    )


def build_stats_table(cells: list[Cell], stats: dict) -> TableData:
    table = TableData(
        ["metric", "cell", "n", "mean", "95% interval", "difference vs baseline", "p (Welch)", "p (Holm)", "verdict"]
    )
    for metric in _visible_metrics(cells):
        for cell in cells:
            estimate, comparison = stats[metric.key][cell.name]
            if estimate is None:
                continue
            interval = "-" if estimate.low is None else f"[{estimate.low:{metric.spec}}, {estimate.high:{metric.spec}}]"
            if comparison is None:
                diff, p, p_holm, verdict = "-", "-", "-", "reference" if cell.name == "baseline" else "-"
            else:
                diff = _fmt(comparison.difference, "+" + metric.spec)
                p, p_holm, verdict = _fmt(comparison.p, ".3g"), _fmt(comparison.p_holm, ".3g"), comparison.verdict.value
            table.rows.append(
                [
                    Cellout(metric.label),
                    Cellout(cell.name, "name"),
                    Cellout(str(estimate.n)),
                    Cellout(format(estimate.mean, metric.spec)),
                    Cellout(interval),
                    Cellout(diff),
                    Cellout(p),
                    Cellout(p_holm),
                    Cellout(verdict, _verdict_css(comparison)),
                ]
            )
    return table


def build_runs_table(cells: list[Cell]) -> TableData:
    table = TableData(
        [
            "folder",
            "cell",
            "seed",
            "state",
            "note",
            "run id",
            "steps",
            "wall time s",
            "final train loss",
            "val loss final",
            "evaluated",
        ]
    )
    for cell in cells:
        for r in cell.runs:
            css = (
                "ok"
                if r.counted or r.row.state == "dry_run"
                else ("bad" if r.row.state in ("failed", "refused", "interrupted", "dead") else "live")
            )
            table.rows.append(
                [
                    Cellout(r.row.run_dir.name, "name"),
                    Cellout(cell.name),
                    Cellout(str(r.seed) if r.seed is not None else "-"),
                    Cellout(r.row.state, css),
                    Cellout(r.row.note),
                    Cellout(r.row.run_id or "-"),
                    Cellout(_fmt(r.steps, "d")),
                    Cellout(_fmt(r.metrics["wall_s"], ".1f")),
                    Cellout(_fmt(r.metrics["train_loss"], ".4f")),
                    Cellout(_fmt(r.metrics["val_final"], ".4f")),
                    Cellout("yes" if r.evaluation else "-"),
                ]
            )
    return table


def build_rating_tables(cells: list[Cell], stats: dict, ratings: RatingSummary) -> tuple[TableData, TableData]:
    per_cell = TableData(["cell", "rated runs", "mean rating", "95% interval", "vs baseline"])
    for cell in cells:
        estimate, comparison = stats["rating"][cell.name]
        if estimate is None:
            continue
        interval = "-" if estimate.low is None else f"[{estimate.low:.2f}, {estimate.high:.2f}]"
        mark = "reference" if cell.name == "baseline" else ("-" if comparison is None else comparison.verdict.value)
        per_cell.rows.append(
            [
                Cellout(cell.name, "name"),
                Cellout(str(estimate.n)),
                Cellout(f"{estimate.mean:.2f}"),
                Cellout(interval),
                Cellout(mark, _verdict_css(comparison)),
            ]
        )
    agreement = TableData(["rater A", "rater B", "images both rated", "Spearman rho", "same score", "within 1"])
    for pair in ratings.pairs:
        agreement.rows.append(
            [
                Cellout(pair.a),
                Cellout(pair.b),
                Cellout(str(pair.images)),
                Cellout(_fmt(pair.spearman, ".2f")),
                Cellout(f"{pair.exact:.0%}"),
                Cellout(f"{pair.within_one:.0%}"),
            ]
        )
    return per_cell, agreement


def build_grid(
    cells: list[Cell], root: Path, files: Path, prompt: int, seed: int | None
) -> tuple[TableData | None, str]:
    """Columns: the no-LoRA image, then one per cell (one seed's run each); rows: every sampled step."""
    chosen: list[tuple[Cell, RunRecord]] = []
    for cell in cells:
        runs = [r for r in cell.runs if seed is None or r.seed == seed] or cell.runs[:1]
        if runs:
            chosen.append((cell, runs[0]))
    samples = {r.row.run_dir.name: {s.step: s for s in run_samples(r.home) if s.prompt == prompt} for _, r in chosen}
    steps = sorted({step for by_step in samples.values() for step in by_step})
    if not steps:
        return None, ""
    base = next((p for _, r in chosen if (p := eval_base_image(r.home, prompt, r.evaluation))), None)
    headers = ["step"] + (["no LoRA (evaluator, seed 0)"] if base is not None else [])
    table = TableData(
        headers + [f"{cell.name} (seed {run.seed})" if run.seed is not None else cell.name for cell, run in chosen]
    )
    prompt_seed = None
    for row_index, step in enumerate(steps):
        row = [Cellout(f"step {step}", "name")]
        if base is not None:  # the same image for every step: shown once, at the top
            row.append(
                Cellout(_rel(thumbnail(base, files / "samples" / "no_lora.png"), root), "img")
                if row_index == 0
                else Cellout("")
            )
        for _, run in chosen:
            sample = samples[run.row.run_dir.name].get(step)
            if sample is None:
                row.append(Cellout("-"))
                continue
            prompt_seed = sample.seed
            target = files / "samples" / f"{run.row.run_dir.name}_{step:06d}_{prompt:02d}.png"
            row.append(Cellout(_rel(thumbnail(sample.path, target), root), "img"))
        table.rows.append(row)
    texts = [p.get("text", "") for p in ((chosen[0][1].config.get("dataset") or {}).get("sample_prompts") or [])]
    text = texts[prompt] if prompt < len(texts) else f"prompt {prompt}"
    which = f"the seed-{seed} run of each cell" if seed is not None else "the first run of each cell"
    return (
        table,
        f"Prompt {prompt}: \u201c{text}\u201d (sampling seed {prompt_seed}), {which}; one row per sampled step (--prompt N, --seed S choose others).",
    )


def _rel(path: Path, root: Path) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def config_difference_list(cells: list[Cell], baseline: Cell | None) -> list[tuple[str, list[str]]]:
    """Each cell's frozen config against baseline's (first seed of each), only what differs."""
    if baseline is None or not baseline.runs or not baseline.runs[0].config:
        return []
    reference = baseline.runs[0].config
    out = []
    for cell in cells:
        if cell is baseline or not cell.runs or not cell.runs[0].config:
            continue
        changed = [
            line
            for line in config_differences(reference, cell.runs[0].config)
            if not line.split(":", 1)[0].startswith(_NOT_A_DIFFERENCE)
        ]
        out.append((cell.name, changed or ["(no difference: the cell repeats baseline)"]))
    return out


def _notes(cells: list[Cell], seeds_per_cell: int, baseline: Cell | None) -> list[str]:
    notes = []
    runs = [r for c in cells for r in c.runs]
    if len(cells) > 1 and baseline is None:
        notes.append("No baseline cell: cells are shown side by side, nothing is marked better or worse.")
    elif seeds_per_cell <= 1 and len(cells) > 1:
        notes.append(
            "One seed per cell: no significance can be claimed (an effect cannot be told from seed noise). "
            "Run with seeds (python launch.py sweep=ablation_seeds) to compare cells."
        )
    missing = [r for r in runs if r.counted and not r.evaluation]
    if missing:
        notes.append(
            f"{len(missing)} of {len(runs)} runs have no eval/eval.json: their evaluation columns show '-' "
            "(evaluate with python -m flux_lora.eval RUN_DIR, or train with eval.enabled=true)."
        )
    uncounted = [r for r in runs if not r.counted]
    if uncounted:
        notes.append(
            f"{len(uncounted)} run(s) have not succeeded (dry run, refused, failed, interrupted or still running) and are "
            "left out of the statistics; the runs table lists them."
        )
    if baseline is not None:
        for cell in cells:
            other_terms = cell.evaluated_on_other_terms(baseline) if cell is not baseline else []
            if other_terms:
                notes.append(
                    f"{cell.name}: evaluation numbers not compared with baseline, measured on other terms: {'; '.join(other_terms)}."
                )
    if validation_words(cells) == "training images":
        notes.append(
            "Validation loss is measured on the training images (the dataset held nothing out): it rewards memorising them. "
            "Hold images out with dataset.validation_split (the default does once a dataset has 8 images)."
        )
    took = estimated_and_took([r.home for r in runs])
    if took:
        notes.append(took[0].upper() + took[1:] + ": the estimate printed before the sweep, beside what it took.")
    return notes


def gather(root: Path, prompt: int = 0, seed: int | None = None, beside: tuple[Path, ...] = ()) -> ReportData:
    """Everything the page shows, with pictures drawn or copied into root/report_files."""
    files = root / FILES_DIR
    if files.is_dir():
        shutil.rmtree(files)  # pictures of cells that were since removed must not linger
    files.mkdir(parents=True)
    cells = collect(root, beside)
    ratings = summarize_ratings(root)
    if ratings:
        cells = with_ratings(cells, ratings.by_run)
    baseline = find_baseline(cells)
    stats = cell_statistics(cells, baseline)
    seeds_per_cell = max((len([r for r in c.runs if r.counted]) for c in cells), default=0)
    if seed is None:
        seed = min((r.seed for c in cells for r in c.runs if r.seed is not None), default=None)

    made: list[tuple[str, str]] = []
    words = validation_words(cells)
    validation = plots.plot_validation(cells, files / "validation_loss.png", words)
    if validation:
        made.append(
            (
                _rel(validation, root),
                f"Validation loss vs step{f', on the {words}' if words else ''} (thick: mean over seeds; thin: each seed; step 0: no LoRA).",
            )
        )
    training, plot_notes = plots.plot_training_loss(cells, files / "training_loss.png")
    if training:
        made.append((_rel(training, root), "Training loss, smoothed; dashed: a loss on another scale."))
    identity = plots.plot_identity(cells, files / "identity_strength.png")
    if identity:
        made.append(
            (
                _rel(identity, root),
                "Identity similarity vs LoRA strength (mean over seeds), with the no-LoRA floor and the training-set ceiling.",
            )
        )
    elif any(r.evaluation for c in cells for r in c.runs):
        plot_notes.append(
            "Identity vs strength: no face found in any generated image, so there is nothing to plot (the tiny model draws no faces)."
        )
    by_step = plots.plot_likeness_by_step(cells, files / "likeness_by_step.png")
    if by_step:
        made.append(
            (
                _rel(by_step, root),
                "Identity similarity vs step: which saved LoRA to keep (cheap pass: 2 prompts, 1 seed, strength 1).",
            )
        )
    elif any((r.evaluation or {}).get("likeness_by_step") for c in cells for r in c.runs):
        plot_notes.append(
            "Identity vs step: no face found in any image generated at the saved steps, so there is nothing to plot."
        )
    grid, grid_caption = build_grid(cells, root, files, prompt, seed)
    rating_table = agreement_table = None
    if ratings:
        rating_table, agreement_table = build_rating_tables(cells, stats, ratings)
    return ReportData(
        title=f"Sweep report: {root.name}" if len(cells) > 1 else f"Run report: {root.name}",
        root=root,
        generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        runs=sum(len(c.runs) for c in cells),
        cells=cells,
        seeds_per_cell=seeds_per_cell,
        notes=_notes(cells, seeds_per_cell, baseline),
        cells_table=build_cells_table(cells, stats, baseline),
        stats_table=build_stats_table(cells, stats),
        runs_table=build_runs_table(cells),
        rating_table=rating_table,
        agreement_table=agreement_table,
        ratings=ratings,
        plots=made,
        plot_notes=plot_notes,
        grid=grid,
        grid_caption=grid_caption,
        differences=config_difference_list(cells, baseline),
    )


STATS_EXPLANATION = (
    f"Each number is the mean over a cell's seeds, ± the half-width of its 95% Student-t interval. A cell is compared "
    f"with baseline by Welch's t-test (unequal spreads allowed), with Holm's correction over the cells tested, at alpha {ALPHA}: "
    "green = better, red = worse, grey = no detectable difference; uncoloured = not tested (fewer than 2 seeds on a side)."
)


def render_html(data: ReportData) -> str:
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(
        loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=select_autoescape(["html", "j2"])
    )
    return env.get_template("report.html.j2").render(data=data, explanation=STATS_EXPLANATION)


def _md_table(table: TableData) -> list[str]:
    def esc(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(esc, table.headers)) + " |", "|" + "---|" * len(table.headers)]
    for row in table.rows:
        lines.append("| " + " | ".join(f"![]({c.text})" if c.css == "img" else esc(c.text) for c in row) + " |")
    return lines


def render_markdown(data: ReportData) -> str:
    lines = [
        f"# {data.title}",
        "",
        f"`{data.root}`, {data.runs} runs in {len(data.cells)} cells, generated {data.generated}.",
        "",
    ]
    lines += [f"> {note}" for note in data.notes] + ([""] if data.notes else [])
    lines += [
        "## Cells",
        "",
        STATS_EXPLANATION.replace(
            "green = better, red = worse, grey = no detectable difference; uncoloured = not tested (fewer than 2 seeds on a side)",
            "the last column says better / worse / no detectable difference",
        ),
    ]
    lines += ["", *_md_table(data.cells_table), ""]
    if data.rating_table is not None and data.ratings is not None:
        lines += [
            "## Blind ratings",
            "",
            f"{data.ratings.lines} ratings of {data.ratings.images} images by {len(data.ratings.raters)} rater(s): {', '.join(data.ratings.raters)}.",
            "",
        ]
        lines += [*_md_table(data.rating_table), ""]
        if data.agreement_table is not None and data.agreement_table.rows:
            lines += ["Agreement between raters:", "", *_md_table(data.agreement_table), ""]
    if data.plots:
        lines += ["## Plots", ""] + [f"![{caption}]({path})" for path, caption in data.plots] + [""]
        lines += [f"- {note}" for note in data.plot_notes] + ([""] if data.plot_notes else [])
    if data.grid is not None:
        lines += ["## Samples", "", data.grid_caption, "", *_md_table(data.grid), ""]
    if data.differences:
        lines += ["## Config differences against baseline", ""]
        for name, changed in data.differences:
            lines += [f"- **{name}**: " + "; ".join(f"`{c}`" for c in changed)]
        lines += [""]
    if data.stats_table.rows:
        lines += ["## Statistics", "", *_md_table(data.stats_table), ""]
    lines += ["## Runs", "", *_md_table(data.runs_table), ""]
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    # A report being rewritten while someone has it open (a sweep still running) is never half a file.
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def write_report(
    root: Path, prompt: int = 0, seed: int | None = None, beside: tuple[Path, ...] = ()
) -> tuple[Path, Path]:
    """Write root/report.html and root/report.md (with the runs of `beside` as cells of their own); their paths."""
    data = gather(Path(root), prompt, seed, beside)
    html, md = data.root / "report.html", data.root / "report.md"
    _write_atomic(html, render_html(data))
    _write_atomic(md, render_markdown(data))
    return html, md


def write_report_quietly(sweep_dir: Any) -> Path | None:
    """End of a sweep: write the report, and never let a report problem change the sweep's outcome."""
    if not find_run_dirs(Path(sweep_dir)):
        return None  # nothing ran (refused before any cell started): no page to show
    try:
        html, md = write_report(Path(sweep_dir))
    except Exception as exc:  # noqa: BLE001 - the training already happened; say what broke and how to retry
        print(
            f"warning: report not written for {sweep_dir}: {exc}; retry with python -m flux_lora.report {sweep_dir}",
            file=sys.stderr,
        )
        return None
    print(f"report: {html} (and {md.name})")
    return html
