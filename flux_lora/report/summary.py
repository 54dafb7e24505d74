"""The terminal summary: one row per run, built only from what its run directory holds.

Used at the end of a sweep (Hydra's end-of-sweep callback does not fire after a failure, so
launch.py calls it itself) and by `python -m flux_lora.report DIR [DIR ...]`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from flux_lora.lifecycle.lease import lease_path, read_holder
from flux_lora.lifecycle.outcome import scalar_series
from flux_lora.records import POINTER_FILE, total_duration


@dataclass(frozen=True)
class RunRow:
    run_dir: Path
    name: str
    ablation: str
    run_id: str
    state: str
    duration_s: float | None
    final_loss: float | None
    peak_memory_gb: float | None
    note: str
    images_seen: int | None = None  # max_train_steps x batch x accumulation x GPUs: the cell's compute
    step_basis: str = ""


STATUS_UNREADABLE = "status unreadable"


def unreadable(path: Path) -> str | None:
    """Why a record file that exists cannot be read (None when it is missing or fine)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return f"is unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None if isinstance(data, dict) else "is not a JSON object"


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# libyaml's safe loader when PyYAML was built with it: the pure-Python one spent 1.2 s of a 27-run report.
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        return yaml.load(path.read_text(), Loader=_SAFE_LOADER) or {}
    except (OSError, yaml.YAMLError):
        return {}


def last_scalar(logging_dir: Path, tag: str) -> float | None:
    """Value of a TensorBoard scalar at its highest step under logging_dir (both engines write TensorBoard events)."""
    series = scalar_series(logging_dir, tag)
    return series[-1][1] if series else None


SKIPPED_DONE = "skipped: done"
OWNER_GONE = "owner gone"  # left `running` by a launcher (and job) that no longer exist: unfinished


def _owner_gone(config: dict[str, Any], run_id: str) -> bool:
    outputs = (config.get("paths") or {}).get("outputs")
    if not outputs or not run_id:
        return False
    holder = read_holder(lease_path(Path(outputs), run_id))
    return holder is None or holder.gone()


def lineage_label(lineage: dict[str, Any]) -> str:
    """Where a run's weights partly come from, in a few words."""
    parts = []
    if lineage.get("from_step") is not None:
        parts.append(f"from run {lineage.get('from_run')} step {lineage.get('from_step')}")
    if lineage.get("init_lora_sha256"):
        parts.append(f"from LoRA {Path(lineage.get('init_lora') or '').name} sha256 {lineage['init_lora_sha256'][:12]}")
    return ", ".join(parts)


def read_run(run_dir: Path) -> RunRow:
    pointer = read_json(run_dir / POINTER_FILE)
    if pointer and not (run_dir / "run.json").exists():
        home = Path(pointer.get("run_dir", run_dir))
        if pointer.get("state") in ("busy", "refused") or home == run_dir:
            # A sweep cell that did not run: another launch holds its run id, or it could not be resumed.
            return RunRow(
                run_dir=run_dir,
                name=run_dir.name,
                ablation="",
                run_id=pointer.get("run_id", ""),
                state=pointer.get("state", "?"),
                duration_s=None,
                final_loss=None,
                peak_memory_gb=None,
                note=pointer.get("note", ""),
            )
        # A sweep cell whose run lives elsewhere: skipped as done, or resumed in its own folder.
        row = read_run(home)
        if pointer["state"] == SKIPPED_DONE:
            return dataclasses.replace(row, run_dir=run_dir, state=SKIPPED_DONE, note=str(home))
        note = f"{pointer['state']} in {home}" + (f": {row.note}" if row.note else "")
        return dataclasses.replace(row, run_dir=run_dir, note=note)
    run = read_json(run_dir / "run.json")
    status = read_json(run_dir / "status.json")
    summary = read_json(run_dir / "output" / "train_summary.json")
    # The moving average at the last step (sd-scripts' loss/average): one step's loss is too noisy to compare.
    final_loss = summary.get("average_loss")
    if final_loss is None:
        final_loss = last_scalar(run_dir / "logs", "loss/average")
    state = status.get("state", "not started")
    note = status.get("reason") or ""
    damage = unreadable(run_dir / "status.json")
    if damage:  # not "not started": the run may well have trained; its record cannot say
        state, note = STATUS_UNREADABLE, f"status.json {damage}; the numbers beside it come from its other files"
    if state == "refused":
        note = run.get("refusal") or "; ".join(run.get("errors", [])) or note
    config = read_yaml(run_dir / "config.yaml")
    if state == "running" and _owner_gone(config, run.get("run_id", "")):
        # The owner writes its final status before it releases the lease: a status read before the lease
        # was looked at may predate that write, so read it again before calling the owner gone.
        status = read_json(run_dir / "status.json")
        if status.get("state", state) == "running":
            state, note = OWNER_GONE, "its launcher and job are gone; run the same command again to resume it"
        else:
            state, note = status.get("state", state), status.get("reason") or ""
    lineage = run.get("lineage")
    if lineage:
        note = (
            f"lineage: {lineage_label(lineage)}"
            + "".join(f"; {c}" for c in lineage.get("recipe_changes", []))
            + (f"; {note}" if note else "")
        )
    attempts = status.get("attempts") or []
    peaks = [a["peak_memory_gb"] for a in attempts if a.get("peak_memory_gb") is not None]
    profile, gpu, ablation = config.get("profile", {}), config.get("gpu", {}), config.get("ablation", {})
    try:
        images_seen = (
            profile["max_train_steps"] * gpu["batch_size"] * gpu["gradient_accumulation_steps"] * gpu["num_gpus"]
        )
    except (KeyError, TypeError):
        images_seen = None
    return RunRow(
        images_seen=images_seen,
        step_basis=ablation.get("step_basis", "") if ablation.get("name", "none") != "none" else "",
        run_dir=run_dir,
        name=run.get("name", run_dir.name),
        ablation=run.get("ablation", {}).get("name", ""),
        run_id=run.get("run_id", ""),
        state=state,
        # Over all attempts: a resumed run is not faster than it was.
        duration_s=total_duration(attempts) if attempts else status.get("duration_s"),
        final_loss=final_loss,
        peak_memory_gb=max(peaks) if peaks else summary.get("peak_memory_gb"),
        note=note,
    )


def find_run_dirs(root: Path) -> list[Path]:
    if (root / "run.json").exists() or (root / POINTER_FILE).exists():
        return [root]
    found = {p.parent for p in root.rglob("run.json")} | {p.parent for p in root.rglob(POINTER_FILE)}
    return sorted(found, key=lambda p: p.name)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_summary(rows: list[RunRow], title: str, console: Console | None = None) -> None:
    # Piped output (logs, SLURM) gets a wide table instead of rich's 80-column default.
    console = console or Console(width=None if sys.stdout.isatty() else 200)
    bases = sorted({r.step_basis for r in rows if r.step_basis})
    if bases:  # the comparison basis of accumulating cells (ablation.step_basis) belongs with the numbers
        title = f"{title} (ablation.step_basis={', '.join(bases)})"
    table = Table(title=title)
    for column in ("run", "ablation", "state", "run id", "images seen", "time s", "final avg loss", "peak GB", "note"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(
            r.run_dir.name,
            r.ablation,
            r.state,
            r.run_id,
            "-" if r.images_seen is None else str(r.images_seen),
            _fmt(r.duration_s, ".1f"),
            _fmt(r.final_loss, ".4f"),
            _fmt(r.peak_memory_gb, ".2f"),
            r.note,
        )
    console.print(table)


class SweepDirRecorder(Callback):
    """Remembers the sweep directory in the launching process, where the summary is printed."""

    sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        SweepDirRecorder.sweep_dir = Path(config.hydra.sweep.dir)
