"""What the evaluator reads from a run directory: the frozen config.yaml, status.json, training_set.json and the
saved LoRA files, and which images the validation loss uses.

Nothing engine-specific: sd-scripts and the native engine write the same layout, so one reader serves both.
Nothing heavy either (no torch): a cached evaluation is decided from this alone.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import yaml
from safetensors import safe_open

from flux_lora.dataset.training_set import TRAINING_SET_FILE, TrainingSet, training_set_from_folder

SUCCEEDED = "succeeded"
EVAL_DIR = "eval"  # RUN_DIR/eval/: eval.json, images/, grids/
_STEP_IN_NAME = re.compile(r"-step(\d+)$")
HELD_OUT = "held-out"  # training_set.json's `validation`: images the run never trained on
TRAINING_SET = "training-set"  # the run held nothing out: the training images, which reward overfitting
VALIDATION_FOLDER = "validation-folder"  # --validation-path, chosen at evaluation time


@dataclass(frozen=True)
class EvalImage:
    image: Path
    caption: str  # the caption it trained with (or would train with, for a held-out image)
    key: str = ""  # its path relative to its dataset folder: what per-image records are keyed by (names repeat)


@dataclass(frozen=True)
class ValidationSource:
    label: str  # HELD_OUT, TRAINING_SET or VALIDATION_FOLDER
    where: str  # the folder they come from
    images: list[EvalImage]


@dataclass(frozen=True)
class LoraCheckpoint:
    path: Path
    step: int | None  # training step it was saved at (from ss_steps, else the file name); None if unknown
    final: bool
    content_hash: str  # blake3 of the file

    def relative_to(self, run_dir: Path) -> str:
        return str(self.path.relative_to(run_dir))


@dataclass(frozen=True)
class RunRecord:
    run_dir: Path
    config: dict[str, Any]
    state: str
    reason: str | None
    checkpoints: list[LoraCheckpoint]  # by step; the final file last

    @property
    def succeeded(self) -> bool:
        return self.state == SUCCEEDED

    @property
    def final(self) -> LoraCheckpoint:
        """The final LoRA, or the latest intermediate one when the run stopped before writing it."""
        return next((c for c in self.checkpoints if c.final), self.checkpoints[-1])

    def section(self, name: str) -> dict[str, Any]:
        return self.config.get(name) or {}

    def training_set(self) -> TrainingSet:
        """The run's frozen training_set.json, else the same selection (and hold-out) from dataset.path."""
        frozen = self.run_dir / TRAINING_SET_FILE
        if frozen.is_file():
            return TrainingSet.read_json(frozen)
        dataset = self.section("dataset")
        return folder_examples_set(
            Path(dataset.get("path") or ""),
            dataset,
            dataset.get("validation_split", 0.0),
            dataset.get("validation_path"),
        )

    def training_examples(self) -> list[EvalImage]:
        """The pairs that trained."""
        training_set = self.training_set()
        return _on_disk(
            [EvalImage(training_set.image_path(e), e.caption, e.image) for e in training_set.examples], "training"
        )

    def held_out_examples(self) -> list[EvalImage]:
        """The pairs held out from training (dataset.validation_split or dataset.validation_path); empty without."""
        training_set = self.training_set()
        folder = self.section("dataset").get("validation_path")
        return _on_disk(
            [
                EvalImage(training_set.image_path(e), e.caption, _key_in(e.image, folder))
                for e in training_set.validation
            ],
            "held-out",
        )


def _key_in(image: str, folder: str | None) -> str:
    """A held-out image's key: relative to the dataset (a split) or to the validation folder (absolute in the record)."""
    path = Path(image)
    if path.is_absolute() and folder:
        try:
            return path.relative_to(Path(folder).resolve()).as_posix()
        except ValueError:
            pass
    return path.as_posix() if not path.is_absolute() else path.name


def _on_disk(examples: list[EvalImage], kind: str) -> list[EvalImage]:
    missing = [str(e.image) for e in examples if not e.image.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{missing[0]}: a {kind} image of this run is gone ({len(missing)} missing); restore it to evaluate"
        )
    return examples


def folder_examples_set(
    folder: Path, dataset: dict[str, Any], validation_split: float = 0.0, validation_path: str | None = None
) -> TrainingSet:
    """A folder's (image, caption) pairs selected as training selects them (captions beside the images)."""
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: image folder not found; check dataset.path in config.yaml or --validation-path"
        )
    return training_set_from_folder(
        folder,
        dataset.get("caption_extension") or ".txt",
        dataset.get("class_tokens") or "",
        validation_split=validation_split,
        validation_path=validation_path,
    )


def folder_examples(folder: Path, dataset: dict[str, Any]) -> list[EvalImage]:
    training_set = folder_examples_set(folder, dataset)
    if not training_set.examples:
        raise FileNotFoundError(f"{folder}: no images to evaluate on")
    return [EvalImage(training_set.image_path(e), e.caption, e.image) for e in training_set.examples]


def validation_examples(run: RunRecord, validation_path: str | None) -> ValidationSource:
    """The validation images: the given folder, else the run's held-out images, else its training images."""
    dataset = run.section("dataset")
    if validation_path:
        folder = Path(validation_path)
        return ValidationSource(VALIDATION_FOLDER, str(folder.resolve()), folder_examples(folder, dataset))
    held_out = run.held_out_examples()
    if held_out:
        return ValidationSource(HELD_OUT, str(dataset.get("validation_path") or dataset.get("path")), held_out)
    return ValidationSource(TRAINING_SET, str(dataset.get("path")), run.training_examples())


def file_hash(path: Path) -> str:
    hasher = blake3.blake3()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def _saved_step(path: Path) -> int | None:
    try:
        with safe_open(str(path), framework="numpy") as handle:  # "pt" would import torch (1.6 s) to read a string
            steps = (handle.metadata() or {}).get("ss_steps")
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError (and OSError) for a bad file
        raise ValueError(
            f"{path}: not a readable safetensors file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            "it is truncated or damaged: copy it again or delete it"
        ) from None
    if steps is not None and steps.isdigit():
        return int(steps)
    match = _STEP_IN_NAME.search(path.stem)
    return int(match.group(1)) if match else None


def find_checkpoints(output_dir: Path, output_name: str) -> list[LoraCheckpoint]:
    """`<name>.safetensors` (final) and `<name>-*.safetensors` (intermediate) directly in output/."""
    files = sorted(
        p for p in output_dir.glob("*.safetensors") if p.stem == output_name or p.stem.startswith(f"{output_name}-")
    )
    checkpoints = [LoraCheckpoint(p, _saved_step(p), p.stem == output_name, file_hash(p)) for p in files]
    return sorted(checkpoints, key=lambda c: (c.final, c.step if c.step is not None else float("inf"), c.path.name))


def read_run(run_dir: Path) -> RunRecord:
    """The run's frozen record; one-line errors name the missing file and what to pass instead."""
    run_dir = Path(run_dir).resolve()
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{config_file} not found; pass a run directory written by launch.py (outputs/runs/<time>_<name>)"
        )
    config = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
    status_file = run_dir / "status.json"
    status = json.loads(status_file.read_text(encoding="utf-8")) if status_file.is_file() else {}
    output_name = (config.get("launch") or {}).get("output_name") or "flux-lora"
    checkpoints = find_checkpoints(run_dir / "output", output_name) if (run_dir / "output").is_dir() else []
    if not checkpoints:
        raise FileNotFoundError(
            f"{run_dir / 'output'}: no {output_name}*.safetensors; the run saved no LoRA to evaluate "
            f"(state {status.get('state', 'unknown')})"
        )
    return RunRecord(run_dir, config, status.get("state", "unknown"), status.get("reason"), checkpoints)
