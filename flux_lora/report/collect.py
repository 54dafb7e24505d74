"""One record per run, read from its directory (and its eval/eval.json when evaluated), grouped into cells.

A cell is what the sweep varied apart from the seed: the ablation when there is one, otherwise the run's
overrides without `profile.seed`. Its runs are the seeds. Nothing here trains or generates: a run without
eval.json simply has no evaluation numbers.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flux_lora.records import POINTER_FILE
from flux_lora.report.summary import RunRow, find_run_dirs, lineage_label, read_json, read_run, read_yaml

# States whose numbers count in a cell's statistics (a pointer "skipped: done" stands for a run that succeeded).
# An external LoRA file judged by `python -m flux_lora.eval --lora FILE` (state "external") counts as one run.
COUNTED_STATES = ("succeeded", "skipped: done", "external")
BASELINE = "baseline"
# Overrides that never define a cell: the seed is the replicate, paths say where things land.
_NOT_A_CELL = re.compile(r"^(profile\.seed|paths\.|hydra\.|launch\.|eval\.)")


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    spec: str  # format spec for one value
    lower_is_better: bool | None  # None: shown, never compared


# The order of the report's columns. Validation loss is the plain MSE on a fixed set (same scale in every
# cell); training loss is compared only between cells whose loss has the same definition (see loss_scale).
METRICS: tuple[Metric, ...] = (
    Metric("wall_s", "wall time s", ".1f", True),
    Metric("s_per_step", "s/step", ".3f", True),
    Metric("peak_gb", "peak memory GB", ".2f", True),
    Metric("train_loss", "final train loss", ".4f", True),
    Metric("val_final", "val loss final", ".4f", True),
    Metric("val_best", "val loss best", ".4f", True),
    Metric("identity", "identity cos", ".3f", False),
    Metric("face_share", "face found", ".2f", False),
    Metric("diversity", "diversity bits", ".1f", False),
    Metric("rating", "rating 1-5", ".2f", False),
)
METRIC_BY_KEY = {m.key: m for m in METRICS}
PRIMARY_METRIC = "val_final"  # the mark in the cells table: the one metric every evaluated cell shares


@dataclass(frozen=True)
class RunRecord:
    row: RunRow  # the terminal summary's row: state, note, run id, times (row.run_dir is the sweep's folder)
    home: Path  # where the run's files live (a pointer cell's run lives elsewhere)
    cell: str
    seed: int | None
    order: int  # Hydra's job number, so cells keep the sweep's order
    config: dict[str, Any]
    changes: dict[str, Any]  # the ablation's declared keys -> their values in this run
    loss_scale: str  # "" for the plain loss; otherwise what reweights it (min-SNR)
    steps: int | None
    metrics: dict[str, float | None]
    evaluation: dict[str, Any] | None  # eval/eval.json, None when not evaluated
    load_check: bool | None
    best_step: int | None
    basis: dict[str, Any] | None = None  # what the evaluation was measured on (evaluation_basis)
    best_step_likeness: int | None = None  # the saved LoRA whose faces are closest (eval.json likeness_by_step)

    @property
    def counted(self) -> bool:
        return self.row.state in COUNTED_STATES


@dataclass
class Cell:
    name: str
    runs: list[RunRecord] = field(default_factory=list)

    @property
    def changes(self) -> dict[str, Any]:
        return self.runs[0].changes if self.runs else {}

    def values(self, key: str) -> list[float]:
        """The metric over this cell's counted runs (seeds), missing values left out."""
        return [v for r in self.runs if r.counted and (v := r.metrics.get(key)) is not None]

    @property
    def bases(self) -> list[dict[str, Any]]:
        """The evaluation bases of the counted, evaluated runs."""
        return [r.basis for r in self.runs if r.counted and r.basis]

    def evaluated_on_other_terms(self, baseline: Cell) -> list[str]:
        """How this cell's evaluations differ from the baseline's (or among its own seeds); [] when comparable."""
        if not self.bases or not baseline.bases:
            return []
        reference = baseline.bases[0]
        return basis_difference(self.bases + baseline.bases[1:], reference)

    def state_line(self) -> str:
        """`succeeded` or `2 succeeded, 1 failed: NaN loss at step 3`: every state shown, none dropped."""
        counts = Counter(r.row.state for r in self.runs)
        parts = []
        for state, count in counts.items():
            reason = next(
                (r.row.note for r in self.runs if r.row.state == state and r.row.note and state != "skipped: done"), ""
            )
            label = state if len(self.runs) == 1 else f"{count} {state}"
            parts.append(label + (f": {reason}" if reason else ""))
        return "; ".join(parts)


def _leaf(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def run_home(cell_dir: Path) -> Path:
    """The folder that holds the run's files: the cell itself, or where its run_pointer.json points."""
    pointer = read_json(cell_dir / POINTER_FILE)
    if pointer and not (cell_dir / "run.json").exists() and pointer.get("run_dir"):
        return Path(pointer["run_dir"])
    return cell_dir


def _job_number(cell_dir: Path) -> int:
    head = cell_dir.name.split("_", 1)[0]
    return int(head) if head.isdigit() else 1_000_000


def _strength_key(by_strength: dict[str, Any]) -> str | None:
    """The strength the tables quote: 1.0 when evaluated, else the strongest evaluated."""
    keys = [k for k in by_strength if k not in ("base", "null")]
    if not keys:
        return None
    return next((k for k in keys if float(k) == 1.0), max(keys, key=float))


def eval_metrics(evaluation: dict[str, Any]) -> dict[str, float | None]:
    validation = evaluation.get("validation") or {}
    likeness = (evaluation.get("likeness") or {}).get("by_strength") or {}
    diversity = (evaluation.get("diversity") or {}).get("by_strength") or {}
    like_key, div_key = _strength_key(likeness), _strength_key(diversity)
    like = (likeness.get(like_key) or {}) if like_key else {}
    div = (diversity.get(div_key) or {}) if div_key else {}
    return {
        "val_final": (validation.get("final") or {}).get("loss"),
        "val_best": (validation.get("best") or {}).get("loss"),
        "identity": like.get("mean_cosine"),
        # A share of 0 from generation that ran is a real number; without generation it stays "-".
        "face_share": like.get("face_found_share") if like else None,
        "diversity": div.get("mean_phash_distance"),
    }


# The evaluation terms two cells must share to be compared, with the words the report uses for each.
BASIS_KEYS = {
    "images": "validation images",
    "image_set": "image set",
    "image_count": "image count",
    "resolution": "resolution",
    "sigmas": "sigmas",
    "base_model": "base model",
    "base_model_stand_in": "stand-in base model",
    "device": "device",
    "dtype": "dtype",
    "seeds": "seeds",
    "strengths": "strengths",
    "sample_steps": "sampling steps",
}
EVAL_METRIC_KEYS = ("val_final", "val_best", "identity", "face_share", "diversity")
IMAGE_SET_WORDS = {
    "held-out": "held-out images",
    "training-set": "training images",
    "validation-folder": "validation folder",
}


def evaluation_basis(evaluation: dict[str, Any] | None) -> dict[str, Any] | None:
    """eval.json's basis; for an evaluation written before it was recorded, what its sections say (None = unknown)."""
    if not evaluation:
        return None
    if evaluation.get("basis"):
        return evaluation["basis"]
    validation, run = evaluation.get("validation") or {}, evaluation.get("run") or {}
    likeness, settings = evaluation.get("likeness") or {}, evaluation.get("settings") or {}
    return {
        "images": validation.get("images"),
        "image_count": validation.get("count"),
        "resolution": validation.get("resolution") or likeness.get("resolution"),
        "sigmas": validation.get("sigmas"),
        "base_model": run.get("base_model"),
        "base_model_stand_in": run.get("base_model_stand_in"),
        "device": evaluation.get("device"),
        "seeds": settings.get("seeds"),
        "strengths": settings.get("strengths"),
        "sample_steps": likeness.get("steps"),
    }


def basis_difference(bases: list[dict[str, Any]], reference: dict[str, Any]) -> list[str]:
    """The terms on which these evaluations differ from the reference, in words; a term either side left unknown
    (None, or not recorded) is not held against them."""
    differences = []
    for basis in bases:
        for key, words in BASIS_KEYS.items():
            mine, theirs = basis.get(key), reference.get(key)
            if mine is not None and theirs is not None and mine != theirs:
                differences.append(f"{words} {_basis_value(key, mine)} vs {_basis_value(key, theirs)}")
    return list(dict.fromkeys(differences))


def _basis_value(key: str, value: Any) -> str:
    if key == "images":
        return IMAGE_SET_WORDS.get(value, str(value))
    if isinstance(value, list):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


def cell_name(run: dict[str, Any], config: dict[str, Any], cell_dir: Path) -> str:
    name = _clean_cell_name(run, config, cell_dir)
    lineage = run.get("lineage")
    if lineage:  # not a seed of the clean recipe: its weights partly come from another run
        return f"{name} ({lineage_label(lineage)})"
    return name


def _clean_cell_name(run: dict[str, Any], config: dict[str, Any], cell_dir: Path) -> str:
    ablation = (run.get("ablation") or {}).get("name") or _leaf(config, "ablation.name") or "none"
    if ablation != "none":
        return str(ablation)
    overrides = [o for o in run.get("overrides", []) if not _NOT_A_CELL.match(o.lstrip("+~"))]
    return " ".join(overrides) or str(run.get("name") or cell_dir.name)


def seconds_per_step(attempts: list[dict], wall_s: float | None, steps: int | None) -> float | None:
    """Training seconds over the steps trained, summed over every attempt (a resumed run is not faster than it was);
    the wall time over the steps when an attempt did not record its own (sd-scripts)."""
    ran = [a for a in attempts if a.get("duration_s") is not None]
    if ran and all(a.get("train_seconds") is not None and a.get("steps_trained") for a in ran):
        return sum(a["train_seconds"] for a in ran) / sum(a["steps_trained"] for a in ran)
    return wall_s / steps if wall_s is not None and steps else None


def read_record(cell_dir: Path) -> RunRecord:
    row = read_run(cell_dir)
    home = run_home(cell_dir)
    run = read_json(home / "run.json")
    config = read_yaml(home / "config.yaml")
    summary = read_json(home / "output" / "train_summary.json")
    evaluation = read_json(home / "eval" / "eval.json") or None
    steps = summary.get("steps")
    if steps is None and row.state in COUNTED_STATES:
        steps = _leaf(config, "profile.max_train_steps")  # sd-scripts writes no summary; a success ran them all
    metrics: dict[str, float | None] = {
        "wall_s": row.duration_s,  # over all attempts
        "s_per_step": seconds_per_step(read_json(home / "status.json").get("attempts") or [], row.duration_s, steps),
        "peak_gb": row.peak_memory_gb,
        "train_loss": row.final_loss,
        **{k: None for k in ("val_final", "val_best", "identity", "face_share", "diversity", "rating")},
    }
    if evaluation:
        metrics.update(eval_metrics(evaluation))
    changes = {key: _leaf(config, key) for key in (run.get("ablation") or {}).get("changes", [])}
    min_snr = _leaf(config, "profile.min_snr_gamma")
    best = ((evaluation or {}).get("validation") or {}).get("best") or {}
    load = (evaluation or {}).get("load_check") or {}
    return RunRecord(
        row=row,
        home=home,
        cell=cell_name(run, config, cell_dir),
        seed=_leaf(config, "profile.seed"),
        order=_job_number(cell_dir),
        config=config,
        changes=changes,
        loss_scale=f"min-SNR gamma {min_snr} weighted" if min_snr is not None else "",
        steps=steps,
        metrics=metrics,
        evaluation=evaluation,
        load_check=load.get("passed"),
        best_step=best.get("step"),
        basis=evaluation_basis(evaluation),
        best_step_likeness=((evaluation or {}).get("likeness_by_step") or {}).get("best_step"),
    )


def group_cells(records: list[RunRecord]) -> list[Cell]:
    """Cells in the sweep's order (first job number), each with its runs ordered by seed."""
    cells: dict[str, Cell] = {}
    for record in sorted(records, key=lambda r: r.order):
        cells.setdefault(record.cell, Cell(record.cell)).runs.append(record)
    for cell in cells.values():
        cell.runs.sort(key=lambda r: (r.seed is None, r.seed or 0, r.order))
    return list(cells.values())


def collect(root: Path, beside: tuple[Path, ...] = ()) -> list[Cell]:
    """The cells of root's runs, then those of the folders `beside` it (e.g. external LoRA files' evaluations)."""
    return group_cells(
        [read_record(d) for d in find_run_dirs(root)]
        + [read_record(d) for extra in beside for d in find_run_dirs(extra)]
    )


def with_ratings(cells: list[Cell], rating_by_run: dict[str, float]) -> list[Cell]:
    """Cells whose runs carry their mean blind rating (keyed by the run's folder name in the sweep)."""
    return [
        Cell(
            cell.name,
            [
                dataclasses.replace(r, metrics={**r.metrics, "rating": rating_by_run.get(r.row.run_dir.name)})
                for r in cell.runs
            ],
        )
        for cell in cells
    ]


def find_baseline(cells: list[Cell]) -> Cell | None:
    return next((c for c in cells if c.name == BASELINE), None)
