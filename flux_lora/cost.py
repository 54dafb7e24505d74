"""Cost: how long a run will take and how many GPU-hours it costs, said before it starts.

Seconds per optimizer step come from this machine's finished runs of the same model, GPU tier and resolution
(the run index under paths.outputs/.runs: training seconds over the steps each attempt trained), else from a
stated per-tier estimate marked as such. A sweep's total sums its cells; cells run side by side (SLURM array
jobs, a GPU pool) shorten the wall time, never the GPU-hours. Each run records its estimate in run.json, and the
sweep's summary sets the estimate beside what the cells took. On SLURM, the same finished runs say how long a
stop takes (the longest step, sample image and state save), and a signal_delay_s too short for it is warned about.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from flux_lora.records import RUN_INDEX_DIR
from flux_lora.schema import Accelerator, RunConfig

# Rough seconds per optimizer step of FLUX.1-dev LoRA training at each tier's own settings (batch, accumulation,
# resolution, fp8, block swap), from public reports of kohya/ai-toolkit runs: an estimate, not a measurement.
TIER_ESTIMATE_S_PER_STEP = {"rtx4090": 8.0, "a6000": 7.0, "h100": 5.0, "h200": 4.0, "cpu": 1.0}
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class CostEstimate:
    steps: int
    s_per_step: float
    basis: str  # where s_per_step comes from, said with the figure
    measured: bool
    gpus: int  # GPUs the run holds; 0 on the CPU tier

    @property
    def seconds(self) -> float:
        return self.steps * self.s_per_step

    @property
    def gpu_hours(self) -> float:
        return self.seconds * self.gpus / 3600

    def line(self) -> str:
        hours = f"{self.gpu_hours:.2f} GPU-hours" if self.gpus else "no GPU (CPU tier)"
        return f"cost: {self.steps} steps x {self.s_per_step:.2f} s/step = {duration(self.seconds)}, {hours} ({self.basis})"

    def as_record(self) -> dict[str, Any]:
        return {**asdict(self), "seconds": round(self.seconds, 1), "gpu_hours": round(self.gpu_hours, 3)}


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _read(path: Path) -> Any:
    try:
        return (
            yaml.load(path.read_text(), Loader=_SAFE_LOADER) if path.suffix == ".yaml" else json.loads(path.read_text())
        )
    except (OSError, ValueError, yaml.YAMLError):
        return None


def run_seconds_per_step(run_dir: Path) -> float | None:
    """A finished run's training seconds per optimizer step over all its attempts; None when it did not succeed."""
    status = _read(run_dir / "status.json") or {}
    if status.get("state") != "succeeded":
        return None
    attempts = [a for a in status.get("attempts", []) if a.get("steps_trained")]
    if attempts and all(a.get("train_seconds") is not None for a in attempts):
        return sum(a["train_seconds"] for a in attempts) / sum(a["steps_trained"] for a in attempts)
    steps = ((_read(run_dir / "config.yaml") or {}).get("profile") or {}).get("max_train_steps")
    return status["duration_s"] / steps if status.get("duration_s") and steps else None


def measured_runs(outputs: Path, model: str, tier: str, resolution: int) -> list[float]:
    """Seconds per step of this machine's finished runs with the same model, tier and resolution."""
    return [rate for d in runs_like(outputs, model, tier, resolution) if (rate := run_seconds_per_step(d)) is not None]


# SLURM checks its limits every 30 s: the warning before the time limit can come this much later than signal_delay_s.
SLURM_SIGNAL_SLACK_S = 30


def runs_like(outputs: Path, model: str, tier: str, resolution: int) -> list[Path]:
    """This machine's run folders with the same model, tier and resolution (from the run index)."""
    found: list[Path] = []
    for index in sorted((Path(outputs) / RUN_INDEX_DIR).glob("*.txt")):
        for line in dict.fromkeys(index.read_text().splitlines()):
            config = _read(Path(line) / "config.yaml") or {}
            same = (
                (config.get("model") or {}).get("name"),
                (config.get("gpu") or {}).get("name"),
                (config.get("profile") or {}).get("resolution"),
            )
            if same == (model, tier, resolution):
                found.append(Path(line))
    return found


def stop_lead_needed(run: RunConfig) -> tuple[float, str] | None:
    """How long before the time limit a stop must come so the job can finish its step, a sample image and a state
    save (the longest of each in this machine's runs like this one), and what that figure is made of; None when no
    run here recorded it."""
    leads = [
        lead
        for d in runs_like(Path(run.paths.outputs), run.model.name, run.gpu.name, run.profile.resolution)
        if isinstance(lead := (_read(d / "output" / "train_summary.json") or {}).get("stop_lead_s"), dict)
    ]
    if not leads:
        return None
    parts = {name: max(float(lead.get(name) or 0) for lead in leads) for name in ("step", "sample_image", "save")}
    made_of = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in parts.items())
    return sum(parts.values()), f"the longest {made_of} in {len(leads)} run(s) here"


def signal_delay_warning(run: RunConfig, signal_delay_s: int) -> str | None:
    """A warning when SLURM's warning before the time limit may come too late for the job to save its state."""
    needed = stop_lead_needed(run)
    if needed is None:
        return None
    seconds, made_of = needed
    lead = signal_delay_s - SLURM_SIGNAL_SLACK_S
    if lead >= seconds:
        return None
    advice = int(seconds + SLURM_SIGNAL_SLACK_S + 0.999)
    return (
        f"hydra.launcher.signal_delay_s={signal_delay_s} leaves at worst {lead} s before the time limit, and a stop here "
        f"needs {seconds:.0f} s ({made_of}, gpu={run.gpu.name}): the job may be killed unsaved; set it to at least {advice}"
    )


def estimate_cost(run: RunConfig) -> CostEstimate:
    gpus = run.gpu.num_gpus if run.gpu.accelerator == Accelerator.cuda else 0
    rates = measured_runs(Path(run.paths.outputs), run.model.name, run.gpu.name, run.profile.resolution)
    if rates:
        where = f"median of {len(rates)} finished run(s) here: {run.model.name}, gpu={run.gpu.name}, {run.profile.resolution} px"
        return CostEstimate(run.profile.max_train_steps, statistics.median(rates), where, True, gpus)
    rate = TIER_ESTIMATE_S_PER_STEP.get(run.gpu.name, max(TIER_ESTIMATE_S_PER_STEP.values()))
    where = f"per-tier estimate for gpu={run.gpu.name}, not measured here: no finished run of this model, tier and resolution yet"
    return CostEstimate(run.profile.max_train_steps, rate, where, False, gpus)


def sweep_cost_line(estimates: list[CostEstimate], parallel: int) -> str:
    total = sum(e.seconds for e in estimates)
    wall = total / max(1, min(parallel, len(estimates)))
    side = (
        f"; {min(parallel, len(estimates))} side by side: about {duration(wall)} of wall time" if parallel > 1 else ""
    )
    gpu_hours = sum(e.gpu_hours for e in estimates)
    measured = sum(e.measured for e in estimates)
    return (
        f"sweep cost: {len(estimates)} cells, {duration(total)} in all{side}, {gpu_hours:.2f} GPU-hours "
        f"({measured} of {len(estimates)} from measured runs, the rest per-tier estimates)"
    )


def own_seconds(status: dict) -> float:
    """A run's share of the time its attempts took: an attempt of a packed job (launch.pack) trained its runs
    together, so each of them counts its duration once between them."""
    attempts = [a for a in status.get("attempts") or [] if a.get("duration_s") is not None]
    if not attempts:
        return float(status.get("duration_s") or 0.0)
    return sum(a["duration_s"] / (1 + len(a.get("packed_with") or [])) for a in attempts)


def estimated_and_took(rows_dirs: list[Path]) -> str | None:
    """After a sweep: the estimate beside what its cells took (cells that recorded an estimate and ran)."""
    estimated = took = 0.0
    counted = 0
    for run_dir in rows_dirs:
        record = (_read(run_dir / "run.json") or {}).get("cost_estimate")
        status = _read(run_dir / "status.json") or {}
        if record and status.get("duration_s") is not None:
            estimated, took, counted = estimated + record["seconds"], took + own_seconds(status), counted + 1
    if not counted:
        return None
    return f"cost: estimated {duration(estimated)} for the {counted} cell(s) that ran, took {duration(took)} ({took / max(estimated, 1e-9):.2f}x)"


def sweep_cells(config: Any) -> list[list[str]]:
    """The override list of each cell of the multirun about to start (its sweeper params, then the command line)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = config.hydra.sweeper.get("params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()] + list(config.hydra.overrides.task)
    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(arguments), None)
    return [list(cell) for batch in batches for cell in batch]


def parallel_slots(config: Any) -> int:
    """How many cells the chosen launcher runs side by side (1 for Hydra's basic launcher)."""
    launcher = config.hydra.get("launcher") or {}
    target = str(launcher.get("_target_", ""))
    if "Slurm" in target:
        return int(launcher.get("array_parallelism") or 1)
    if "LocalGpuPool" in target:
        devices = launcher.get("devices")
        return max(1, len(devices) // max(1, int(launcher.get("gpus_per_node") or 1))) if devices else 1
    return 1


class SweepCostPreview(Callback):
    """Before a multirun starts its cells: each cell's cost and the sweep's total (composed as each cell will be)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra import compose

        from flux_lora.compose import load_run

        try:
            cells = sweep_cells(config)
            runs = [load_run(compose(config_name=str(config.hydra.job.config_name), overrides=cell)) for cell in cells]
            estimates = [estimate_cost(run) for run in runs]
        except Exception as exc:  # noqa: BLE001 - a preview must never stop the sweep; each cell still says its own cost
            print(
                f"warning: no sweep cost preview ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            )
            return
        print(sweep_cost_line(estimates, parallel_slots(config)))
        launcher = config.hydra.get("launcher") or {}
        if "Slurm" in str(launcher.get("_target_", "")) and launcher.get("signal_delay_s") is not None:
            for warning in dict.fromkeys(
                w for run in runs if (w := signal_delay_warning(run, int(launcher.signal_delay_s)))
            ):
                print(f"warning: {warning}")
