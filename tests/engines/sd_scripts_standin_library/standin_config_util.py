"""Stand-in for library/config_util.py: the dataset config as sd-scripts loads and expands it.

Subset folders are read without recursion and hidden files are skipped (train_util.py:2847-2856, glob
"*.ext"); the group's length is its number of batches (one bucket assumed).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SUBSET_KEYS = {
    "image_dir",
    "caption_extension",
    "class_tokens",
    "num_repeats",
    "keep_tokens",
    "shuffle_caption",
    "flip_aug",
    "is_reg",
}
DATASET_KEYS = {
    "resolution",
    "batch_size",
    "enable_bucket",
    "min_bucket_reso",
    "max_bucket_reso",
    "bucket_reso_steps",
    "bucket_no_upscale",
    "subsets",
}


class ConfigSanitizer:
    def __init__(self, *flags) -> None:
        self.flags = flags


def load_user_config(path: str) -> dict:
    return tomllib.loads(Path(path).read_text(encoding="utf-8"))


@dataclass
class Blueprint:
    dataset_group: list[dict]


class BlueprintGenerator:
    def __init__(self, sanitizer: ConfigSanitizer) -> None:
        self.sanitizer = sanitizer

    def generate(self, user_config: dict, args) -> Blueprint:
        for dataset in user_config["datasets"]:
            unknown = set(dataset) - DATASET_KEYS
            assert not unknown, f"extra keys not allowed in dataset: {sorted(unknown)}"  # voluptuous rejects them
            for subset in dataset["subsets"]:
                assert not set(subset) - SUBSET_KEYS, (
                    f"extra keys not allowed in subset: {sorted(set(subset) - SUBSET_KEYS)}"
                )
        return Blueprint(
            dataset_group=[
                dict(d, batch_size=d.get("batch_size", args.train_batch_size)) for d in user_config["datasets"]
            ]
        )


class DatasetGroup:
    def __init__(self, datasets: list[dict]) -> None:
        self.datasets = datasets

    def __len__(self) -> int:
        batches = 0
        for dataset in self.datasets:
            images = 0
            for subset in dataset["subsets"]:
                folder = Path(subset["image_dir"])
                found = (
                    [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
                    if folder.is_dir()
                    else []
                )
                images += len(found) * int(subset.get("num_repeats", 1))
            batches += math.ceil(images / dataset["batch_size"])
        return batches

    def is_latent_cacheable(self) -> bool:
        return True

    def verify_bucket_reso_steps(self, min_steps: int) -> None:
        for dataset in self.datasets:
            steps = dataset.get("bucket_reso_steps", 64)
            assert steps % min_steps == 0, f"bucket_reso_steps is {steps}. it must be divisible by {min_steps}."


def generate_dataset_group_by_blueprint(blueprint: list[dict]):
    return DatasetGroup(blueprint), None
