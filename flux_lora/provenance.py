"""Provenance: what a run is, in one record that travels inside every LoRA file it saves.

Freeze writes `lora_record.json` into the run folder: the whole resolved config (secrets redacted), the run id and
its lineage, the code version (commit, dirty flag, a hash of the diff), package versions, the engine's version
record and the dataset fingerprint. The native job puts it into each LoRA's safetensors metadata under
`flux_lora.record` as it saves; after every attempt the launcher adds it to any LoRA that lacks it (sd-scripts'
files). kohya's `ss_*` keys are left as they are. `load_record` reads it back from a run folder or a LoRA file,
so `python -m flux_lora.replay` and `python -m flux_lora.diff` work from either.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from flux_lora.checkpoint_files import read_safetensors_metadata, update_safetensors_metadata

RECORD_FILE = "lora_record.json"
METADATA_KEY = "flux_lora.record"
RECORD_FORMAT = 1
# Packages whose versions change what trains (the full list stays in repro.json).
TRAINING_PACKAGES = ("torch", "diffusers", "peft", "accelerate", "transformers", "bitsandbytes", "safetensors", "flux-lora")


def build_record(run_id: str, lineage: Optional[dict], resolved: dict[str, Any], repro: dict[str, Any],
                 fingerprint: Optional[dict]) -> dict[str, Any]:  # fmt: skip
    git = repro.get("git") or {}
    packages = repro.get("packages") or {}
    return {
        "format": RECORD_FORMAT,
        "run_id": run_id,
        "lineage": lineage,
        "config": resolved,
        "code": {"commit": git.get("commit"), "dirty": git.get("dirty"),
                 "diff_sha256": hashlib.sha256((git.get("diff") or "").encode()).hexdigest() if git.get("diff") else None},  # fmt: skip
        "packages": {name: packages.get(name) for name in TRAINING_PACKAGES if name in packages},
        "python": (repro.get("python") or "").split()[0] or None,
        "engine": repro.get("engine"),
        "dataset": {"content_hash": (fingerprint or {}).get("content_hash"), "n_files": (fingerprint or {}).get("n_files")},
        **({"class_images": {"content_hash": classes["content_hash"], "n_files": classes["n_files"]}}
           if (classes := (fingerprint or {}).get("regularization")) else {}),  # fmt: skip
    }


@dataclass(frozen=True)
class Provenance:
    """A run's record, with where it was read from."""

    source: Path
    record: dict[str, Any]
    run_dir: Optional[Path]  # the run folder when read from one (its engine inputs and command can be compared)

    @property
    def config(self) -> dict[str, Any]:
        return self.record["config"]


class NoRecord(ValueError):
    """A path that carries no flux-lora record: one line saying what it is and what would."""


def load_record(path: Path) -> Provenance:
    """The record of a run folder (its lora_record.json, else its config.yaml and snapshot) or of a LoRA file."""
    path = Path(path)
    if path.is_dir():
        if (path / RECORD_FILE).is_file():
            return Provenance(path, json.loads((path / RECORD_FILE).read_text()), path)
        if (path / "config.yaml").is_file() and (path / "run.json").is_file():  # frozen before records existed
            run = json.loads((path / "run.json").read_text())
            repro = json.loads((path / "repro.json").read_text()) if (path / "repro.json").is_file() else {}
            fingerprint = json.loads((path / "dataset_fingerprint.json").read_text()) if (path / "dataset_fingerprint.json").is_file() else None
            config = yaml.safe_load((path / "config.yaml").read_text())
            return Provenance(path, build_record(run.get("run_id", ""), run.get("lineage"), config, repro, fingerprint), path)
        raise NoRecord(f"{path}: not a run folder (no config.yaml and run.json); give a run folder or a LoRA file")
    if not path.is_file():
        raise NoRecord(f"{path}: no such file or folder")
    try:
        metadata = read_safetensors_metadata(path)
    except (OSError, ValueError) as exc:
        raise NoRecord(f"{path}: cannot read it as a LoRA ({exc})") from None
    if METADATA_KEY not in metadata:
        trainer = metadata.get("ss_training_engine") or ("kohya sd-scripts" if any(k.startswith("ss_") for k in metadata) else "another tool")
        raise NoRecord(f"{path}: a LoRA without a flux-lora record (saved by {trainer}); only LoRAs saved by flux-lora can be replayed")
    return Provenance(path, json.loads(metadata[METADATA_KEY]), None)


def embed_record(lora: Path, record_text: str) -> bool:
    """Add the run's record to a LoRA file that lacks it (sd-scripts writes its own files); returns whether it did."""
    return update_safetensors_metadata(lora, lambda meta: None if METADATA_KEY in meta else {**meta, METADATA_KEY: record_text})


def embed_in_outputs(run_dir: Path) -> list[str]:
    """Every LoRA under the run's output/ carries the record (what the launcher does after each attempt)."""
    record = Path(run_dir) / RECORD_FILE
    if not record.is_file():
        return []
    text = compact(json.loads(record.read_text()))
    done = []
    for lora in sorted((Path(run_dir) / "output").rglob("*.safetensors")):
        if "-state" in lora.parent.name or lora.name.startswith("."):
            continue  # training states hold the LoRA's raw weights, not a LoRA file
        try:
            if embed_record(lora, text):
                done.append(lora.name)
        except (OSError, ValueError):
            continue  # a truncated file is the verdict's business, not ours
    return done


def compact(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"))
