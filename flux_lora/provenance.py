"""Provenance: what a run is, in one record that travels inside every LoRA file it saves.

Freeze writes `lora_record.json` into the run folder: the whole resolved config (secrets redacted), the run id and
its lineage, the code version (commit, dirty flag, a hash of the diff), package versions, the engine's version
record and the dataset fingerprint. The native job puts it into each LoRA's safetensors metadata under
`flux_lora.record` as it saves; after every attempt the launcher adds it to any LoRA that lacks it (sd-scripts'
files). kohya's `ss_*` keys are left as they are. `load_record` reads it back from a run folder or a LoRA file,
so `python -m flux_lora.replay` and `python -m flux_lora.diff` work from either.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import socket
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from flux_lora.checkpoint_files import read_safetensors_metadata, safetensors_problem, update_safetensors_metadata
from flux_lora.redaction import redact

RECORD_FILE = "lora_record.json"
METADATA_KEY = "flux_lora.record"
RECORD_FORMAT = 1
# Packages whose versions change what trains (the full list stays in repro.json).
TRAINING_PACKAGES = (
    "torch",
    "diffusers",
    "peft",
    "accelerate",
    "transformers",
    "bitsandbytes",
    "safetensors",
    "flux-lora",
)


def build_record(
    run_id: str,
    lineage: dict | None,
    resolved: dict[str, Any],
    repro: dict[str, Any],
    fingerprint: dict | None,
    id_inputs: dict | None = None,
) -> dict[str, Any]:
    """The run's full record (secrets redacted), sealed with its digest."""
    git = repro.get("git") or {}
    packages = repro.get("packages") or {}
    record = {
        "format": RECORD_FORMAT,
        "run_id": run_id,
        # What the run id hashes besides the config: a reader can check that the record is the run it names.
        "run_id_inputs": id_inputs,
        "lineage": lineage,
        "config": resolved,
        "code": {
            "commit": git.get("commit"),
            "dirty": git.get("dirty"),
            "diff_sha256": hashlib.sha256((git.get("diff") or "").encode()).hexdigest() if git.get("diff") else None,
        },
        "packages": {name: packages.get(name) for name in TRAINING_PACKAGES if name in packages},
        "python": (repro.get("python") or "").split()[0] or None,
        "engine": repro.get("engine"),
        "dataset": {
            "content_hash": (fingerprint or {}).get("content_hash"),
            "n_files": (fingerprint or {}).get("n_files"),
        },
        **(
            {"class_images": {"content_hash": classes["content_hash"], "n_files": classes["n_files"]}}
            if (classes := (fingerprint or {}).get("regularization"))
            else {}
        ),
    }
    return seal(json.loads(redact(json.dumps(record))))


# ------------------------------------------------------------------------------------------ sharing and integrity


class EmbedRecord(str, Enum):
    """What a LoRA file carries (launch.embed_record)."""

    shareable = "shareable"  # the recipe, dataset hash and counts, code and package versions; no paths, hosts, users
    full = "full"  # the run folder's whole record, for private use
    none = "none"  # kohya's ss_* keys only


def seal(record: dict[str, Any]) -> dict[str, Any]:
    """The record with `digest`: sha256 of its compact JSON without the digest (an edit that does not redo it shows)."""
    body = {k: v for k, v in record.items() if k != "digest"}
    return {**body, "digest": hashlib.sha256(compact(body).encode()).hexdigest()}


def _private_markers() -> list[str]:
    markers = [socket.gethostname(), socket.getfqdn(), os.path.expanduser("~")]
    try:
        markers.append(getpass.getuser())
    except (KeyError, OSError):
        pass
    return [m for m in dict.fromkeys(markers) if m and len(m) >= 3 and m not in ("/", "root", "localhost")]


def is_private_value(value: Any, markers: list[str] | None = None) -> bool:
    """A value that tells where or by whom a run was trained: an absolute path, a host or user name."""
    if not isinstance(value, str):
        return False
    text = value.strip()
    if text.startswith(("/", "~", "\\")) or re.match(r"^[A-Za-z]:[\\/]", text):
        return True
    return any(marker in text for marker in (_private_markers() if markers is None else markers))


def withhold_private(tree: Any, prefix: str = "", markers: list[str] | None = None) -> tuple[Any, list[str]]:
    """A copy of a nested record with every private value replaced by None, and the dotted keys it withheld."""
    markers = _private_markers() if markers is None else markers
    if isinstance(tree, dict):
        out, withheld = {}, []
        for key, value in tree.items():
            out[key], inner = withhold_private(value, f"{prefix}{key}.", markers)
            withheld += inner
        return out, withheld
    if isinstance(tree, list):
        items = [withhold_private(value, f"{prefix}{i}.", markers) for i, value in enumerate(tree)]
        return [item for item, _ in items], [key for _, inner in items for key in inner]
    return (None, [prefix.rstrip(".")]) if is_private_value(tree, markers) else (tree, [])


def shareable_record(record: dict[str, Any]) -> dict[str, Any]:
    """What a shared LoRA carries: the record without absolute paths, host and user names (the keys it withheld are
    listed), sealed again. A record that was edited keeps its wrong digest's verdict: the edit is said first."""
    body = {k: v for k, v in record.items() if k != "digest"}
    kept, withheld = withhold_private(body)
    return seal({**kept, "shareable": True, "withheld": withheld, "full_digest": record.get("digest")})


def embedded_record_text(record: dict[str, Any]) -> str | None:
    """The record text a LoRA of this run carries under its launch.embed_record (None: no record)."""
    mode = EmbedRecord(((record.get("config") or {}).get("launch") or {}).get("embed_record") or EmbedRecord.full.value)
    if mode == EmbedRecord.none:
        return None
    return compact(shareable_record(record) if mode == EmbedRecord.shareable else record)


def shareable_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """kohya's ss_* and modelspec.* keys without private values (sd-scripts records its dataset and model paths)."""
    markers = _private_markers()
    return {
        k: v for k, v in metadata.items() if not (k.startswith(("ss_", "modelspec.")) and is_private_value(v, markers))
    }


@dataclass(frozen=True)
class Provenance:
    """A run's record, with where it was read from."""

    source: Path
    record: dict[str, Any]
    run_dir: Path | None  # the run folder when read from one (its engine inputs and command can be compared)

    @property
    def config(self) -> dict[str, Any]:
        return self.record["config"]

    @property
    def withheld(self) -> list[str]:
        """The config keys a shareable record left out (dotted, without the leading `config.`)."""
        return [k.removeprefix("config.") for k in self.record.get("withheld") or [] if k.startswith("config.")]


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
            fingerprint = (
                json.loads((path / "dataset_fingerprint.json").read_text())
                if (path / "dataset_fingerprint.json").is_file()
                else None
            )
            config = yaml.safe_load((path / "config.yaml").read_text())
            return Provenance(
                path, build_record(run.get("run_id", ""), run.get("lineage"), config, repro, fingerprint), path
            )
        raise NoRecord(f"{path}: not a run folder (no config.yaml and run.json); give a run folder or a LoRA file")
    if not path.is_file():
        raise NoRecord(f"{path}: no such file or folder")
    problem = safetensors_problem(path)
    if problem:
        raise NoRecord(problem)
    try:
        metadata = read_safetensors_metadata(path)
    except (OSError, ValueError) as exc:
        raise NoRecord(f"{path}: cannot read it as a LoRA ({exc})") from None
    if METADATA_KEY not in metadata:
        trainer = metadata.get("ss_training_engine") or (
            "kohya sd-scripts" if any(k.startswith("ss_") for k in metadata) else "another tool"
        )
        raise NoRecord(
            f"{path}: a LoRA without a flux-lora record (saved by {trainer}); only LoRAs saved by flux-lora can be replayed"
        )
    return Provenance(path, json.loads(metadata[METADATA_KEY]), None)


def embed_record(lora: Path, record_text: str | None, shareable: bool = False) -> bool:
    """Give a LoRA file the run's record as its launch.embed_record says (sd-scripts writes its own files, with its
    own paths among the ss_* keys); returns whether the file changed."""

    def update(meta: dict[str, str]) -> dict[str, str] | None:
        if METADATA_KEY in meta:
            return None  # the trainer embedded it already
        new = shareable_metadata(meta) if shareable else dict(meta)
        if record_text is not None:
            new[METADATA_KEY] = record_text
        return new if new != meta else None

    return update_safetensors_metadata(lora, update)


def embed_in_outputs(run_dir: Path) -> list[str]:
    """Every LoRA under the run's output/ carries the record (what the launcher does after each attempt)."""
    record = Path(run_dir) / RECORD_FILE
    if not record.is_file():
        return []
    full = json.loads(record.read_text())
    text = embedded_record_text(full)
    shareable = ((full.get("config") or {}).get("launch") or {}).get("embed_record", "full") != EmbedRecord.full.value
    done = []
    for lora in sorted((Path(run_dir) / "output").rglob("*.safetensors")):
        if "-state" in lora.parent.name or lora.name.startswith("."):
            continue  # training states hold the LoRA's raw weights, not a LoRA file
        try:
            if embed_record(lora, text, shareable):
                done.append(lora.name)
        except (OSError, ValueError):
            continue  # a truncated file is the verdict's business, not ours
    return done


def compact(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"))
