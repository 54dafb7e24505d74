"""Helpers for the native-engine tests: a tiny captioned dataset in tmp_path and a small job config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from flux_lora.engines.native.config import NativeTrainConfig


def make_dataset(folder: Path, count: int = 3, seed: int = 0) -> Path:
    """`count` random images of a few sizes (two aspect ratios) with .txt captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        height = 96 if index % 2 else 48  # aspect 1 and 2
        pixels = (rng.random((height, 96, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(folder / f"img{index}.png")
        (folder / f"img{index}.txt").write_text(f"TOK woman, photo number {index}", encoding="utf-8")
    return folder


def tiny_config(tmp_path: Path, dataset: Path, name: str = "run", **overrides) -> NativeTrainConfig:
    """8 steps of the tiny model at 64 px on CPU; caches shared under tmp_path/cache."""
    run_dir = tmp_path / name
    values = dict(
        dataset_path=str(dataset), resolution=64, min_bucket_reso=64, max_bucket_reso=128, bucket_reso_steps=32,
        max_train_steps=8, learning_rate=1e-3, lr_scheduler="constant", optimizer="adamw8bit",
        optimizer_args={"weight_decay": 0.01, "betas": [0.9, 0.999], "eps": 1e-8},
        save_every_n_steps=4, sample_every_n_steps=0, sample_steps=2, use_cpu=True,
        cache_dir=str(tmp_path / "cache"), run_dir=str(run_dir), output_dir=str(run_dir / "output"),
        logging_dir=str(run_dir / "logs"), trigger="TOK woman", class_tokens="woman",
    )
    values.update(overrides)
    return NativeTrainConfig(**values)
