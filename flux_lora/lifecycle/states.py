"""Saved training states: which one a run can continue from, and what a dead attempt left beside them.

A state is usable when its manifest (sizes and hashes, written last) matches its files; states that
sd-scripts wrote (no manifest) need train_state.json and accelerate's files, non-empty. A corrupt or
half-written newest state is passed over for the one before, and the choice says so. A final state
(`<name>-state`) at the last step whose LoRA is missing (killed between the two saves) cannot be
resumed (nothing is left to train), so it is passed over too: the step before writes the LoRA again.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from flux_lora.checkpoint_files import MANIFEST, STAGING_PREFIX, state_problem
from flux_lora.records import ASIDE_FOLDER

TRAIN_STATE_FILE = "train_state.json"
# What accelerate.save_state writes besides the model: a state without them cannot restore training.
ACCELERATE_STATE_FILES = ("optimizer.bin", "random_states_0.pkl")
_STEP_FILE = re.compile(r"^(?P<name>.+)-step(?P<step>\d{8})(?P<rest>-state|\.safetensors)$")


@dataclass(frozen=True)
class SavedState:
    path: Path
    step: int | None
    problem: str | None  # None when usable


def state_usability(state_dir: Path) -> str | None:
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


def state_step(state_dir: Path) -> int | None:
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
        match = _STEP_FILE.match(folder.name)
        is_step_state = bool(match and match["name"] == output_name and match["rest"] == "-state")
        if folder.is_dir() and (is_step_state or folder.name == f"{output_name}-state"):
            step = state_step(folder)
            if step is None and match:
                step = int(match["step"])
            found.append(SavedState(folder, step, state_usability(folder)))
    return sorted(found, key=lambda s: (s.step or -1, s.path.name.endswith(f"{output_name}-state")), reverse=True)


@dataclass(frozen=True)
class StateChoice:
    state: SavedState | None
    passed_over: list[SavedState] = field(default_factory=list)  # newer states that were not usable

    def notes(self) -> list[str]:
        return [f"passed over {s.path.name} (step {s.step}): {s.problem}" for s in self.passed_over]


def choose_state(output_dir: Path, output_name: str, max_train_steps: int | None = None) -> StateChoice:
    """The newest usable state; with max_train_steps, a state with nothing left to train is passed over."""
    passed: list[SavedState] = []
    for state in saved_states(output_dir, output_name):
        if state.problem is None and max_train_steps is not None and (state.step or 0) >= max_train_steps:
            lora = output_dir / f"{output_name}.safetensors"
            why = "the final LoRA is missing (stopped between saving the state and the LoRA); the step before writes it again"
            state = SavedState(
                state.path,
                state.step,
                f"at the last step, nothing left to train: {why}" if not lora.is_file() else "finished",
            )
        if state.problem is None:
            return StateChoice(state, passed)
        passed.append(state)
    return StateChoice(None, passed)


def finished_state(output_dir: Path, output_name: str, max_train_steps: int) -> SavedState | None:
    """The final state, complete and at max_train_steps, beside the final LoRA: the run is done, whatever exit
    code or status a late signal or a crash left."""
    final = Path(output_dir) / f"{output_name}-state"
    lora = Path(output_dir) / f"{output_name}.safetensors"
    if not (final.is_dir() and lora.is_file() and lora.stat().st_size > 0):
        return None
    state = SavedState(final, state_step(final), state_usability(final))
    return state if state.problem is None and state.step == max_train_steps else None


def latest_good_state(run_dir: Path, output_name: str) -> str | None:
    choice = choose_state(Path(run_dir) / "output", output_name)
    return str(choice.state.path) if choice.state else None


def set_aside_strays(output_dir: Path, output_name: str, from_step: int, attempt: int) -> list[str]:
    """Move what an ended attempt left past `from_step` (step LoRAs and states, half-written files) into
    output/set-aside/attempt-N, so the attempt that resumes from `from_step` never mixes them with its own."""
    if not output_dir.is_dir():
        return []
    aside = output_dir / ASIDE_FOLDER / f"attempt-{attempt}"
    moved: list[str] = []
    for item in sorted(output_dir.iterdir()):
        match = _STEP_FILE.match(item.name)
        stray = item.name.startswith(STAGING_PREFIX) or bool(
            match and match["name"] == output_name and int(match["step"]) > from_step
        )
        if item.name == f"{output_name}-state" and (state_step(item) or 0) > from_step:
            stray = True
        if stray:
            aside.mkdir(parents=True, exist_ok=True)
            os.replace(item, aside / item.name)
            moved.append(item.name)
    return moved
