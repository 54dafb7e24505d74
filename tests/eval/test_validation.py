"""Validation loss on a real tiny run: a fixed set, the same numbers twice, and a LoRA that moves them."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from flux_lora.dataset.training_set import TRAINING_SET_FILE
from flux_lora.eval.base_model import attach_lora, encode_texts, load_base_parts
from flux_lora.eval.run_record import HELD_OUT, VALIDATION_FOLDER, read_run, validation_examples
from flux_lora.eval.settings import VALIDATION_SIGMAS
from flux_lora.eval.validation import build_validation_set, summarize_curve, validation_point
from tests.eval.tiny_eval import copy_run

CPU = dict(guidance=1.0, prediction_type="raw", batch_size=3, device=torch.device("cpu"), dtype=torch.float32)


def test_the_trained_lora_beats_the_base_model_on_its_training_images_and_repeats_exactly(tiny_run: Path) -> None:
    run = read_run(tiny_run)
    parts = load_base_parts(run.section("model"), torch.float32)
    examples = run.training_examples()[:2]
    embeddings = encode_texts(parts, [e.caption for e in examples])
    images = build_validation_set(parts, examples, 64, run.section("dataset"), VALIDATION_SIGMAS)

    base = validation_point(parts.transformer, images, embeddings, VALIDATION_SIGMAS, **CPU)
    assert validation_point(parts.transformer, images, embeddings, VALIDATION_SIGMAS, **CPU) == base
    attach_lora(parts.transformer, run.final.path)
    trained = validation_point(parts.transformer, images, embeddings, VALIDATION_SIGMAS, **CPU)
    assert validation_point(parts.transformer, images, embeddings, VALIDATION_SIGMAS, **CPU) == trained

    assert trained["loss"] < base["loss"]  # the base model is the zero LoRA
    assert list(base["per_sigma"]) == ["0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9"]
    assert set(base["per_image"]) == {e.key for e in examples} and all(e.key for e in examples)  # relative paths


def test_the_runs_held_out_images_are_the_validation_set(tiny_run: Path, tmp_path: Path) -> None:
    run = read_run(tiny_run)
    source = validation_examples(run, None)
    assert source.label == HELD_OUT and source.where == run.section("dataset")["path"] and len(source.images) == 2
    assert not {e.image for e in source.images} & {e.image for e in run.training_examples()}
    # Without training_set.json the same images are held out, from dataset.path and dataset.validation_split.
    copy = copy_run(tiny_run, tmp_path / "run")
    (copy / TRAINING_SET_FILE).unlink()
    assert read_run(copy).held_out_examples() == source.images


def test_the_set_depends_on_the_image_bytes_only(tiny_run: Path, tmp_path: Path) -> None:
    """The same photo in another folder, under another name, gets the same latents and noise."""
    run = read_run(tiny_run)
    parts = load_base_parts(run.section("model"), torch.float32)
    folder = tmp_path / "validation"
    folder.mkdir()
    shutil.copy(run.training_examples()[0].image, folder / "renamed.jpg")
    source = validation_examples(run, str(folder))
    assert source.label == VALIDATION_FOLDER and source.where == str(folder.resolve())
    copied = build_validation_set(parts, source.images, 64, run.section("dataset"), VALIDATION_SIGMAS)[0]
    original = build_validation_set(parts, run.training_examples()[:1], 64, run.section("dataset"), VALIDATION_SIGMAS)[
        0
    ]
    assert torch.equal(copied.noise, original.noise) and torch.equal(copied.latents, original.latents)
    assert copied.noise.shape == (9, 16, 8, 8)  # 64 px / 8


def test_best_and_final_points_of_a_curve() -> None:
    curve = [
        {"step": 0, "file": None, "loss": 1.0},
        {"step": 2, "file": "output/a-step2.safetensors", "final": False, "loss": 0.7},
        {"step": 4, "file": "output/a.safetensors", "final": True, "loss": 0.8},
    ]
    assert summarize_curve(curve) == {
        "best": {"step": 2, "file": "output/a-step2.safetensors", "loss": 0.7},
        "final": {"step": 4, "file": "output/a.safetensors", "loss": 0.8},
    }
