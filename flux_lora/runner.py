"""Launch: start the frozen run as an `accelerate launch` subprocess and record how it ended.

The child gets an argument list (never a shell string); its output is streamed to the console
and to `train.log` with secret values redacted; `status.json` says what happened. SIGINT and
SIGTERM (Ctrl-C, SLURM's cancel or time limit) and SIGUSR2 (submitit's warning before the time limit,
sent on as SIGTERM) are forwarded to the job, which is then marked interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from types import FrameType
from typing import Callable, Optional

from flux_lora.check import CheckReport
from flux_lora.engines.base import EngineInputs
from flux_lora.outcome import gather_evidence, training_shortfall
from flux_lora.schema import Accelerator, RunConfig
from flux_lora.snapshot import FrozenRun, LaunchCommand, redact, secret_values

STATUS_FILE = "status.json"
LOG_FILE = "train.log"


class RunState(str, Enum):
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    interrupted = "interrupted"
    refused = "refused"
    dry_run = "dry_run"


@dataclass
class RunStatus:
    state: RunState
    exit_code: Optional[int] = None
    started: Optional[str] = None
    ended: Optional[str] = None
    duration_s: Optional[float] = None
    reason: Optional[str] = None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_status(run_dir: Path, status: RunStatus) -> None:
    data = asdict(status)
    data["state"] = status.state.value
    (run_dir / STATUS_FILE).write_text(json.dumps(data, indent=2) + "\n")


def read_status(run_dir: Path) -> Optional[RunStatus]:
    path = run_dir / STATUS_FILE
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    data["state"] = RunState(data["state"])
    return RunStatus(**data)


def accelerate_argv(run: RunConfig, inputs: EngineInputs) -> list[str]:
    """`accelerate launch` with the tier's process count, precision and device flags, then the job."""
    gpu = run.gpu
    argv = [
        run.engine.python or sys.executable, "-m", "accelerate.commands.launch",
        "--num_machines", "1",
        "--num_processes", str(gpu.num_gpus),
        "--mixed_precision", run.profile.mixed_precision.value,
        "--dynamo_backend", "no",
    ]  # fmt: skip
    if gpu.accelerator == Accelerator.cpu:
        argv += ["--cpu", "--num_cpu_threads_per_process", str(os.cpu_count() or 1)]
    elif gpu.num_gpus > 1:
        argv.append("--multi_gpu")
    return argv + list(inputs.script_argv)


def launch_command(run: RunConfig, inputs: EngineInputs) -> LaunchCommand:
    # Unbuffered, so the job's lines reach the log as they happen.
    return LaunchCommand(argv=accelerate_argv(run, inputs), cwd=inputs.cwd, env={"PYTHONUNBUFFERED": "1", **inputs.env})


def refuse_run(run_dir: Path, reason: str) -> RunStatus:
    status = RunStatus(state=RunState.refused, reason=reason, ended=_now())
    write_status(run_dir, status)
    return status


def mark_dry_run(run_dir: Path) -> RunStatus:
    status = RunStatus(state=RunState.dry_run, reason="launch.dry_run=true: frozen, not started", ended=_now())
    write_status(run_dir, status)
    return status


@dataclass(frozen=True)
class ExpectedTraining:
    """What the run's artefacts must show for it to count as succeeded (outcome.py)."""

    max_train_steps: int
    output_name: str


def launch_run(
    run_dir: Path,
    command: LaunchCommand,
    expect: Optional[ExpectedTraining] = None,
    finish: Optional[Callable[[], list[str]]] = None,
) -> RunStatus:
    started_at = time.monotonic()
    status = RunStatus(state=RunState.running, started=_now())
    write_status(run_dir, status)
    secrets = secret_values()
    env = {**os.environ, **command.env}

    # A session of its own, so a terminal's Ctrl-C reaches only us and we decide how the job stops.
    child = subprocess.Popen(
        command.argv, cwd=command.cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, errors="replace", bufsize=1, start_new_session=True,
    )  # fmt: skip
    interrupted = False

    def forward(signum: int, _frame: Optional[FrameType]) -> None:
        nonlocal interrupted
        interrupted = True
        try:
            os.killpg(child.pid, signal.SIGTERM if signum == signal.SIGUSR2 else signum)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)}
    try:
        with open(run_dir / LOG_FILE, "a", encoding="utf-8") as log:
            assert child.stdout is not None
            for line in child.stdout:
                line = redact(line, secrets)
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
                log.flush()
        exit_code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

    if finish is not None:
        finish()  # e.g. a resumed sd-scripts attempt's files renumbered before they are judged
    reason: Optional[str] = None
    if interrupted:
        state = RunState.interrupted
    elif exit_code != 0:
        state, reason = RunState.failed, f"exit code {exit_code}; see {run_dir / LOG_FILE}"
    else:
        # Exit 0 proves nothing: the artefacts must show every step trained into a LoRA.
        reason = training_shortfall(gather_evidence(run_dir, expect.output_name), expect.max_train_steps) if expect else None
        state = RunState.failed if reason else RunState.succeeded
    status = RunStatus(
        state=state,
        exit_code=exit_code,
        started=status.started,
        ended=_now(),
        duration_s=round(time.monotonic() - started_at, 2),
        reason=reason if state != RunState.interrupted else f"stopped by a signal; see {run_dir / LOG_FILE}",
    )
    write_status(run_dir, status)
    return status


def start_run(
    frozen: FrozenRun,
    report: CheckReport,
    *,
    dry_run: bool,
    expect: Optional[ExpectedTraining] = None,
    finish: Optional[Callable[[], list[str]]] = None,
) -> RunStatus:
    """Refuse, stop after freezing (dry run), or launch: the one place that decides."""
    if report.errors:
        return refuse_run(frozen.run_dir, "; ".join(report.errors))
    if report.refusal:
        return refuse_run(frozen.run_dir, report.refusal)
    if dry_run:
        return mark_dry_run(frozen.run_dir)
    assert frozen.command is not None
    return launch_run(frozen.run_dir, frozen.command, expect, finish)
