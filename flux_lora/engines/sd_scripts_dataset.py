"""The dataset as sd-scripts reads it: a view of the run's training set, one folder per subset.

sd-scripts reads each subset folder without recursion, pairs captions by file stem, and writes its
latent and text-encoder caches (`*_flux.npz`, `*_flux_te.npz`) next to the images, checking the
text cache only by its keys, not by the caption it came from (strategy_flux.py:107-134). So it is
never pointed at the user's folder: the launcher builds a view under the cache folder, keyed by
the training set's content (images, captions, repeats) and location, holding a symlink per image
and the caption text that trains. An edited caption is a new view (no stale embeddings), the
user's dataset folder is never written to, and the images sd-scripts finds are exactly the list the
preflight passed. Class images (dataset.reg_path) get folders of their own after the subject's, read as `is_reg`.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import blake3

from flux_lora.dataset.training_set import TrainingExample, TrainingSet

VIEWS_FOLDER = "sd_scripts_datasets"


def view_key(training_set: TrainingSet, caption_extension: str) -> str:
    where = f"{training_set.root}|{training_set.reg_root}" if training_set.reg_root else training_set.root
    return blake3.blake3(f"{training_set.content_hash}|{where}|{caption_extension}".encode()).hexdigest()[:20]


@dataclass(frozen=True)
class ViewSubset:
    name: str  # the folder's name in the view
    examples: list[TrainingExample]
    is_reg: bool  # class images: kohya's `is_reg` subset


def subset_folder_name(index: int, subset: str, is_reg: bool = False) -> str:
    # Readable, unique and free of separators; sd-scripts reads num_repeats from the TOML, not the name.
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "-", subset).strip("-") or "root"
    return f"{index:02d}-{'class-' if is_reg else ''}{readable}"


def view_layout(training_set: TrainingSet) -> list[ViewSubset]:
    """The subject's subsets, then the class images' (sd-scripts registers class images after the subject's, in
    the order of their subsets: training_set.reg_epoch_plan follows that order)."""
    groups = [(s, e, False) for s, e in training_set.subsets().items()] + [
        (s, e, True) for s, e in training_set.reg_subsets().items()
    ]
    return [
        ViewSubset(subset_folder_name(i, subset, is_reg), examples, is_reg)
        for i, (subset, examples, is_reg) in enumerate(groups)
    ]


def _fill_view(folder: Path, training_set: TrainingSet, caption_extension: str) -> None:
    for subset in view_layout(training_set):
        target = folder / subset.name
        target.mkdir(parents=True)
        for example in subset.examples:
            image = Path(example.image)
            source = training_set.reg_image_path(example) if subset.is_reg else training_set.image_path(example)
            os.symlink(source, target / image.name)
            (target / f"{image.stem}{caption_extension}").write_text(example.caption + "\n", encoding="utf-8")


def build_dataset_view(training_set: TrainingSet, cache_dir: Path, caption_extension: str) -> Path:
    """The view folder for this training set (built once, atomically, then shared by every run that trains it)."""
    root = Path(cache_dir) / VIEWS_FOLDER
    final = root / view_key(training_set, caption_extension)
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(dir=root, prefix=".building-"))
    try:
        _fill_view(building, training_set, caption_extension)
        os.rename(building, final)
    except OSError:
        if not final.is_dir():  # another launch finished the same view first: use theirs
            raise
    finally:
        if building.exists():
            shutil.rmtree(building)
    return final


def view_subsets(view: Path, training_set: TrainingSet) -> list[tuple[Path, int, bool]]:
    """(folder, num_repeats, is_reg) per subset, in the order the view was built."""
    return [(view / subset.name, subset.examples[0].repeats, subset.is_reg) for subset in view_layout(training_set)]
