"""Resuming sd-scripts so that the remaining optimizer steps train exactly once and the count continues.

What sd-scripts does at the pinned commit (train_network.py:1232-1273, 1340-1344, 1401-1418):
  - `--resume` restores LoRA, optimizer, scheduler and RNG, and its train_state.json step N;
  - with `--skip_until_initial_step` it multiplies N by the accumulation steps and then divides by
    optimizer steps per epoch, so with accumulation above 1 it starts epochs too late and global_step
    becomes a negative or wrong leftover (bug #2407): a fast/h100 run resumed at 500 trains nothing;
  - without it, global_step restarts at 0 and training starts at the epoch holding step N but still
    runs to max_train_steps: it trains up to N steps too many, and names and logs restart at 0.
What the launcher passes instead: `--initial_step 0` (the state's step is ignored, no epoch is
skipped, global_step starts at 0) and `--max_train_steps M-N`, so the attempt trains exactly the
remaining M-N optimizer steps. The attempt writes into `output/resumed-from-stepNNNNNNNN/` and logs
with the prefix `from-stepNNNNNNNN-`; when it ends the launcher moves its files into `output/` with
the step numbers offset by N (train_state.json and each LoRA's `ss_steps` rewritten to the true step),
so names, the evaluator's checkpoint steps and the next resume continue the count. The learning-rate schedule is rebuilt from --max_train_steps, so only
schedules that do not depend on the total length (constant, constant_with_warmup) can be resumed.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from flux_lora.checkpoint_files import update_safetensors_metadata

TRAIN_STATE_FILE = "train_state.json"
RESUMED_FOLDER = "resumed-from-step{step:08d}"
RESUMED_FOLDER_PATTERN = re.compile(r"^resumed-from-step(\d{8})$")
LOG_PREFIX = "from-step{step:08d}-"
LOG_PREFIX_PATTERN = re.compile(r"^from-step(\d{8})-")
# Schedules whose factor at step s does not depend on the total step count.
RESUMABLE_SCHEDULERS = frozenset({"constant", "constant_with_warmup"})


@dataclass(frozen=True)
class ResumePlan:
    state_dir: Path
    from_step: int  # optimizer steps already trained (the true count, across earlier resumes)
    remaining_steps: int  # what this attempt trains: max_train_steps - from_step

    @property
    def attempt_output(self) -> str:
        return RESUMED_FOLDER.format(step=self.from_step)

    @property
    def log_prefix(self) -> str:
        return LOG_PREFIX.format(step=self.from_step)


def state_step(state_dir: Path) -> int:
    return int(json.loads((Path(state_dir) / TRAIN_STATE_FILE).read_text())["current_step"])


def plan_resume(state_dir: Path, max_train_steps: int) -> ResumePlan:
    step = state_step(state_dir)
    return ResumePlan(state_dir=Path(state_dir), from_step=step, remaining_steps=max_train_steps - step)


def resume_problem(state_dir: Path, max_train_steps: int, lr_scheduler: str) -> str | None:
    """One line if sd-scripts cannot continue from this state as configured; None if it can."""
    state = Path(state_dir)
    if not (state / TRAIN_STATE_FILE).is_file():
        return f"launch.resume_from={state}: no {TRAIN_STATE_FILE} there; point it at an sd-scripts *-state folder"
    try:
        step = state_step(state)
    except (OSError, ValueError, KeyError) as error:
        return f"launch.resume_from={state}: unreadable {TRAIN_STATE_FILE} ({error}); choose an earlier state"
    if step >= max_train_steps:
        return (
            f"launch.resume_from={state}: that state is at step {step}, the run ends at profile.max_train_steps="
            f"{max_train_steps}: nothing is left to train"
        )
    if lr_scheduler not in RESUMABLE_SCHEDULERS:
        return (
            f"profile.lr_scheduler={lr_scheduler}: sd-scripts rebuilds the schedule from --max_train_steps on resume, "
            f"so it cannot continue a {lr_scheduler} schedule at step {step}; resume with engine=native or restart"
        )
    return None


_STEP_LORA = re.compile(r"^(?P<name>.+)-step(?P<step>\d{8})(?P<rest>\.safetensors|-state)$")
_SAMPLE = re.compile(r"^(?P<name>.+)_(?P<step>\d{6})_(?P<rest>\d{2}_.+)$")


def _offset_name(name: str, output_name: str, offset: int) -> str:
    step_file = _STEP_LORA.match(name)
    if step_file and step_file["name"] == output_name:
        return f"{output_name}-step{int(step_file['step']) + offset:08d}{step_file['rest']}"
    return name


def offset_saved_steps(lora: Path, offset: int) -> bool:
    """Rewrite a LoRA file's `ss_steps` metadata (the attempt's count) to the true global step, in place and whole:
    the evaluator reads a checkpoint's step from it. Only the header changes; returns whether it did."""

    def offset_steps(metadata: dict[str, str]) -> dict[str, str] | None:
        if "ss_steps" not in metadata or "ss_attempt_steps" in metadata:
            return None
        return {
            **metadata,
            "ss_attempt_steps": metadata["ss_steps"],
            "ss_steps": str(int(metadata["ss_steps"]) + offset),
        }

    return update_safetensors_metadata(lora, offset_steps)


def _move(source: Path, target: Path) -> None:
    if target.exists():
        # Never overwrite what an earlier attempt saved: keep both, the newer one named apart.
        target = target.with_name(f"{target.name}.attempt-{source.parent.name}")
    os.replace(source, target)


def adopt_resumed_outputs(output_dir: Path, output_name: str) -> list[str]:
    """Move every resumed attempt's files into output_dir under their true step numbers; returns what moved.

    Safe to call any number of times (also after a killed attempt): moved files are not seen again and
    an attempt folder is removed only once it is empty.
    """
    moved: list[str] = []
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return moved
    for attempt in sorted(p for p in output_dir.iterdir() if p.is_dir() and RESUMED_FOLDER_PATTERN.match(p.name)):
        offset = int(RESUMED_FOLDER_PATTERN.match(attempt.name).group(1))
        for item in sorted(attempt.iterdir()):
            if item.name == "sample" and item.is_dir():
                (output_dir / "sample").mkdir(exist_ok=True)
                for sample in sorted(item.iterdir()):
                    match = _SAMPLE.match(sample.name)
                    name = sample.name
                    if match and match["name"] == output_name:
                        name = f"{output_name}_{int(match['step']) + offset:06d}_{match['rest']}"
                    _move(sample, output_dir / "sample" / name)
                    moved.append(f"sample/{name}")
                if not any(item.iterdir()):
                    item.rmdir()
                continue
            if item.is_dir() and (item / TRAIN_STATE_FILE).is_file():
                state_file = item / TRAIN_STATE_FILE
                state = json.loads(state_file.read_text())
                if "attempt_step" not in state:  # rewrite once: the next resume must read the true step
                    state["attempt_step"] = state["current_step"]
                    state["current_step"] = int(state["current_step"]) + offset
                    state_file.write_text(json.dumps(state))
            name = _offset_name(item.name, output_name, offset)
            if item.suffix == ".safetensors" and item.is_file():
                offset_saved_steps(item, offset)
            _move(item, output_dir / name)
            moved.append(name)
        if not any(attempt.iterdir()):
            attempt.rmdir()
    return moved


def log_step_offset(event_dir_name: str) -> int:
    """The step offset of a TensorBoard run folder written by a resumed attempt (0 for a first attempt)."""
    match = LOG_PREFIX_PATTERN.match(event_dir_name)
    return int(match.group(1)) if match else 0
