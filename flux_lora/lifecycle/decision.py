"""Decision: what a launch holding its run id's lease does with the runs of that id seen before.

A run's identity is its run id (a hash of the semantic config, the training set and its lineage), so
asking for the same run again finds it under the outputs root, whichever sweep or run folder holds it,
and in the cell's own folder wherever that is:
  - succeeded, or its final state at max_train_steps and final LoRA complete whatever its status says (a
    late signal, a lost status.json) -> skip it (it is done; its status is corrected to succeeded);
  - interrupted, failed, or left `running` by an owner that is gone (we hold the lease, so nobody
    else runs it), with a usable saved state -> resume it in its own folder from its newest usable state;
  - interrupted or left `running` before it saved anything -> train it again from step 0 in its own folder
    (a SLURM requeue comes back to the same folder, whenever the signal came);
  - anything else                  -> start a new run.
A dead owner's open attempt is closed in status.json first, and what it left past the resumed state is
set aside. An unreadable status.json never hides the states beside it: it is kept aside and the folder is
judged by what it saved. A resume renders the engine's inputs again and refuses when they differ from the frozen ones
(or the engine's code changed): the run would not train what its record says.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path

import yaml

from flux_lora.check_report import print_check_report
from flux_lora.identity import config_differences
from flux_lora.lifecycle.job import ExpectedTraining, launch_command, launch_run
from flux_lora.lifecycle.lease import Lease
from flux_lora.lifecycle.slurm import queued_elsewhere
from flux_lora.lifecycle.states import SavedState, StateChoice, choose_state, finished_state, set_aside_strays
from flux_lora.records import (
    STATUS_FILE,
    RunState,
    RunStatus,
    close_dead_attempt,
    now_iso,
    read_status,
    registered_run_dirs,
    write_pointer,
    write_status,
)
from flux_lora.redaction import redact, secret_values


class Decision(str, Enum):
    start = "start"
    skip = "skip"
    resume = "resume"


@dataclass(frozen=True)
class ResumeDecision:
    decision: Decision
    run_dir: Path | None = None
    state: SavedState | None = None
    notes: list[str] = field(default_factory=list)


class RunNotStartable(RuntimeError):
    """This launch cannot go on (its run cannot be resumed as recorded, or the cell's folder holds another config)."""


def _run_id_of(folder: Path) -> str | None:
    try:
        return json.loads((folder / "run.json").read_text()).get("run_id")
    except (OSError, ValueError):
        return None


def find_runs_with_id(outputs: Path, run_id: str, also: Iterable[Path] = ()) -> list[Path]:
    """Run folders whose run.json holds this id: under the outputs root, in its index of run folders (a sweep
    outside it), and any of `also` (the cell's own folder)."""
    found = {record.parent for record in outputs.rglob("run.json")} if outputs.is_dir() else set()
    found |= {
        Path(folder)
        for folder in [*registered_run_dirs(outputs, run_id), *also]
        if (Path(folder) / "run.json").is_file()
    }
    return sorted(folder for folder in found if _run_id_of(folder) == run_id)


def close_dead_attempts(folders: list[Path], why: str) -> list[str]:
    """With the lease held, a folder of this id still `running` was left by an owner that is gone: close it."""
    return [
        f"{folder}: closed the attempt left running ({why})" for folder in folders if close_dead_attempt(folder, why)
    ]


def decide(earlier: list[Path], output_name: str, max_train_steps: int | None = None) -> ResumeDecision:
    """What a launch of an already-known run id does, given the folders that froze it (their owners are gone).
    A folder whose status.json cannot be read (a crash while it was replaced) is judged by the states beside it."""
    statuses: list[tuple[Path, RunStatus | None]] = [(d, read_status(d)) for d in earlier]
    done = [d for d, s in statuses if s is not None and s.state == RunState.succeeded]
    if done:
        return ResumeDecision(Decision.skip, done[0])
    notes: list[str] = [
        f"{d.name}: {STATUS_FILE} cannot be read; going by the states saved beside it"
        for d, s in statuses
        if s is None and (d / STATUS_FILE).exists()
    ]
    if max_train_steps is not None:
        for d, _ in statuses:
            final = finished_state(d / "output", output_name, max_train_steps)
            if final is not None:  # stopped (or its record lost) after the final save: done, never trained again
                notes.append(f"{d.name}: finished (final state at step {final.step} and the final LoRA are complete)")
                return ResumeDecision(Decision.skip, d, final, notes)
    resumable = (RunState.interrupted, RunState.failed, RunState.running)
    best: tuple[Path, StateChoice] | None = None
    unsaved: Path | None = None  # stopped before its first state: trained again in its own folder
    for d, s in statuses:
        if s is not None and s.state not in resumable:
            continue
        if s is None and not (d / STATUS_FILE).exists():
            # Frozen, never started (a launcher killed before it started the job, or while the cell waited for its
            # packed job): started in its own folder. A dry run's folder has a status.
            unsaved = unsaved or d
            continue
        choice = choose_state(d / "output", output_name, max_train_steps)
        notes += [f"{d.name}: {n}" for n in choice.notes()]
        if choice.state and (best is None or (choice.state.step or 0) > (best[1].state.step or 0)):
            best = (d, choice)
        elif choice.state is None and (s is None or s.state != RunState.failed) and unsaved is None:
            unsaved = d
    if best is None and unsaved is not None:
        return ResumeDecision(Decision.resume, unsaved, None, notes)
    if best is None:
        return ResumeDecision(Decision.start, notes=notes)
    return ResumeDecision(Decision.resume, best[0], best[1].state, notes)


def keep_unreadable_status(run_dir: Path) -> Path | None:
    """Move an unreadable status.json aside (never deleted: it may hold what a person can still read); its path."""
    path = run_dir / STATUS_FILE
    if not path.exists() or read_status(run_dir) is not None:
        return None
    aside = run_dir / f"{STATUS_FILE}.unreadable-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}"
    os.replace(path, aside)
    return aside


def record_finished(run_dir: Path, why: str) -> None:
    """A run found finished whose status says otherwise: say succeeded, keeping its attempts."""
    previous = read_status(run_dir)
    write_status(
        run_dir,
        RunStatus(
            state=RunState.succeeded,
            exit_code=previous.exit_code if previous else None,
            started=previous.started if previous else None,
            ended=now_iso(),
            duration_s=previous.duration_s if previous else None,
            reason=why,
            host=previous.host if previous else None,
            attempts=previous.attempts if previous else [],
        ),
    )


def changed_cell(cell_dir: Path, resolved: dict, run_id: str) -> str | None:
    """A sweep run again into its own folder whose cell's config changed since: what changed (nothing is touched)."""
    if (
        not ((cell_dir / "config.yaml").is_file() and (cell_dir / "run.json").is_file())
        or _run_id_of(cell_dir) == run_id
    ):
        return None
    changed = config_differences(yaml.safe_load((cell_dir / "config.yaml").read_text()), resolved)
    what = (
        "; ".join(changed[:6])
        or "the same config, another training set (the dataset's content or a held-out image changed)"
    )
    return (
        f"{cell_dir}: holds a run of another config ({what}); "
        "launch into a new folder (omit hydra.run.dir / hydra.sweep.dir) or restore those values"
    )


def inputs_drift(run, engine, home: Path, inputs) -> str | None:
    """Why this attempt would not train what the run's record says (its frozen inputs, its engine's code); None if it would."""
    secrets = secret_values()
    for name, text in inputs.files.items():
        frozen = home / name
        if frozen.is_file() and frozen.read_text() != redact(text, secrets):
            return f"{name} would differ from the one frozen in {home} (a path, engine.python or another setting outside the recipe changed)"
    try:
        recorded = json.loads((home / "repro.json").read_text()).get("engine") or {}
    except (OSError, ValueError):
        return None
    current = engine.version_record(run)
    ignore = ("sd_scripts_dir", "matches_pin", "pinned_commit")  # where the checkout lies is not what it trains
    changed = [
        f"{k}: {recorded.get(k)!r} -> {current.get(k)!r}"
        for k in sorted(current)
        if k not in ignore and recorded.get(k) != current.get(k)
    ]
    return f"the engine's code changed since the run started ({'; '.join(changed)})" if changed else None


def continue_known_run(
    run,
    engine,
    report,
    cell_dir: Path,
    run_id: str,
    resolved: dict,
    expect: ExpectedTraining,
    lease: Lease,
    launch: Callable[..., RunStatus] = launch_run,  # or a packed sweep's (lifecycle.packing)
):
    """For launch.resume=auto: None when the run id is new here (start it); else (its folder, status) where status is
    None for a run skipped as done and the resumed attempt's status otherwise. Raises RunNotStartable."""
    earlier = find_runs_with_id(Path(run.paths.outputs), run_id, also=[cell_dir])
    owner = f"its owner {lease.took_over.describe()} is gone" if lease.took_over else "its owner is gone"
    for note in close_dead_attempts(earlier, owner):
        print(f"info: {note}")
    for folder in earlier:
        status = read_status(folder)
        queued = (
            queued_elsewhere(status.attempts[-1])
            if status and status.state == RunState.interrupted and status.attempts
            else None
        )
        if queued:  # requeued by SLURM and waiting to start again: it resumes itself
            if folder != cell_dir:
                write_pointer(cell_dir, "busy", folder, run_id, note=f"queued as SLURM job {queued}")
            raise RunNotStartable(
                f"run {run_id} in {folder} is queued as SLURM job {queued} to resume; it will go on by itself"
            )
    decision = decide(earlier, run.launch.output_name, run.profile.max_train_steps)
    for note in decision.notes:
        print(f"info: {note}")
    home = decision.run_dir
    if decision.decision == Decision.start:
        changed = changed_cell(cell_dir, resolved, run_id)
        if changed:
            raise RunNotStartable(changed)
        return None
    if home is not None:
        kept = keep_unreadable_status(home)
        if kept:
            print(f"info: {home / STATUS_FILE} could not be read: kept as {kept.name}")
    if decision.decision == Decision.skip:
        previous = read_status(home)
        if previous is None or previous.state != RunState.succeeded:
            record_finished(
                home, f"finished: the final state at step {run.profile.max_train_steps} and the final LoRA are complete"
            )
        print(f"skipped: done: run {run_id} succeeded in {home}")
        if home != cell_dir:
            write_pointer(cell_dir, "skipped: done", home, run_id)
        return home, None
    state = decision.state
    assert home is not None
    from_step = (state.step or 0) if state else 0
    resumed = dataclasses.replace(
        run, launch=dataclasses.replace(run.launch, resume_from=str(state.path) if state else None)
    )
    inputs = engine.render(resumed, home, report.not_applied)
    problems = engine.check_inputs(resumed, inputs)
    drift = inputs_drift(resumed, engine, home, inputs)
    if problems or drift:
        raise RunNotStartable(f"cannot resume {home}: {problems[0] if problems else drift}")
    print_check_report(report)
    previous = read_status(home)
    attempt = len(previous.attempts) if previous else 0
    aside = set_aside_strays(home / "output", run.launch.output_name, from_step, attempt)
    if aside:
        print(
            f"info: set aside what attempt {attempt} left past step {from_step}: {', '.join(aside)} (output/set-aside/attempt-{attempt})"
        )
    if state:
        print(f"resuming run {run_id} in {home} from {state.path.name} (step {state.step})")
    else:
        print(f"restarting run {run_id} in {home} from step 0: it stopped before saving a state")
    if home != cell_dir:
        write_pointer(cell_dir, "resumed", home, run_id)
    expect = dataclasses.replace(expect, from_step=from_step)
    status = launch(
        home,
        launch_command(resumed, inputs),
        expect,
        finish=lambda: engine.finish_attempt(resumed, home),
        lease=lease,
        engine_record=engine.version_record(resumed),
    )
    return home, status
