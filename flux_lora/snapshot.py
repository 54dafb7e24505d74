"""Freeze: write everything that defines a run into its directory before anything starts.

The job reads only these files, so what is recorded is what ran:
  config.yaml               the resolved config
  run.json                  run id, name, command-line overrides, ablation, options not applied, warnings, checks
  <engine files>            e.g. native_config.json, or dataset.toml + sample_prompts.txt for sd-scripts
  command.json              argv, working directory, environment additions
  repro.json                git state and diff, host, Python, packages, torch/CUDA/GPU, seed, engine code
  lora_record.json          the record every LoRA of the run carries in its metadata (provenance.py)
  dataset_fingerprint.json  content hash plus per-file manifest
  training_set.json         the (image, caption, repeats) pairs that train; both engines read it
  dataset_report.json, dataset_contact_sheet.png   the preflight analysis
  reg_dataset_report.json   the class images' analysis (dataset.reg_path)
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from flux_lora.check_report import CheckReport
from flux_lora.checkpoint_files import WriteFailed, atomic_write_text
from flux_lora.dataset import DatasetError, fingerprint_dataset, write_contact_sheet
from flux_lora.dataset.training_set import TRAINING_SET_FILE
from flux_lora.engines.base import Engine, EngineInputs
from flux_lora.gpu_probe import probe_gpus, torch_cuda_build
from flux_lora.identity import compute_run_id
from flux_lora.provenance import RECORD_FILE, build_record
from flux_lora.records import POINTER_FILE, register_run_dir
from flux_lora.redaction import is_secret_name, recorded_environment, redact
from flux_lora.schema import RunConfig


@dataclass(frozen=True)
class LaunchCommand:
    """The frozen command (command.json): what the runner starts, exactly."""

    argv: list[str]
    cwd: str
    env: dict[str, str]  # additions to the launcher's environment


# Builds the `accelerate launch ...` command (runner.launch_command); passed in so freeze records it.
LaunchCommandBuilder = Callable[[RunConfig, EngineInputs], LaunchCommand]


CLAIM_FILE = ".flux-lora-claim"


def claim_run_dir(run_dir: Path) -> Path:
    """The run directory this launch owns: run_dir, or run_dir-2, -3, ... when another launch holds it.

    The claim is an exclusively created file, so two launches started in the same second (same name
    from the clock) never share a folder, whatever the timing; nothing in a taken folder is touched.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    candidate, n = run_dir, 1
    while True:
        try:
            with open(candidate / CLAIM_FILE, "x") as claim:
                claim.write(f"{platform.node()} {os.getpid()}\n")
            if (candidate / "run.json").exists() or (candidate / POINTER_FILE).exists():
                raise FileExistsError  # frozen before claims existed: taken all the same
            return candidate
        except FileExistsError:
            n += 1
            candidate = run_dir.with_name(f"{run_dir.name}-{n}")
            try:
                candidate.mkdir(parents=True)
            except FileExistsError:
                continue


def dataset_fingerprint(run: RunConfig, report: CheckReport) -> dict | None:
    if report.dataset_report is not None:
        fingerprint = report.dataset_report.fingerprint  # the preflight already hashed every byte
        if report.reg_report is not None:  # the class images' files, apart: the subject's hash stays what it was
            fingerprint = fingerprint | {
                "regularization": report.reg_report.fingerprint | {"path": report.reg_report.dataset_path}
            }
        return fingerprint
    try:
        return fingerprint_dataset(Path(run.dataset.path), run.dataset.caption_extension)
    except DatasetError:
        return None  # missing or empty: the check has already refused the run with that reason


def run_lineage(report: CheckReport) -> dict[str, Any] | None:
    """Where the run's weights come from when not all from its own recipe: the run and step it resumes from and the
    recipe keys changed there. Part of the run id, so such a run is never taken for a clean run of its recipe."""
    lineage: dict[str, Any] = {}
    source = report.resume_source
    if source:
        lineage.update(
            from_run=source.get("run_id"),
            from_run_dir=source.get("run_dir"),
            from_step=source.get("step"),
            state=source.get("state"),
            recipe_changes=list(source.get("recipe_changes", [])),
        )
    if report.init_lora:
        lineage.update(init_lora=report.init_lora["path"], init_lora_sha256=report.init_lora["sha256"])
    return lineage or None


def run_id_inputs(report: CheckReport, fingerprint: dict | None) -> dict[str, Any]:
    """What the run id hashes besides the semantic config: the training set's content and the lineage's identity."""
    # The dataset as it trains (images, captions, repeats), else the folder's bytes.
    content = (
        report.training_set.content_hash
        if report.training_set is not None
        else (fingerprint["content_hash"] if fingerprint else "missing")
    )
    lineage = run_lineage(report)
    # A run without lineage keeps the id it always had; one with lineage is told apart by where it came from.
    # Where files lie is not what the weights are: the source run's id and step, the LoRA's hash are.
    identity = {k: v for k, v in (lineage or {}).items() if k not in ("from_run_dir", "state", "init_lora")} or None
    return {"training_set": content, "lineage": identity}


def run_identity(resolved: dict[str, Any], report: CheckReport, fingerprint: dict | None) -> str:
    inputs = run_id_inputs(report, fingerprint)
    return compute_run_id(resolved, inputs["training_set"], inputs["lineage"])


def earlier_runs_with_id(outputs: Path, run_id: str, exclude: Path) -> list[Path]:
    """Run directories under outputs that froze the same semantic config (the same run id)."""
    found = []
    for record in outputs.rglob("run.json") if outputs.is_dir() else []:
        if record.parent != exclude and f'"run_id": "{run_id}"' in record.read_text(errors="replace"):
            found.append(record.parent)
    return sorted(found)


def _git(args: list[str], cwd: Path) -> str | None:
    if shutil.which("git") is None:
        return None
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    return done.stdout if done.returncode == 0 else None


def git_state(repo: Path) -> dict[str, Any]:
    commit = _git(["rev-parse", "HEAD"], repo)
    if commit is None:
        return {"commit": None, "dirty": None, "diff": None, "note": "not a git checkout"}
    status = _git(["status", "--porcelain", "--untracked-files=no"], repo) or ""
    diff = _git(["diff", "HEAD"], repo) or ""
    return {"commit": commit.strip(), "dirty": bool(status.strip()), "diff": diff}


def _metadata_headers(text: str) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the body (long description) follows the first blank line
        key, sep, value = line.partition(": ")
        if sep and key in ("Name", "Version"):
            headers.setdefault(key, value.strip())
    return headers


def package_versions() -> dict[str, str]:
    # In-process from installed metadata: same answer as `pip freeze`, without a subprocess. Only the two
    # header lines are read: `dist.metadata` runs the email parser over every file (80 ms of each launch).
    versions = {}
    for dist in importlib.metadata.distributions():
        headers = _metadata_headers(dist.read_text("METADATA") or dist.read_text("PKG-INFO") or "")
        if headers.get("Name"):
            versions[headers["Name"]] = headers.get("Version", "")
    return dict(sorted(versions.items(), key=lambda kv: kv[0].lower()))


def installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def accelerator_state() -> dict[str, Any]:
    # From package metadata and NVML/nvidia-smi: importing torch here cost the launcher 2 s; the job
    # itself records what torch sees on the device it trains on.
    return {"torch": installed_version("torch"), "cuda_build": torch_cuda_build(), **probe_gpus().as_record()}


def repro_record(run: RunConfig, engine: Engine, project_root: Path) -> dict[str, Any]:
    return {
        "git": git_state(project_root),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": sys.version,
        "executable": sys.executable,
        "packages": package_versions(),
        "accelerator": accelerator_state(),
        "environment": recorded_environment(),
        "seed": run.profile.seed,
        "engine": engine.version_record(run),
    }


@dataclass(frozen=True)
class FrozenRun:
    run_dir: Path
    run_id: str
    command: LaunchCommand | None  # None when errors stopped the engine from rendering


def _write_text(path: Path, text: str) -> None:
    # Every snapshot file goes through here: a secret never lands on disk, whatever carried it (a config value,
    # a git diff, an engine input, a URL with a password or a token in its query). Whole or absent (a full disk
    # leaves no zero-length run.json), and a failure names the file and the room left.
    try:
        atomic_write_text(path, redact(text))
    except OSError as exc:
        raise WriteFailed(path, exc) from None


def _write_json(path: Path, data: Any) -> None:
    _write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def _safe_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if not is_secret_name(k)}


def freeze_run(
    run: RunConfig,
    resolved: dict[str, Any],
    report: CheckReport,
    engine: Engine,
    run_dir: Path,
    project_root: Path,
    launch_command: LaunchCommandBuilder,
    overrides: list[str],
    cost_estimate: dict[str, Any] | None = None,
) -> FrozenRun:
    """Write the run's record; render the engine's inputs unless config errors make that meaningless."""
    asked, run_dir = run_dir, claim_run_dir(run_dir)
    if run_dir != asked:
        report.infos.append(
            f"{asked} holds another launch's run; flux-lora never shares or overwrites one: this run is in {run_dir}"
        )
    dataset_path = Path(run.dataset.path)
    fingerprint = dataset_fingerprint(run, report)
    run_id = run_identity(resolved, report, fingerprint)

    for earlier in earlier_runs_with_id(Path(run.paths.outputs), run_id, exclude=run_dir):
        report.infos.append(f"run id {run_id} already frozen in {earlier} (same semantic config and dataset)")

    _write_text(run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True))
    if fingerprint is not None:
        _write_json(run_dir / "dataset_fingerprint.json", fingerprint)
    if report.training_set is not None:
        _write_text(
            run_dir / TRAINING_SET_FILE, json.dumps(report.training_set.to_dict(), indent=2, ensure_ascii=False) + "\n"
        )
    if report.dataset_report is not None:
        report.dataset_report.write_json(run_dir / "dataset_report.json")
        write_contact_sheet(report.dataset_report, dataset_path, run_dir / "dataset_contact_sheet.png")
    if report.reg_report is not None:
        report.reg_report.write_json(run_dir / "reg_dataset_report.json")

    command: LaunchCommand | None = None
    if not report.errors:
        inputs = engine.render(run, run_dir, report.not_applied)
        for name, text in inputs.files.items():
            _write_text(run_dir / name, text)
        report.errors.extend(engine.check_inputs(run, inputs))
        if not report.errors:
            report.engine_preflight = engine.preflight(run, inputs)
            if report.engine_preflight["state"] == "failed":
                report.errors.append(
                    f"engine preflight ({run.engine.name.value}, in {report.engine_preflight.get('python')}): {report.engine_preflight['problem']}"
                )
        command = launch_command(run, inputs)
        _write_json(run_dir / "command.json", {"argv": command.argv, "cwd": command.cwd, "env": _safe_env(command.env)})

    repro = repro_record(run, engine, project_root)
    _write_json(run_dir / "repro.json", repro)
    # What every LoRA of this run carries in its metadata, so the file alone can be replayed or diffed.
    _write_json(
        run_dir / RECORD_FILE,
        build_record(run_id, run_lineage(report), resolved, repro, fingerprint, run_id_inputs(report, fingerprint)),
    )
    _write_json(
        run_dir / "run.json",
        {
            "run_id": run_id,
            "name": run.name,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "overrides": overrides,
            "dry_run": run.launch.dry_run,
            "engine": run.engine.name.value,
            "ablation": {"name": run.ablation.name, "changes": list(run.ablation.changes)},
            "not_applied": report.not_applied,
            "errors": report.errors,
            "warnings": report.warnings,
            "infos": report.infos,
            "refusal": report.refusal,
            "dataset_gate_passed": report.gate.passed if report.gate else None,
            **({"reg_gate_passed": report.reg_gate.passed} if report.reg_gate else {}),
            "engine_preflight": report.engine_preflight,
            "resume_source": report.resume_source,
            "cost_estimate": cost_estimate,  # said before the run started (cost.py); the summary sets it beside what it took
            # Not null: the weights do not all come from this recipe (resumed from another run, recipe changed).
            "lineage": run_lineage(report),
        },
    )
    register_run_dir(Path(run.paths.outputs), run_id, run_dir)
    return FrozenRun(run_dir=run_dir, run_id=run_id, command=command)
