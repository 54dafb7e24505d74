"""evaluate_run: one evaluator for a run directory, whatever engine trained it.

It reads only the run directory (frozen config.yaml, status.json, the saved LoRA files) and the images the
config names, and writes RUN_DIR/eval/eval.json plus images and grids. The result is cached by the LoRA
files' content, the settings and the inputs: asking again with nothing changed does no work.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

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
from flux_lora.eval.run_record import LoraCheckpoint, RunRecord, file_hash, read_run
from flux_lora.eval.settings import EvalSettings
from flux_lora.eval.validation import (
    build_validation_set,
    summarize_curve,
    validation_examples,
    validation_point,
)

SCHEMA_VERSION = 1
# Bump when the same inputs would give other numbers (a metric's definition, the sampler), so old caches miss.
EVAL_CODE_VERSION = 1
EVAL_DIR = "eval"
EVAL_FILE = "eval.json"
CONTACT_SHEET = "dataset_contact_sheet.png"
SIDE_MULTIPLE = 16
# conf/model/tiny.yaml's values: the tiny model every tiny run trains on, rebuilt for --base-model tiny.
TINY_STAND_IN = {"kind": "tiny", "init_seed": 0, "t5xxl_max_token_length": 64}


def _print(message: str) -> None:
    print(message, flush=True)


# ------------------------------------------------------------------------------------------ inputs and cache


def eval_resolution(settings: EvalSettings, profile: dict) -> int:
    return max(SIDE_MULTIPLE, int(settings.resolution or profile.get("resolution") or 512) // SIDE_MULTIPLE * SIDE_MULTIPLE)


def eval_steps(settings: EvalSettings, profile: dict) -> int:
    return int(settings.sample_steps or profile.get("sample_steps") or 20)


def cache_key(run: RunRecord, settings: EvalSettings, device: torch.device, images: list[Path]) -> str:
    """Everything a number in eval.json depends on: LoRA files, settings, frozen config, run state, images."""
    payload = {
        "schema_version": SCHEMA_VERSION,
        "code": EVAL_CODE_VERSION,
        "settings": settings.to_record(),
        "device": device.type,
        "config": file_hash(run.run_dir / "config.yaml"),
        "state": [run.state, run.reason],
        "loras": [[c.path.name, c.content_hash] for c in run.checkpoints],
        "images": [[str(p), file_hash(p)] for p in sorted(set(images))],
    }
    return blake3.blake3(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _referenced_files(result: dict) -> list[str]:
    grids = [g["grid"] for g in (result.get("grids") or {}).get("prompts", [])]
    return grids + [s["image"] for s in result.get("samples", [])]


def read_cached(eval_file: Path, key: str) -> Optional[dict]:
    """The earlier result when its key matches and every image it names is still there."""
    try:
        result = json.loads(eval_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if result.get("cache_key") != key:
        return None
    run_dir = eval_file.parent.parent
    if not all((run_dir / path).is_file() for path in _referenced_files(result)):
        return None
    return result


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        json.dump(data, out, indent=2)
        out.write("\n")
    os.replace(temporary, path)


# ------------------------------------------------------------------------------------------ sections


def base_model_config(run: RunRecord, settings: EvalSettings) -> dict:
    """The model section the evaluator builds: the run's own, or the tiny model standing in for it."""
    return dict(TINY_STAND_IN) if settings.base_model == "tiny" else run.section("model")


def run_section(run: RunRecord, settings: EvalSettings) -> dict:
    label = "succeeded" if run.succeeded else f"evaluated a run that did not succeed (state {run.state}" + (
        f": {run.reason})" if run.reason else ")"
    )
    return {
        "name": run.config.get("name"),
        "engine": run.section("engine").get("name"),
        "model": run.section("model").get("kind"),
        "base_model": base_model_config(run, settings).get("kind"),
        "base_model_stand_in": settings.base_model is not None,
        "state": run.state,
        "reason": run.reason,
        "succeeded": run.succeeded,
        "label": label,
    }


def _lora_entry(run: RunRecord, checkpoint: LoraCheckpoint) -> dict:
    return {"file": checkpoint.relative_to(run.run_dir), "step": checkpoint.step, "final": checkpoint.final,
            "blake3": checkpoint.content_hash}  # fmt: skip


def comfy_section(path: Path, transformer) -> dict:
    with safe_open(str(path), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    return comfy_keys.check_keys(shapes, comfy_keys.FluxShape.of(transformer))


def validation_section(run: RunRecord, settings: EvalSettings, parts, embeddings: dict[str, TextEmbedding],
                       set_label: str, folder: str, examples, resolution: int, device, dtype, log) -> dict:  # fmt: skip
    dataset, profile = run.section("dataset"), run.section("profile")
    sigmas = tuple(settings.validation_sigmas)
    images = build_validation_set(parts, examples, resolution, dataset, sigmas)
    kwargs = dict(guidance=float(profile.get("guidance_scale", 1.0)),
                  prediction_type=profile.get("model_prediction_type") or "raw",
                  batch_size=settings.validation_batch_size, device=device, dtype=dtype)  # fmt: skip
    log(f"eval: validation loss, base + {len(run.checkpoints)} LoRA files x {len(images)} images x {len(sigmas)} sigmas")
    curve = [{"step": 0, "file": None, "final": False, "label": "base (no LoRA)",
              **validation_point(parts.transformer, images, embeddings, sigmas, **kwargs)}]  # fmt: skip
    for checkpoint in run.checkpoints:
        attach_lora(parts.transformer, checkpoint.path)
        point = validation_point(parts.transformer, images, embeddings, sigmas, **kwargs)
        label = "final" if checkpoint.final else f"step {checkpoint.step}"
        curve.append({**_lora_entry(run, checkpoint), "label": label, **point})
    return {
        "images": set_label,
        "path": folder,
        "count": len(images),
        "resolution": resolution,
        "sigmas": list(sigmas),
        "definition": "mean over (image, sigma) of MSE(prediction, eps - x0); latents = VAE posterior mean; "
        "eps ~ N(0, 1) from a seed = blake3(image bytes); no min-SNR weight, no noise offset, no dropout",
        "base_loss": curve[0]["loss"],
        "curve": curve,
        **summarize_curve(curve),
    }


def _generation_lora(run: RunRecord, settings: EvalSettings, validation: Optional[dict]) -> LoraCheckpoint:
    if settings.lora == "best":
        best_file = validation["best"]["file"]
        return next(c for c in run.checkpoints if c.relative_to(run.run_dir) == best_file)
    return run.final


def _strength_key(strength: Optional[float]) -> str:
    return "base" if strength is None else f"{strength:g}"


@dataclass
class Measured:
    """What was measured on each generated image, in the order of `images`."""

    images: list[GeneratedImage]
    faces: list[Optional[np.ndarray]]
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
        records.append({
            "prompt": image.prompt.key, "set": image.prompt.set, "strength": image.strength, "seed": image.seed,
            "image": str(image.path.relative_to(run.run_dir)), "face_found": face is not None,
            "face_distance": score.distance, "face_cosine": score.cosine, "phash": hashed.direct,
            "nearest_training_image": nearest, "nearest_training_bits": bits,
            "copy": bits is not None and bits <= copy_bits,
        })  # fmt: skip
    return records


def likeness_summary(measured: Measured, reference: dict, references: list[Path], strengths: list) -> dict:
    def block(keep: Callable[[GeneratedImage], bool]) -> dict:
        return likeness.summarize([s for s, i in zip(measured.scores, measured.images) if keep(i)])

    result = {
        "embedder": EMBEDDER_NAME,
        "same_person_distance": SAME_PERSON_DISTANCE,
        "reference": {"images": len(references), "faces_found": len(reference),
                      "without_face": sorted(p.name for p in references if p.name not in reference)},  # fmt: skip
        "ceiling": likeness.ceiling(reference, len(references)),
        "floor": block(lambda i: i.strength is None),
        "by_strength": {_strength_key(s): block(lambda i, s=s: i.strength == s) for s in strengths if s is not None},
        "by_set": {
            name: {_strength_key(s): block(lambda i, s=s, n=name: i.prompt.set == n and i.strength == s) for s in strengths}
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
        "by_strength": {_strength_key(s): diversity.summarize_rows([r for r in rows if r["strength"] == s])
                        for s in strengths},  # fmt: skip
        "rows": rows,
        "collapsed_rows": [{"prompt": r["prompt"], "strength": r["strength"]} for r in rows if r["collapsed"]],
        "copies": [{"image": s["image"], "training_image": s["nearest_training_image"], "bits": s["nearest_training_bits"]}
                   for s in samples if s["copy"]],  # fmt: skip
    }


def likeness_and_diversity(run: RunRecord, images: list[GeneratedImage], strengths: list[Optional[float]],
                           log: Callable[[str], None]) -> tuple[dict, dict, list[dict]]:  # fmt: skip
    """(likeness, diversity, per-image records): faces against the training faces, seeds against each other."""
    references = [e.image for e in run.training_examples()]
    embedder = FaceEmbedder()
    log(f"eval: faces in {len(references)} training images and {len(images)} generated images")
    reference = likeness.reference_faces(embedder, references)
    measured = measure_images(embedder, images, list(reference.values()))
    training_hashes = {p.name: diversity.image_hash(likeness.read_rgb(p)) for p in references}
    analysis = run.section("dataset").get("analysis") or {}
    copy_bits = int(analysis.get("duplicate_max_distance", diversity.DEFAULT_COPY_MAX_BITS))
    samples = sample_records(run, measured, training_hashes, copy_bits)
    return (likeness_summary(measured, reference, references, strengths),
            diversity_summary(measured, samples, strengths, copy_bits), samples)  # fmt: skip


def grids_section(run: RunRecord, images: list[GeneratedImage], strengths: list[Optional[float]], seeds: list[int],
                  resolution: int, out_dir: Path) -> dict:  # fmt: skip
    cell = min(CELL_MAX, resolution)
    entries = []
    for prompt in dict.fromkeys(i.prompt for i in images):
        by_cell = {(i.strength, i.seed): i.path for i in images if i.prompt == prompt}
        cells = [[by_cell[(s, seed)] for seed in seeds] for s in strengths]
        labels = [row_label(s) for s in strengths]
        path = write_prompt_grid(prompt.text, labels, seeds, cells, out_dir / f"{prompt.key}.png", cell)
        entries.append({"prompt": prompt.key, "set": prompt.set, "text": prompt.text,
                        "grid": str(path.relative_to(run.run_dir)), "rows": labels, "seeds": seeds})  # fmt: skip
    sheet = run.run_dir / CONTACT_SHEET
    return {"contact_sheet": CONTACT_SHEET if sheet.is_file() else None, "cell": cell, "prompts": entries}


def generation_sections(run: RunRecord, settings: EvalSettings, parts, prompts: list[EvalPrompt],
                        embeddings: dict[str, TextEmbedding], validation: Optional[dict], resolution: int, steps: int,
                        out_dir: Path, device, dtype, log) -> dict:  # fmt: skip
    """Generate with the chosen LoRA (and without it), then likeness, diversity, grids and per-image records."""
    lora = _generation_lora(run, settings, validation)
    attach_lora(parts.transformer, lora.path)
    strengths: list[Optional[float]] = [None, *settings.strengths]
    seeds = list(settings.seeds)
    log(f"eval: generating {len(prompts)} prompts x {len(strengths)} rows x {len(seeds)} seeds "
        f"at {resolution} px, {steps} steps with {lora.path.name}")  # fmt: skip
    for stale in ("images", "grids"):  # an earlier evaluation's pictures would read as this one's
        shutil.rmtree(out_dir / stale, ignore_errors=True)
    images = generate_images(parts, prompts, embeddings, strengths, seeds, resolution=resolution, steps=steps,
                             out_dir=out_dir / "images", device=device, dtype=dtype, log=log)  # fmt: skip
    likeness_result, diversity_result, samples = likeness_and_diversity(run, images, strengths, log)
    return {
        "likeness": {"lora": _lora_entry(run, lora), "resolution": resolution, "steps": steps, **likeness_result},
        "diversity": diversity_result,
        "grids": grids_section(run, images, strengths, seeds, resolution, out_dir / "grids"),
        "samples": samples,
    }


# ------------------------------------------------------------------------------------------ the whole evaluation


def compute_sections(run: RunRecord, settings: EvalSettings, key: str, val_examples: list, val_where: tuple,
                     device: torch.device, dtype: torch.dtype, log: Callable[[str], None]) -> dict:  # fmt: skip
    """Every section of eval.json, in the order the base transformer allows: the diffusers load check needs it
    without a LoRA, so it runs before the peft LoRA is attached for validation and generation."""
    dataset, profile, model = run.section("dataset"), run.section("profile"), base_model_config(run, settings)
    resolution, steps = eval_resolution(settings, profile), eval_steps(settings, profile)
    parts = place(load_base_parts(model, dtype), device, dtype)
    prompts = eval_prompts(dataset, settings.heldout_prompts, settings.max_prompts_per_set) if settings.likeness else []
    embeddings = encode_texts(parts, [e.caption for e in val_examples] + [p.text for p in prompts])
    free_text_encoders(parts)

    result: dict = {
        "schema_version": SCHEMA_VERSION,
        "cache_key": key,
        "evaluated_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S+00:00"),
        "run_dir": str(run.run_dir),
        "settings": settings.to_record(),
        "device": device.type,
        "run": run_section(run, settings),
        "loras": [_lora_entry(run, c) for c in run.checkpoints],
        "comfy_keys": {"file": run.final.relative_to(run.run_dir), **comfy_section(run.final.path, parts.transformer)},
    }
    if settings.load_check:
        log(f"eval: load check of {run.final.path.name} with diffusers' FLUX LoRA loader")
        conditioning = embeddings[prompts[0].text] if prompts else None
        check = check_lora_loads(parts.transformer, run.final.path, settings.min_output_change, conditioning)
        result["load_check"] = {**check, "file": run.final.relative_to(run.run_dir)}
    if settings.validation:
        result["validation"] = validation_section(run, settings, parts, embeddings, *val_where, val_examples,
                                                  resolution, device, dtype, log)  # fmt: skip
    if settings.likeness:
        result.update(generation_sections(run, settings, parts, prompts, embeddings, result.get("validation"),
                                          resolution, steps, run.run_dir / EVAL_DIR, device, dtype, log))  # fmt: skip
    return result


def evaluate_run(run_dir: Path, settings: Optional[EvalSettings] = None, *, force: bool = False,
                 log: Callable[[str], None] = _print) -> dict:  # fmt: skip
    """Evaluate a run directory; returns what RUN_DIR/eval/eval.json holds (plus "cached": true on a cache hit)."""
    settings = settings or EvalSettings()
    if settings.lora == "best" and not settings.validation:
        raise ValueError("EvalSettings: lora='best' picks by validation loss; enable validation or use lora='final'")
    began = time.perf_counter()
    run = read_run(Path(run_dir))
    model = base_model_config(run, settings)
    device = pick_device(settings.device)
    dtype = compute_dtype(device)
    val_label, val_folder, val_examples = (validation_examples(run, settings.validation_path)
                                           if settings.validation else (None, None, []))  # fmt: skip
    references = [e.image for e in run.training_examples()] if settings.likeness else []
    key = cache_key(run, settings, device, [e.image for e in val_examples] + references)
    eval_file = run.run_dir / EVAL_DIR / EVAL_FILE
    cached = None if force else read_cached(eval_file, key)
    if cached is not None:
        log(f"eval: cached, nothing to do (same LoRA files and settings): {eval_file}")
        return {**cached, "cached": True}

    log(f"eval: {run.run_dir.name} ({run_section(run, settings)['label']}), model {model.get('kind')}, {device.type}")
    with tiny_model_threads(model, device):
        result = compute_sections(run, settings, key, val_examples, (val_label, val_folder), device, dtype, log)
    result["seconds"] = round(time.perf_counter() - began, 2)
    result["cached"] = False
    write_json(eval_file, result)
    log(f"eval: wrote {eval_file} in {result['seconds']} s")
    return result
