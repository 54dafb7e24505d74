"""Helpers for the native-engine tests: a tiny captioned dataset in tmp_path and a small job config."""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from flux_lora.compose import load_run
from flux_lora.engines.native.config import NativeTrainConfig
from flux_lora.engines.native.engine import native_config_from_run
from flux_lora.schema import RunConfig
from tests.conftest import compose_config


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


@functools.cache
def embedded_default_run() -> RunConfig:
    """The run composed with no overrides (tiny model on CPU): schema.py's defaults, composed once."""
    return load_run(compose_config())


def tiny_config(tmp_path: Path, dataset: Path, name: str = "run", **overrides) -> NativeTrainConfig:
    """The embedded default's job config cut to 8 steps at 64 px on `dataset`, no sample prompts and no run record;
    caches shared under tmp_path/cache."""
    values = dict(
        dataset_path=str(dataset),
        training_set_file=None,
        resolution=64,
        min_bucket_reso=64,
        max_bucket_reso=128,
        bucket_reso_steps=32,
        max_train_steps=8,
        learning_rate=1e-3,
        lr_scheduler="constant",
        lr_warmup_steps=0,
        optimizer="adamw8bit",
        optimizer_args={"weight_decay": 0.01, "betas": [0.9, 0.999], "eps": 1e-8},
        save_every_n_steps=4,
        sample_every_n_steps=0,
        sample_steps=2,
        sample_prompts=[],
        use_cpu=True,
        cache_dir=str(tmp_path / "cache"),
        trigger="TOK woman",
        class_tokens="woman",
        record={},
    )
    values.update(overrides)
    return replace(native_config_from_run(embedded_default_run(), tmp_path / name), **values)
