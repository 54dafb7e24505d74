"""launch.pack: the cells of a local sweep that can share a base train as one job, one adapter each.

Each cell is composed, checked, frozen and decided (skip, resume, start) under its own lease exactly as it is alone;
only its launch waits (`Packer.launch` records it and raises `Deferred`, the lease still held). Once Hydra has run
every cell's task (launch.py's cli), `run_waiting` groups the waiting runs by the engine's pack key and the
accelerate command they would run, and starts each group as one `accelerate launch` (job.launch_runs) whose job
trains every run of it; a group of one is a run alone. Each run's status, train.log, outputs and outcome stay its
own; what happens after a run ends (its line, its evaluation, its lease released) is the cell's `on_end`.

On SLURM (hydra/launcher=slurm) the same happens inside one SLURM job per group of cells (flux_lora.cluster's
PackedCells): the job runs its cells' tasks, then `run_waiting`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from flux_lora.lifecycle.job import ExpectedTraining, PlannedRun, launch_runs
from flux_lora.lifecycle.lease import Lease
from flux_lora.records import RunStatus
from flux_lora.snapshot import LaunchCommand

NATIVE_JOB = "flux_lora.engines.native.train"  # what follows it on the command line is the job's runs


class Deferred(Exception):  # noqa: N818 - not an error: the cell's launch waits for its pack
    """The cell's launch was recorded to run packed with others; its lease stays held until then."""


EndRun = Callable[[Path, RunStatus | None], None]  # (run folder, status; None: another launch took it over)


@dataclass
class WaitingRun:
    planned: PlannedRun
    command: LaunchCommand
    key: str | None  # None: it trains alone
    on_end: EndRun


class PackQueue:
    """The runs waiting for their packed job. `runs_here` is set by the process that starts them once its cells'
    tasks ran (launch.py's cli after Hydra's multirun, a packed SLURM job); a cell's task run anywhere else (a job of
    its own) launches as it would alone."""

    runs_here = False
    waiting: list[WaitingRun] = []


@dataclass
class Packer:
    """A cell's launch function (the shape of job.launch_run) when its sweep packs: it records the launch instead."""

    pack_key: Callable[[Path], str | None]
    on_end: EndRun

    def launch(
        self,
        run_dir: Path,
        command: LaunchCommand,
        expect: ExpectedTraining | None = None,
        finish: Callable[[], object] | None = None,
        lease: Lease | None = None,
        engine_record: dict | None = None,
    ) -> RunStatus:
        key = self.pack_key(run_dir) if NATIVE_JOB in command.argv else None
        planned = PlannedRun(Path(run_dir), expect, finish, lease, engine_record, label=f"[{Path(run_dir).name}] ")
        PackQueue.waiting.append(WaitingRun(planned, command, key, self.on_end))
        raise Deferred


def _split(command: LaunchCommand) -> tuple[list[str], list[str]]:
    """(accelerate and the job module, this run's arguments)."""
    at = command.argv.index(NATIVE_JOB) + 1
    return command.argv[:at], command.argv[at:]


def group_waiting(waiting: list[WaitingRun]) -> list[list[WaitingRun]]:
    """Runs with the same pack key and the same accelerate command (process count, precision, environment) share a
    job, in the order they were decided; a run alone, or one whose folder name a group already has, goes on its own."""
    groups: dict[tuple, list[WaitingRun]] = {}
    alone: list[list[WaitingRun]] = []
    for run in waiting:
        if run.key is None or "--num_processes" in run.command.argv and _num_processes(run.command) != 1:
            alone.append([run])  # several processes: every adapter's pass would need the others' all-reduce
            continue
        prefix, _ = _split(run.command)
        key = (run.key, tuple(prefix), run.command.cwd, tuple(sorted(run.command.env.items())))
        group = groups.setdefault(key, [])
        if any(other.planned.label == run.planned.label for other in group):
            alone.append([run])
        else:
            group.append(run)
    ordered = sorted([*groups.values(), *alone], key=lambda g: waiting.index(g[0]))
    return ordered


def _num_processes(command: LaunchCommand) -> int:
    argv = command.argv
    return int(argv[argv.index("--num_processes") + 1])


def packed_command(group: list[WaitingRun]) -> LaunchCommand:
    """One accelerate launch of the job with every run's folder (and state to resume from) in turn."""
    prefix, _ = _split(group[0].command)
    runs = [arg for run in group for arg in _split(run.command)[1]]
    return replace(group[0].command, argv=[*prefix, *runs])


def run_waiting(say: Callable[[str], None]) -> None:
    """Start every waiting group, one after another. A run that ends interrupted ends the sweep (its on_end exits,
    after every run of its group had its on_end); the leases of runs never started are released."""
    groups = group_waiting(PackQueue.waiting)
    PackQueue.waiting = []
    pending = [run for group in groups for run in group]
    try:
        for group in groups:
            if len(group) > 1:
                names = ", ".join(run.planned.run_dir.name for run in group)
                say(f"packed job: {len(group)} runs on one base: {names}")
            command = packed_command(group) if len(group) > 1 else group[0].command
            statuses = launch_runs([run.planned for run in group], command)
            exits: list[SystemExit] = []
            for run, status in zip(group, statuses):
                pending.remove(run)
                try:
                    run.on_end(run.planned.run_dir, status)
                except SystemExit as stop:
                    exits.append(stop)
            if exits:
                raise exits[0]
    finally:
        for run in pending:
            if run.planned.lease is not None:
                run.planned.lease.release()  # never started: the next launch decides it afresh
