"""evaluate_run: one evaluator for a run directory, whatever engine trained it.

It reads only the run directory (frozen config.yaml, status.json, the saved LoRA files) and the images the
config names, and writes RUN_DIR/eval/eval.json plus images and grids. The result is cached by the LoRA
files' content, the settings and the inputs: asking again with nothing changed does no work, and imports
nothing heavy (torch, diffusers and dlib load in sections.py, on a cache miss only).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import blake3

from flux_lora.eval.run_record import EVAL_DIR, RunRecord, file_hash, read_run, validation_examples
from flux_lora.eval.settings import EvalSettings, device_type

SCHEMA_VERSION = 1
# Bump when the same inputs would give other numbers (a metric's definition, the sampler), so old caches miss.
EVAL_CODE_VERSION = 2  # 2: eval.json records its basis
EVAL_FILE = "eval.json"
# conf/model/tiny.yaml's values: the tiny model every tiny run trains on, rebuilt for --base-model tiny.
TINY_STAND_IN = {"kind": "tiny", "init_seed": 0, "t5xxl_max_token_length": 64}


def _print(message: str) -> None:
    print(message, flush=True)


def cache_key(run: RunRecord, settings: EvalSettings, device: str, images: list[Path]) -> str:
    """Everything a number in eval.json depends on: LoRA files, settings, frozen config, run state, images."""
    payload = {
        "schema_version": SCHEMA_VERSION,
        "code": EVAL_CODE_VERSION,
        "settings": settings.to_record(),
        "device": device,
        "config": file_hash(run.run_dir / "config.yaml"),
        "state": [run.state, run.reason],
        "loras": [[c.path.name, c.content_hash] for c in run.checkpoints],
        "images": [[str(p), file_hash(p)] for p in sorted(set(images))],
    }
    return blake3.blake3(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _referenced_files(result: dict) -> list[str]:
    grids = [g["grid"] for g in (result.get("grids") or {}).get("prompts", [])]
    return grids + [s["image"] for s in result.get("samples", [])]


def read_cached(eval_file: Path, key: str) -> dict | None:
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


def base_model_config(run: RunRecord, settings: EvalSettings) -> dict:
    """The model section the evaluator builds: the run's own, or the tiny model standing in for it."""
    return dict(TINY_STAND_IN) if settings.base_model == "tiny" else run.section("model")


def run_section(run: RunRecord, settings: EvalSettings) -> dict:
    label = (
        "succeeded"
        if run.succeeded
        else f"evaluated a run that did not succeed (state {run.state}" + (f": {run.reason})" if run.reason else ")")
    )
    if run.state == "external":  # python -m flux_lora.eval --lora FILE: a file, not a run (flux_lora/eval/external.py)
        label = f"a LoRA file from elsewhere: {run.reason}"
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


def evaluate_run(
    run_dir: Path, settings: EvalSettings | None = None, *, force: bool = False, log: Callable[[str], None] = _print
) -> dict:
    """Evaluate a run directory; returns what RUN_DIR/eval/eval.json holds (plus "cached": true on a cache hit)."""
    settings = settings or EvalSettings()
    if settings.lora == "best" and not settings.validation:
        raise ValueError("EvalSettings: lora='best' picks by validation loss; enable validation or use lora='final'")
    began = time.perf_counter()
    run = read_run(Path(run_dir))
    model = base_model_config(run, settings)
    device = device_type(settings.device)
    validation_set = validation_examples(run, settings.validation_path) if settings.validation else None
    references = [e.image for e in run.training_examples()] if settings.likeness else []
    images = ([e.image for e in validation_set.images] if validation_set else []) + references
    key = cache_key(run, settings, device, images)
    eval_file = run.run_dir / EVAL_DIR / EVAL_FILE
    cached = None if force else read_cached(eval_file, key)
    if cached is not None:
        log(f"eval: cached, nothing to do (same LoRA files and settings): {eval_file}")
        return {**cached, "cached": True}

    log(f"eval: {run.run_dir.name} ({run_section(run, settings)['label']}), model {model.get('kind')}, {device}")
    from flux_lora.eval.sections import compute_sections  # torch, diffusers, dlib: 5 s of imports a cache hit skips

    result = {
        "schema_version": SCHEMA_VERSION,
        "cache_key": key,
        "evaluated_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S+00:00"),
        "run_dir": str(run.run_dir),
        "settings": settings.to_record(),
        "device": device,
        "run": run_section(run, settings),
        **compute_sections(run, settings, model, validation_set, log),
    }
    result["seconds"] = round(time.perf_counter() - began, 2)
    result["cached"] = False
    write_json(eval_file, result)
    log(f"eval: wrote {eval_file} in {result['seconds']} s")
    return result
