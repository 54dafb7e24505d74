"""The sections of eval.json that need the model: load and key checks, validation loss, generation for likeness,
diversity and grids. evaluation.py imports this (torch, diffusers, dlib) only when the cache misses."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import blake3
import numpy as np
import torch
from safetensors import safe_open

from flux_lora.eval import comfy_keys, diversity, likeness
from flux_lora.eval.base_model import (
    TextEmbedding,
    attach_lora,
    compute_dtype,
    encode_texts,
    free_text_encoders,
    load_base_parts,
    pick_device,
    place,
    tiny_model_threads,
)
from flux_lora.eval.face_embedding import EMBEDDER_NAME, SAME_PERSON_DISTANCE, FaceEmbedder
from flux_lora.eval.generation import (
    EvalPrompt,
    GeneratedImage,
    eval_prompts,
    generate_images,
    row_label,
)
from flux_lora.eval.grids import CELL_MAX, write_prompt_grid
from flux_lora.eval.load_check import check_lora_loads
from flux_lora.eval.lora_file import DIFFUSERS, lora_key_format
from flux_lora.eval.run_record import EVAL_DIR, LoraCheckpoint, RunRecord, ValidationSource, file_hash
from flux_lora.eval.settings import EvalSettings
from flux_lora.eval.validation import build_validation_set, summarize_curve, validation_point

CONTACT_SHEET = "dataset_contact_sheet.png"
SIDE_MULTIPLE = 16
FLUX_DEV_VALIDATION_BATCH = 3


def eval_resolution(settings: EvalSettings, profile: dict) -> int:
    return max(
        SIDE_MULTIPLE, int(settings.resolution or profile.get("resolution") or 512) // SIDE_MULTIPLE * SIDE_MULTIPLE
    )


def eval_steps(settings: EvalSettings, profile: dict) -> int:
    return int(settings.sample_steps or profile.get("sample_steps") or 20)


def _lora_entry(run: RunRecord, checkpoint: LoraCheckpoint) -> dict:
    return {
        "file": checkpoint.relative_to(run.run_dir),
        "step": checkpoint.step,
        "final": checkpoint.final,
        "blake3": checkpoint.content_hash,
    }


def comfy_section(path: Path, transformer) -> dict:
    if lora_key_format(path) == DIFFUSERS:
        return {
            "passed": None,
            "modules": 0,
            "problems": [],
            "note": "diffusers/peft keys: ComfyUI's LoRA loader reads them as they are; the kohya key map does not apply",
        }
    with safe_open(str(path), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    return comfy_keys.check_keys(shapes, comfy_keys.FluxShape.of(transformer))


def validation_batch(settings: EvalSettings, model: dict) -> int:
    if settings.validation_batch_size:
        return settings.validation_batch_size
    return len(settings.validation_sigmas) if model.get("kind") == "tiny" else FLUX_DEV_VALIDATION_BATCH


def validation_section(
    run: RunRecord,
    settings: EvalSettings,
    model: dict,
    parts,
    embeddings: dict[str, TextEmbedding],
    validation_set: ValidationSource,
    resolution: int,
    device,
    dtype,
    log,
) -> dict:
    began = time.perf_counter()
    dataset, profile = run.section("dataset"), run.section("profile")
    sigmas = tuple(settings.validation_sigmas)
    images = build_validation_set(parts, validation_set.images, resolution, dataset, sigmas)
    kwargs = dict(
        guidance=float(profile.get("guidance_scale", 1.0)),
        prediction_type=profile.get("model_prediction_type") or "raw",
        batch_size=validation_batch(settings, model),
        device=device,
        dtype=dtype,
    )
    log(
        f"eval: validation loss, base + {len(run.checkpoints)} LoRA files x {len(images)} images x {len(sigmas)} sigmas"
    )
    curve = [
        {
            "step": 0,
            "file": None,
            "final": False,
            "label": "base (no LoRA)",
            **validation_point(parts.transformer, images, embeddings, sigmas, **kwargs),
        }
    ]
    for checkpoint in run.checkpoints:
        attach_lora(parts.transformer, checkpoint.path)
        point = validation_point(parts.transformer, images, embeddings, sigmas, **kwargs)
        label = "final" if checkpoint.final else f"step {checkpoint.step}"
        curve.append({**_lora_entry(run, checkpoint), "label": label, **point})
    return {
        "images": validation_set.label,
        "path": validation_set.where,
        "count": len(images),
        "resolution": resolution,
        "sigmas": list(sigmas),
        "definition": "mean over (image, sigma) of MSE(prediction, eps - x0); latents = VAE posterior mean; "
        "eps ~ N(0, 1) from a seed = blake3(image bytes); no min-SNR weight, no noise offset, no dropout",
        "base_loss": curve[0]["loss"],
        "curve": curve,
        **summarize_curve(curve),
        "seconds": round(time.perf_counter() - began, 2),  # this section alone: the set, then every point
    }


def _generation_lora(run: RunRecord, settings: EvalSettings, validation: dict | None) -> LoraCheckpoint:
    if settings.lora == "best":
        best_file = validation["best"]["file"]
        return next(c for c in run.checkpoints if c.relative_to(run.run_dir) == best_file)
    return run.final


def _strength_key(strength: float | None) -> str:
    return "base" if strength is None else f"{strength:g}"


@dataclass
class Measured:
    """What was measured on each generated image, in the order of `images`."""

    images: list[GeneratedImage]
    faces: list[np.ndarray | None]
    scores: list[likeness.FaceScore]
    hashes: list[diversity.ImageHash]


def measure_images(embedder: FaceEmbedder, images: list[GeneratedImage], reference: list[np.ndarray]) -> Measured:
    faces, hashes = [], []
    for image in images:
        rgb = likeness.read_rgb(image.path)
        faces.append(embedder.embed(rgb))
        hashes.append(diversity.image_hash(rgb))
    return Measured(images, faces, [likeness.score_face(f, reference) for f in faces], hashes)


def sample_records(run: RunRecord, measured: Measured, training_hashes: dict, copy_bits: int) -> list[dict]:
    records = []
    for image, face, score, hashed in zip(measured.images, measured.faces, measured.scores, measured.hashes):
        nearest, bits = diversity.nearest_training_image(hashed, training_hashes)
        records.append(
            {
                "prompt": image.prompt.key,
                "set": image.prompt.set,
                "strength": image.strength,
                "seed": image.seed,
                "image": str(image.path.relative_to(run.run_dir)),
                "face_found": face is not None,
                "face_distance": score.distance,
                "face_cosine": score.cosine,
                "phash": hashed.direct,
                "nearest_training_image": nearest,
                "nearest_training_bits": bits,
                "copy": bits is not None and bits <= copy_bits,
            }
        )
    return records


def likeness_summary(measured: Measured, reference: dict, references: dict[str, Path], strengths: list) -> dict:
    def block(keep: Callable[[GeneratedImage], bool]) -> dict:
        return likeness.summarize([s for s, i in zip(measured.scores, measured.images) if keep(i)])

    result = {
        "embedder": EMBEDDER_NAME,
        "same_person_distance": SAME_PERSON_DISTANCE,
        "reference": {
            "images": len(references),
            "faces_found": len(reference),
            "without_face": sorted(key for key in references if key not in reference),
        },
        "ceiling": likeness.ceiling(reference, len(references)),
        "floor": block(lambda i: i.strength is None),
        "by_strength": {_strength_key(s): block(lambda i, s=s: i.strength == s) for s in strengths if s is not None},
        "by_set": {
            name: {
                _strength_key(s): block(lambda i, s=s, n=name: i.prompt.set == n and i.strength == s) for s in strengths
            }
            for name in sorted({i.prompt.set for i in measured.images})
        },
    }
    if not any(f is not None for f in measured.faces):
        result["note"] = "no face found in any generated image: likeness metrics are null"
    return result


def diversity_summary(measured: Measured, samples: list[dict], strengths: list, copy_bits: int) -> dict:
    rows = []
    for prompt_key in dict.fromkeys(i.prompt.key for i in measured.images):
        for strength in strengths:
            chosen = [k for k, i in enumerate(measured.images) if i.prompt.key == prompt_key and i.strength == strength]
            seeds = diversity.seed_diversity([measured.hashes[k] for k in chosen], [measured.faces[k] for k in chosen])
            rows.append({"prompt": prompt_key, "strength": strength, **seeds})
    return {
        "collapse_max_mean_bits": diversity.COLLAPSE_MAX_MEAN_BITS,
        "copy_max_bits": copy_bits,
        "by_strength": {
            _strength_key(s): diversity.summarize_rows([r for r in rows if r["strength"] == s]) for s in strengths
        },
        "rows": rows,
        "collapsed_rows": [{"prompt": r["prompt"], "strength": r["strength"]} for r in rows if r["collapsed"]],
        "copies": [
            {"image": s["image"], "training_image": s["nearest_training_image"], "bits": s["nearest_training_bits"]}
            for s in samples
            if s["copy"]
        ],
    }


def likeness_and_diversity(
    run: RunRecord, images: list[GeneratedImage], strengths: list[float | None], log: Callable[[str], None]
) -> tuple[dict, dict, list[dict]]:
    """(likeness, diversity, per-image records): faces against the training faces, seeds against each other."""
    references = {
        e.key: e.image for e in run.training_examples()
    }  # keyed by relative path: names repeat across folders
    embedder = FaceEmbedder()
    log(f"eval: faces in {len(references)} training images and {len(images)} generated images")
    reference = likeness.reference_faces(embedder, references)
    held_out = list(likeness.reference_faces(embedder, {e.key: e.image for e in run.held_out_examples()}).values())
    measured = measure_images(embedder, images, list(reference.values()))
    training_hashes = {key: diversity.image_hash(likeness.read_rgb(path)) for key, path in references.items()}
    analysis = run.section("dataset").get("analysis") or {}
    copy_bits = int(analysis.get("duplicate_max_distance", diversity.DEFAULT_COPY_MAX_BITS))
    samples = sample_records(run, measured, training_hashes, copy_bits)
    summary = likeness_summary(measured, reference, references, strengths)
    # The same faces against the training faces and, apart, the held-out ones, with the copy indicator.
    summary["apart"] = {
        _strength_key(s): likeness.against_training_and_held_out(
            [f for f, i in zip(measured.faces, measured.images) if i.strength == s], list(reference.values()), held_out
        )
        for s in strengths
        if s is not None
    }
    summary["held_out_reference_faces"] = len(held_out)
    return summary, diversity_summary(measured, samples, strengths, copy_bits), samples


def grids_section(
    run: RunRecord,
    images: list[GeneratedImage],
    strengths: list[float | None],
    seeds: list[int],
    resolution: int,
    out_dir: Path,
) -> dict:
    cell = min(CELL_MAX, resolution)
    entries = []
    for prompt in dict.fromkeys(i.prompt for i in images):
        by_cell = {(i.strength, i.seed): i.path for i in images if i.prompt == prompt}
        cells = [[by_cell[(s, seed)] for seed in seeds] for s in strengths]
        labels = [row_label(s) for s in strengths]
        path = write_prompt_grid(prompt.text, labels, seeds, cells, out_dir / f"{prompt.key}.png", cell)
        entries.append(
            {
                "prompt": prompt.key,
                "set": prompt.set,
                "text": prompt.text,
                "grid": str(path.relative_to(run.run_dir)),
                "rows": labels,
                "seeds": seeds,
            }
        )
    sheet = run.run_dir / CONTACT_SHEET
    return {"contact_sheet": CONTACT_SHEET if sheet.is_file() else None, "cell": cell, "prompts": entries}


def generation_sections(
    run: RunRecord,
    settings: EvalSettings,
    parts,
    prompts: list[EvalPrompt],
    embeddings: dict[str, TextEmbedding],
    validation: dict | None,
    resolution: int,
    steps: int,
    out_dir: Path,
    device,
    dtype,
    log,
) -> dict:
    """Generate with the chosen LoRA (and without it), then likeness, diversity, grids and per-image records."""
    lora = _generation_lora(run, settings, validation)
    attach_lora(parts.transformer, lora.path)
    strengths: list[float | None] = [None, *settings.strengths]
    seeds = list(settings.seeds)
    log(
        f"eval: generating {len(prompts)} prompts x {len(strengths)} rows x {len(seeds)} seeds "
        f"at {resolution} px, {steps} steps with {lora.path.name}"
    )
    for stale in ("images", "grids"):  # an earlier evaluation's pictures would read as this one's
        shutil.rmtree(out_dir / stale, ignore_errors=True)
    images = generate_images(
        parts,
        prompts,
        embeddings,
        strengths,
        seeds,
        resolution=resolution,
        steps=steps,
        out_dir=out_dir / "images",
        device=device,
        dtype=dtype,
        log=log,
    )
    likeness_result, diversity_result, samples = likeness_and_diversity(run, images, strengths, log)
    return {
        "likeness": {"lora": _lora_entry(run, lora), "resolution": resolution, "steps": steps, **likeness_result},
        "diversity": diversity_result,
        "grids": grids_section(run, images, strengths, seeds, resolution, out_dir / "grids"),
        "samples": samples,
    }


def evaluation_basis(
    settings: EvalSettings,
    model: dict,
    validation_set: ValidationSource | None,
    resolution: int,
    steps: int,
    device: torch.device,
    dtype: torch.dtype,
) -> dict:
    """What two evaluations must share for their numbers to be compared: the images (by content), resolution, noise
    levels, base model (or its stand-in), device, dtype, and the seeds, strengths and steps of generation."""
    images = sorted([file_hash(e.image), e.caption] for e in validation_set.images) if validation_set else []
    return {
        "images": validation_set.label if validation_set else None,
        "image_set": blake3.blake3(json.dumps(images).encode()).hexdigest()[:16] if images else None,
        "image_count": len(images),
        "resolution": resolution,
        "sigmas": list(settings.validation_sigmas) if settings.validation else None,
        "base_model": model.get("kind"),
        "base_model_stand_in": settings.base_model is not None,
        "device": device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "seeds": list(settings.seeds) if settings.likeness else None,
        "strengths": list(settings.strengths) if settings.likeness else None,
        "sample_steps": steps if settings.likeness else None,
    }


# Likeness at every saved LoRA is a cheap pass beside the final one: this many prompts, the first seed, strength 1.
BY_STEP_PROMPTS = 2


def likeness_by_step(
    run: RunRecord,
    settings: EvalSettings,
    parts,
    prompts: list[EvalPrompt],
    embeddings: dict[str, TextEmbedding],
    resolution: int,
    steps: int,
    out_dir: Path,
    device,
    dtype,
    log,
) -> dict:
    """Identity similarity for every saved LoRA (which checkpoint to keep), against the training faces and, apart,
    the held-out faces; the best step by it sits beside the best step by validation loss."""
    chosen, seed = prompts[:BY_STEP_PROMPTS], settings.seeds[0]
    embedder = FaceEmbedder()
    training = list(likeness.reference_faces(embedder, {e.key: e.image for e in run.training_examples()}).values())
    held_out = list(likeness.reference_faces(embedder, {e.key: e.image for e in run.held_out_examples()}).values())
    log(f"eval: likeness at {len(run.checkpoints)} LoRA files x {len(chosen)} prompts, seed {seed}, strength 1")
    shutil.rmtree(out_dir, ignore_errors=True)
    points = []
    for checkpoint in run.checkpoints:
        attach_lora(parts.transformer, checkpoint.path)
        label = "final" if checkpoint.final else f"step{checkpoint.step}"
        images = generate_images(
            parts,
            chosen,
            embeddings,
            [1.0],
            [seed],
            resolution=resolution,
            steps=steps,
            out_dir=out_dir / label,
            device=device,
            dtype=dtype,
        )
        faces = [embedder.embed(likeness.read_rgb(image.path)) for image in images]
        points.append(
            {**_lora_entry(run, checkpoint), **likeness.against_training_and_held_out(faces, training, held_out)}
        )
    best, by = likeness.best_step_by_likeness(points)
    result = {
        "prompts": len(chosen),
        "seeds": [seed],
        "strength": 1.0,
        "settings_note": f"cheaper than the final likeness: {len(chosen)} prompts, 1 seed, strength 1",
        "reference_faces": {"training": len(training), "held_out": len(held_out)},
        "points": points,
        "best_step": best,
        "best_by": by,
    }
    if best is None:
        result["note"] = "no face found in any generated image: no best step by likeness"
    return result


def compute_sections(
    run: RunRecord,
    settings: EvalSettings,
    model: dict,
    validation_set: ValidationSource | None,
    log: Callable[[str], None],
) -> dict:
    """Every section of eval.json that needs the model, on the base model `model` (a config.yaml model section)."""
    device = pick_device(settings.device)
    return _sections(run, settings, model, validation_set, device, compute_dtype(device), log)


def _sections(
    run: RunRecord,
    settings: EvalSettings,
    model: dict,
    validation_set: ValidationSource | None,
    device: torch.device,
    dtype: torch.dtype,
    log: Callable[[str], None],
) -> dict:
    """In the order the base transformer allows: the diffusers load check needs it without a LoRA, so it runs before
    the peft LoRA is attached for validation and generation."""
    dataset, profile = run.section("dataset"), run.section("profile")
    resolution, steps = eval_resolution(settings, profile), eval_steps(settings, profile)
    parts = place(load_base_parts(model, dtype), device, dtype)
    prompts = eval_prompts(dataset, settings.heldout_prompts, settings.max_prompts_per_set) if settings.likeness else []
    captions = [e.caption for e in validation_set.images] if validation_set else []
    embeddings = encode_texts(parts, captions + [p.text for p in prompts])
    free_text_encoders(parts)

    result: dict = {
        "basis": evaluation_basis(settings, model, validation_set, resolution, steps, device, dtype),
        "loras": [_lora_entry(run, c) for c in run.checkpoints],
        "comfy_keys": {"file": run.final.relative_to(run.run_dir), **comfy_section(run.final.path, parts.transformer)},
    }
    if settings.load_check:
        log(f"eval: load check of {run.final.path.name} with diffusers' FLUX LoRA loader")
        conditioning = embeddings[prompts[0].text] if prompts else None
        check = check_lora_loads(parts.transformer, run.final.path, settings.min_output_change, conditioning)
        result["load_check"] = {**check, "file": run.final.relative_to(run.run_dir)}
    if settings.validation:
        result["validation"] = validation_section(
            run, settings, model, parts, embeddings, validation_set, resolution, device, dtype, log
        )
    if settings.likeness:
        # Sampling runs one image at a time: on the tiny model a second CPU thread only waits. Validation batches
        # every sigma of an image and gains from it (8 images x 11 LoRA files at 256 px: 2.3 s with 2, 3.3 s with 1).
        with tiny_model_threads(model, device):
            result["likeness_by_step"] = likeness_by_step(
                run,
                settings,
                parts,
                prompts,
                embeddings,
                resolution,
                steps,
                run.run_dir / EVAL_DIR / "by_step",
                device,
                dtype,
                log,
            )
            result.update(
                generation_sections(
                    run,
                    settings,
                    parts,
                    prompts,
                    embeddings,
                    result.get("validation"),
                    resolution,
                    steps,
                    run.run_dir / EVAL_DIR,
                    device,
                    dtype,
                    log,
                )
            )
    return result
