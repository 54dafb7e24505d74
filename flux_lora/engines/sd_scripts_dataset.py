"""The dataset as sd-scripts reads it: a view of the run's training set, one folder per subset.

sd-scripts reads each subset folder without recursion, pairs captions by file stem, and writes its
latent and text-encoder caches (`*_flux.npz`, `*_flux_te.npz`) next to the images, checking the
text cache only by its keys, not by the caption it came from (strategy_flux.py:107-134). So it is
never pointed at the user's folder: the launcher builds a view under the cache folder, keyed by
the training set's content (images, captions, repeats) and location, holding a symlink per image
and the caption text that trains. An edited caption is a new view (no stale embeddings), the
user's dataset folder is never written to, and the images sd-scripts finds are exactly the list the
preflight passed.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import blake3

from flux_lora.dataset.training_set import TrainingSet

VIEWS_FOLDER = "sd_scripts_datasets"


def view_key(training_set: TrainingSet, caption_extension: str) -> str:
    return blake3.blake3(f"{training_set.content_hash}|{training_set.root}|{caption_extension}".encode()).hexdigest()[:20]


def subset_folder_name(index: int, subset: str) -> str:
    # Readable, unique and free of separators; sd-scripts reads num_repeats from the TOML, not the name.
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "-", subset).strip("-") or "root"
    return f"{index:02d}-{readable}"


def _fill_view(folder: Path, training_set: TrainingSet, caption_extension: str) -> None:
    for index, (subset, examples) in enumerate(training_set.subsets().items()):
        target = folder / subset_folder_name(index, subset)
        target.mkdir(parents=True)
        for example in examples:
            image = Path(example.image)
            os.symlink(training_set.image_path(example), target / image.name)
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


def view_subsets(view: Path, training_set: TrainingSet) -> list[tuple[Path, int]]:
    """(folder, num_repeats) per subset, in the order the view was built."""
    return [
        (view / subset_folder_name(index, subset), examples[0].repeats)
        for index, (subset, examples) in enumerate(training_set.subsets().items())
    ]
