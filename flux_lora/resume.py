"""Resume: which saved state a run continues from, and what to do with an earlier run of the same id.

A run's identity is its run id (a hash of the semantic config and the training set), so asking for
the same run again finds it under the outputs root, whichever sweep or run folder holds it:
  - succeeded                      -> skip it (it is done);
  - running, its launcher alive    -> refuse (another launch is training it, maybe on another node);
  - interrupted, failed, or left `running` by a dead launcher, with a usable saved state
                                   -> resume it in its own folder from its newest usable state;
  - anything else                  -> start a new run.
`continue_known_run` carries the decision out for `launch.resume=auto`.
A state is usable when its manifest (sizes and hashes, written last) matches its files; states that
sd-scripts wrote (no manifest) need train_state.json and accelerate's files, non-empty. A corrupt or
half-written newest state is passed over for the one before, and the choice says so.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Optional

import yaml

from flux_lora.checkpoint_files import MANIFEST, state_problem
from flux_lora.runner import RunState, RunStatus, owner_alive, read_status

TRAIN_STATE_FILE = "train_state.json"
# What accelerate.save_state writes besides the model: a state without them cannot restore training.
ACCELERATE_STATE_FILES = ("optimizer.bin", "random_states_0.pkl")
_STEP_STATE = re.compile(r"^(?P<name>.+)-step(?P<step>\d{8})-state$")


@dataclass(frozen=True)
class SavedState:
    path: Path
    step: Optional[int]
    problem: Optional[str]  # None when usable


def state_usability(state_dir: Path) -> Optional[str]:
    """None if the state can be resumed from; else one line saying why not."""
    if (state_dir / MANIFEST).is_file():
        return state_problem(state_dir)
    if not (state_dir / TRAIN_STATE_FILE).is_file():
        return f"{state_dir.name}: no {TRAIN_STATE_FILE} (not a finished training state)"
    for name in ACCELERATE_STATE_FILES:
        path = state_dir / name
        if not path.is_file() or path.stat().st_size == 0:
            return f"{state_dir.name}: {name} missing or empty (written partly)"
    return None


def _state_step(state_dir: Path) -> Optional[int]:
    try:
        return int(json.loads((state_dir / TRAIN_STATE_FILE).read_text())["current_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def saved_states(output_dir: Path, output_name: str) -> list[SavedState]:
    """The run's states, newest first (by their recorded step; the final state last among equals)."""
    found: list[SavedState] = []
    if not output_dir.is_dir():
        return found
    for folder in output_dir.iterdir():
        match = _STEP_STATE.match(folder.name)
        if folder.is_dir() and ((match and match["name"] == output_name) or folder.name == f"{output_name}-state"):
            step = _state_step(folder)
            if step is None and match:
                step = int(match["step"])
            found.append(SavedState(folder, step, state_usability(folder)))
    return sorted(found, key=lambda s: (s.step or -1, s.path.name.endswith(f"{output_name}-state")), reverse=True)


@dataclass(frozen=True)
class StateChoice:
    state: Optional[SavedState]
    passed_over: list[SavedState] = field(default_factory=list)  # newer states that were not usable

    def notes(self) -> list[str]:
        return [f"passed over {s.path.name} (step {s.step}): {s.problem}" for s in self.passed_over]


def choose_state(output_dir: Path, output_name: str) -> StateChoice:
    states = saved_states(output_dir, output_name)
    passed: list[SavedState] = []
    for state in states:
        if state.problem is None:
            return StateChoice(state, passed)
        passed.append(state)
    return StateChoice(None, passed)


def latest_good_state(run_dir: Path, output_name: str) -> Optional[str]:
    choice = choose_state(Path(run_dir) / "output", output_name)
    return str(choice.state.path) if choice.state else None


class Decision(str, Enum):
    start = "start"
    skip = "skip"
    resume = "resume"
    busy = "busy"


@dataclass(frozen=True)
class ResumeDecision:
    decision: Decision
    run_dir: Optional[Path] = None
    state: Optional[SavedState] = None
    notes: list[str] = field(default_factory=list)


def find_runs_with_id(outputs: Path, run_id: str) -> list[Path]:
    """Run folders under the outputs root whose run.json holds this run id."""
    found = []
    for record in outputs.rglob("run.json") if outputs.is_dir() else []:
        try:
            if json.loads(record.read_text()).get("run_id") == run_id:
                found.append(record.parent)
        except (OSError, ValueError):
            continue
    return sorted(found)


def decide(earlier: list[Path], output_name: str) -> ResumeDecision:
    """What a launch of an already-known run id does, given the folders that froze it."""
    statuses: list[tuple[Path, RunStatus]] = [(d, s) for d in earlier if (s := read_status(d)) is not None]
    done = [d for d, s in statuses if s.state == RunState.succeeded]
    if done:
        return ResumeDecision(Decision.skip, done[0])
    live = [(d, s) for d, s in statuses if s.state == RunState.running and owner_alive(s)]
    if live:
        d, s = live[0]
        return ResumeDecision(Decision.busy, d, notes=[f"pid {s.pid} on {s.host} is training it (heartbeat {s.heartbeat})"])
    resumable = (RunState.interrupted, RunState.failed, RunState.running)
    best: Optional[tuple[Path, StateChoice]] = None
    notes: list[str] = []
    for d, s in statuses:
        if s.state not in resumable:
            continue
        choice = choose_state(d / "output", output_name)
        notes += [f"{d.name}: {n}" for n in choice.notes()]
        if choice.state and (best is None or (choice.state.step or 0) > (best[1].state.step or 0)):
            best = (d, choice)
    if best is None:
        return ResumeDecision(Decision.start, notes=notes)
    return ResumeDecision(Decision.resume, best[0], best[1].state, notes)


class RunNotStartable(RuntimeError):
    """This launch cannot go on (a live run holds the id, or the sweep cell's folder holds another config)."""


def changed_cell(cell_dir: Path, resolved: dict) -> Optional[str]:
    """A sweep run again into its own folder whose cell's config changed since: what changed (nothing is touched)."""
    from flux_lora.snapshot import config_differences

    if not ((cell_dir / "config.yaml").is_file() and (cell_dir / "run.json").is_file()):
        return None
    changed = config_differences(yaml.safe_load((cell_dir / "config.yaml").read_text()), resolved)
    return (
        f"{cell_dir}: holds a run of another config ({'; '.join(changed[:6]) or 'the dataset content changed'}); "
        "run the sweep into a new folder (omit hydra.sweep.dir) or restore those values"
    )


def continue_known_run(run, engine, report, cell_dir: Path, run_id: str, resolved: dict, expect):
    """For launch.resume=auto: None when the run id is new here (start it); else (its folder, status) where status is
    None for a run skipped as done and the resumed attempt's status otherwise. Raises RunNotStartable."""
    from flux_lora.check import print_check_report
    from flux_lora.runner import launch_command, launch_run
    from flux_lora.snapshot import write_pointer

    decision = decide(find_runs_with_id(Path(run.paths.outputs), run_id), run.launch.output_name)
    for note in decision.notes:
        print(f"info: {note}")
    home = decision.run_dir
    if decision.decision == Decision.start:
        changed = changed_cell(cell_dir, resolved)
        if changed:
            raise RunNotStartable(changed)
        return None
    if decision.decision == Decision.skip:
        print(f"skipped: done: run {run_id} succeeded in {home}")
        if home != cell_dir:
            write_pointer(cell_dir, "skipped: done", home, run_id)
        return home, None
    if decision.decision == Decision.busy:
        if home != cell_dir:
            write_pointer(cell_dir, "busy", home, run_id)
        raise RunNotStartable(f"run {run_id} is being trained in {home} ({decision.notes[0]}); wait for it or stop it first")
    state = decision.state
    print_check_report(report)
    print(f"resuming run {run_id} in {home} from {state.path.name} (step {state.step})")
    resumed = dataclasses.replace(run, launch=dataclasses.replace(run.launch, resume_from=str(state.path)))
    inputs = engine.render(resumed, home, report.not_applied)
    problems = engine.check_inputs(resumed, inputs)
    if problems:
        raise RunNotStartable(f"cannot resume {home}: {problems[0]}")
    if home != cell_dir:
        write_pointer(cell_dir, "resumed", home, run_id)
    expect = dataclasses.replace(expect, from_step=state.step or 0)
    status = launch_run(home, launch_command(resumed, inputs), expect, finish=lambda: engine.finish_attempt(resumed, home))
    return home, status
