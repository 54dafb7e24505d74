"""What a finished job's artefacts say: did it train every step into a LoRA with a finite loss?

An exit code of 0 proves nothing (sd-scripts returns 0 after "No data found", after a resume that
skipped every step, and with a NaN loss). A run succeeded only when the job exited 0, the final
LoRA file exists, the last recorded optimizer step is max_train_steps, and no recorded loss is
NaN or infinite. Steps come from the TensorBoard events both engines write (a resumed sd-scripts
attempt logs under a `from-stepNNNNNNNN-` folder, counted from that step), and only the steps the
final weights descend from count: what an abandoned attempt logged after the state the next one
resumed from is history, not evidence.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from flux_lora.engines.sd_scripts_resume import log_step_offset

LOSS_TAG = "loss/current"


@dataclass(frozen=True)
class TrainingEvidence:
    lora_path: Path
    lora_exists: bool
    last_step: int | None  # highest optimizer step with a recorded loss; None when nothing was logged
    nonfinite_step: int | None  # first step whose loss was NaN or infinite


def scalar_series(logging_dir: Path, tag: str) -> list[tuple[int, float, float]]:
    """(true step, value, wall time) of a TensorBoard scalar over every event folder under logging_dir, by step."""
    if not Path(logging_dir).is_dir():
        return []
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: list[tuple[int, float, float]] = []
    for folder in sorted({events.parent for events in Path(logging_dir).rglob("events.out.tfevents.*")}):
        relative = folder.relative_to(logging_dir)
        offset = log_step_offset(relative.parts[0]) if relative.parts else 0
        accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags().get("scalars", []):
            points += [(e.step + offset, float(e.value), e.wall_time) for e in accumulator.Scalars(tag)]
    return descended_points(points)


def descended_points(points: list[tuple[int, float, float]]) -> list[tuple[int, float, float]]:
    """The points the final weights descend from, by step: a later attempt that logs step s resumed from a state
    before s, so what earlier attempts logged at s and after was abandoned (a NaN there is history)."""
    kept: list[tuple[int, float, float]] = []
    for point in sorted(points, key=lambda p: p[2]):
        while kept and kept[-1][0] >= point[0]:
            kept.pop()
        kept.append(point)
    return sorted(kept, key=lambda point: (point[0], point[2]))


def gather_evidence(run_dir: Path, output_name: str) -> TrainingEvidence:
    run_dir = Path(run_dir)
    lora = run_dir / "output" / f"{output_name}.safetensors"
    losses = scalar_series(run_dir / "logs", LOSS_TAG)
    nonfinite = next((step for step, value, _ in losses if not math.isfinite(value)), None)
    return TrainingEvidence(
        lora_path=lora,
        lora_exists=lora.is_file() and lora.stat().st_size > 0,
        last_step=max((step for step, _, _ in losses), default=None),
        nonfinite_step=nonfinite,
    )


def training_shortfall(evidence: TrainingEvidence, max_train_steps: int) -> str | None:
    """Why a job that exited 0 did not train what was asked; None when it did."""
    if evidence.nonfinite_step is not None:
        return f"exited 0 but the loss became NaN/inf at step {evidence.nonfinite_step}"
    gaps = []
    trained = evidence.last_step or 0
    if trained != max_train_steps:
        gaps.append(f"trained {trained} of {max_train_steps} steps")
    if not evidence.lora_exists:
        gaps.append(f"wrote no LoRA ({evidence.lora_path.name} missing)")
    return f"exited 0 but {' and '.join(gaps)}" if gaps else None


# The job's exit status when a stop signal ended it (128 + SIGINT / SIGUSR2 / SIGTERM), and when SIGKILL did.
STOPPED_EXIT_CODES = (130, 140, 143)
KILLED_EXIT_CODE = 137
# Progress lines that carry the optimizer step and the loss: sd-scripts' tqdm bar ("... 150/1500 [..., avr_loss=0.12]"),
# its stand-in and the native engine ("steps: 3/4 loss=0.5", "step 3/4 loss 0.5").
_PROGRESS = (
    re.compile(r"(?P<step>\d+)/(?P<total>\d+) \[[^\]]*avr_loss=(?P<loss>[-+\w.]+)"),
    re.compile(r"steps?:?\s+(?P<step>\d+)/(?P<total>\d+)\s+loss[=\s](?P<loss>[-+\w.]+)"),
)
_OUT_OF_MEMORY = re.compile(
    r"CUDA out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED|out of memory", re.IGNORECASE
)
_KILLED = re.compile(r"died with <Signals.SIGKILL: 9>|\bKilled\b")
_ERROR = re.compile(r"(Error|error:|Exception|Traceback)")


@dataclass
class JobWatch:
    """What the job's output says as it runs: the step reached, a non-finite loss, an out-of-memory crash."""

    last_step: int | None = None
    nonfinite_step: int | None = None
    out_of_memory: str | None = None
    killed: bool = False
    last_error: str | None = None
    stop_sent: bool = False
    _recent: list[str] = field(default_factory=list)

    def feed(self, line: str) -> bool:
        """Read one line; True when it reported progress."""
        text = line.strip()
        if not text:
            return False
        if _OUT_OF_MEMORY.search(text) and self.out_of_memory is None:
            self.out_of_memory = text[:200]
        if _KILLED.search(text):
            self.killed = True
        if _ERROR.search(text) and not text.startswith("Traceback"):
            self.last_error = text[:300]
        for pattern in _PROGRESS:
            match = pattern.search(text)
            if match:
                step = int(match["step"])
                self.last_step = step
                try:
                    finite = math.isfinite(float(match["loss"]))
                except ValueError:
                    finite = True  # not a number we can read: no verdict
                if not finite and self.nonfinite_step is None:
                    self.nonfinite_step = step
                return True
        return False
