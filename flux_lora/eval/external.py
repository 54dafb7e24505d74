"""A LoRA file from anywhere, judged like a run: `python -m flux_lora.eval --lora FILE --dataset DIR`.

The evaluator reads run folders, so this writes one for the file (never touching the file or the dataset): a copy of
the LoRA in output/, a config.yaml with the base model, the dataset folder (its images are the likeness references
and the validation set, `validation-folder`: whether the LoRA saw them is not known) and sample prompts made from
its first captions, and a status.json saying where the file came from. eval.json then has every section a run's has.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from flux_lora.dataset.training_set import training_set_from_folder
from flux_lora.eval.lora_file import lora_key_format
from flux_lora.eval.run_record import file_hash

EXTERNAL_STATE = "external"
DEFAULT_FOLDER = Path("outputs") / "evals"
PROMPTS_FROM_CAPTIONS = 5
FLUX_DEV_FILES = {
    "transformer": "flux1-dev.safetensors",
    "vae": "ae.safetensors",
    "clip_l": "clip_l.safetensors",
    "t5xxl": "t5xxl_fp16.safetensors",
}


def external_run_dir(
    lora: Path,
    dataset: Path,
    *,
    out: Path | None,
    models: Path | None,
    stand_in: bool,
    resolution: int,
    sample_steps: int,
) -> Path:
    """The run folder that stands for `lora`; one-line errors (ValueError, FileNotFoundError) for bad input."""
    if not lora.is_file():
        raise FileNotFoundError(f"--lora {lora}: no such file; give a LoRA .safetensors file")
    key_format = lora_key_format(lora)
    if not dataset.is_dir():
        raise FileNotFoundError(f"--dataset {dataset}: no such folder; give the person's photos with .txt captions")
    if not stand_in and models is None:
        raise ValueError("--lora FILE: give --models DIR (the four FLUX.1-dev files) or --base-model tiny")
    examples = training_set_from_folder(dataset, ".txt", "").examples
    if not examples:
        raise FileNotFoundError(f"--dataset {dataset}: no images to compare with")
    digest = file_hash(lora)
    run_dir = (out or DEFAULT_FOLDER / f"{lora.stem}-{digest[:12]}").resolve()
    copy = run_dir / "output" / f"{lora.stem}.safetensors"
    copy.parent.mkdir(parents=True, exist_ok=True)
    if not copy.is_file() or file_hash(copy) != digest:
        shutil.copyfile(lora, copy)
    model: dict = (
        {"kind": "flux_dev", **{key: str(models / name) for key, name in FLUX_DEV_FILES.items()}}
        if models
        else {"kind": "tiny"}
    )
    config = {
        "name": lora.stem,
        "engine": {"name": "external"},
        "model": model,
        "dataset": {
            "path": str(dataset.resolve()),
            "caption_extension": ".txt",
            "class_tokens": "",
            "validation_split": 0.0,
            "enable_bucket": True,
            "bucket_reso_steps": 64,
            "min_bucket_reso": 256,
            "max_bucket_reso": 1024,
            "sample_prompts": [
                {"text": e.caption, "seed": 1000 + i} for i, e in enumerate(examples[:PROMPTS_FROM_CAPTIONS])
            ],
        },
        "profile": {
            "resolution": resolution,
            "sample_steps": sample_steps,
            "guidance_scale": 1.0,
            "model_prediction_type": "raw",
        },
        "launch": {"output_name": lora.stem},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    status = {
        "state": EXTERNAL_STATE,
        "reason": f"{lora.resolve()} (blake3 {digest[:16]}, {key_format} keys), judged on its own",
    }
    (run_dir / "status.json").write_text(json.dumps(status, indent=2) + "\n", encoding="utf-8")
    # What the report reads: `python -m flux_lora.report SWEEP --with RUN_DIR` shows it as a cell of its own.
    record = {
        "run_id": f"external-{digest[:12]}",
        "name": lora.stem,
        "ablation": {"name": f"{lora.stem} (external file)", "changes": []},
        "external": {"lora_file": str(lora.resolve()), "blake3": digest, "key_format": key_format},
    }
    (run_dir / "run.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return run_dir
