"""Resume: which saved state a run continues from, and what to do with an earlier run of the same id.

A run's identity is its run id (a hash of the semantic config and the training set), so asking for
the same run again finds it under the outputs root, whichever sweep or run folder holds it:
  - succeeded                      -> skip it (it is done);
  - running, its launcher alive    -> refuse (another launch is training it, maybe on another node);
  - interrupted, failed, or left `running` by a dead launcher, with a usable saved state
                                   -> resume it in its own folder from its newest usable state;
  - anything else                  -> start a new run.
A state is usable when its manifest (sizes and hashes, written last) matches its files; states that
sd-scripts wrote (no manifest) need train_state.json and accelerate's files, non-empty. A corrupt or
half-written newest state is passed over for the one before, and the choice says so.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Optional

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
