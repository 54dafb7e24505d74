"""Replay: train a run again from its run folder or from one of its LoRA files alone.

    python -m flux_lora.replay RUN_DIR_OR_LORA [--dry-run] [--outputs DIR] [--dataset DIR] [--allow-changed-dataset]

The record (provenance.py) holds the whole resolved config. Replay first says how this machine differs from the
record (code commit and uncommitted diff, training packages, Python, the sd-scripts checkout's commit, the
dataset's content), refuses a dataset whose content changed unless --allow-changed-dataset, then launches
`launch.py` with exactly the recorded values over the usual composition (a primary config that extends
conf/config.yaml and sets every recorded key), as a new run (`launch.resume=never`): its config.yaml equals the
original's but for `launch.*`, and its run id is the same. --outputs and --dataset move where it lands and where the
images are read from (neither is part of the run's identity; the dataset's content is checked either way).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from flux_lora.compose import PROJECT_ROOT
from flux_lora.dataset import DatasetError, fingerprint_dataset
from flux_lora.identity import drop_key, record_problem
from flux_lora.provenance import NoRecord, Provenance, load_record
from flux_lora.snapshot import git_state, installed_version


def drift(prov: Provenance, config: dict[str, Any]) -> list[str]:
    """How this machine differs from what the record says trained the run (one line each)."""
    record, lines = prov.record, []
    code, now = record.get("code") or {}, git_state(PROJECT_ROOT)
    if code.get("commit") and now.get("commit") != code["commit"]:
        lines.append(
            f"code: recorded at commit {code['commit'][:12]}, this checkout is at {(now.get('commit') or 'no commit')[:12]}"
        )
    if code.get("dirty"):
        lines.append("code: the recorded run had uncommitted changes (its diff is in the run folder's repro.json)")
    if now.get("dirty"):
        lines.append("code: this checkout has uncommitted changes")
    for name, version in (record.get("packages") or {}).items():
        installed = installed_version(name)
        if installed != version:
            lines.append(f"package {name}: recorded {version}, installed {installed}")
    python = sys.version.split()[0]
    if record.get("python") and record["python"] != python:
        lines.append(f"python: recorded {record['python']}, running {python}")
    engine = record.get("engine") or {}
    if engine.get("engine") == "sd_scripts":
        from flux_lora.engines.sd_scripts import checkout_commit

        checkout = (config.get("engine") or {}).get("sd_scripts_dir") or os.environ.get("SD_SCRIPTS_DIR")
        commit = checkout_commit(Path(checkout)) if checkout and Path(checkout).is_dir() else None
        if commit != engine.get("commit"):
            lines.append(
                f"sd-scripts: recorded commit {engine.get('commit')}, checkout {checkout or '(none)'} at {commit}"
            )
    return lines


def dataset_problem(prov: Provenance, config: dict[str, Any]) -> str | None:
    """None when the dataset's content is the recorded one; else one line saying what differs."""
    recorded = (prov.record.get("dataset") or {}).get("content_hash")
    data = config.get("dataset") or {}
    path = Path(data.get("path") or "")
    try:
        now = fingerprint_dataset(path, data.get("caption_extension", ".txt"))
    except DatasetError as exc:
        return f"dataset.path={path}: {exc}; give the images with --dataset DIR"
    if recorded and now["content_hash"] != recorded:
        return (
            f"dataset.path={path}: its content changed since the run ({now['n_files']} files, content {now['content_hash'][:12]}, "
            f"recorded {recorded[:12]}); restore it, point --dataset at the original, or pass --allow-changed-dataset"
        )
    recorded_classes = (prov.record.get("class_images") or {}).get("content_hash")
    if recorded_classes and data.get("reg_path"):
        reg_path = Path(data["reg_path"])
        try:
            classes = fingerprint_dataset(reg_path, data.get("caption_extension", ".txt"))
        except DatasetError as exc:
            return f"dataset.reg_path={reg_path}: {exc}; restore the class images or pass --allow-changed-dataset"
        if classes["content_hash"] != recorded_classes:
            return (
                f"dataset.reg_path={reg_path}: the class images changed since the run ({classes['n_files']} files); "
                "restore them or pass --allow-changed-dataset"
            )
    return None


def replay_command(config_dir: Path, dry_run: bool) -> list[str]:
    return [
        sys.executable,
        str(PROJECT_ROOT / "launch.py"),
        "--config-dir",
        str(config_dir),
        "--config-name",
        "replay",
        "launch.resume=never",
        *(["launch.dry_run=true"] if dry_run else []),
    ]


def write_replay_config(config: dict[str, Any], folder: Path) -> Path:
    """A primary config that composes as usual (conf/config.yaml: groups, Hydra settings, callbacks) and then sets
    every recorded value, so nothing the record holds is left to today's defaults."""
    folder.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    (folder / "replay.yaml").write_text(
        f"# Replay of a recorded run (python -m flux_lora.replay).\ndefaults:\n  - config\n  - _self_\n\n{body}"
    )
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flux_lora.replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a run folder, or a LoRA file saved by flux-lora (alone is enough)")
    parser.add_argument("--dry-run", action="store_true", help="compose, check and freeze the replay; train nothing")
    parser.add_argument("--outputs", type=Path, help="paths.outputs for the replay (default: the recorded one)")
    parser.add_argument("--dataset", type=Path, help="dataset.path for the replay (default: the recorded one)")
    parser.add_argument(
        "--allow-changed-dataset", action="store_true", help="replay on a dataset whose content changed"
    )
    parser.add_argument(
        "--class-images", type=Path, help="dataset.reg_path for the replay (a shareable record withholds it)"
    )
    parser.add_argument(
        "--allow-edited-record",
        action="store_true",
        help="replay a record that was edited or does not match its run id",
    )
    args = parser.parse_args(argv)
    try:
        prov = load_record(args.source)
    except NoRecord as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if record_problem(prov.record) and not args.allow_edited_record:
        print(
            f"error: {args.source}: {record_problem(prov.record)}; it is not the run it says it is (--allow-edited-record replays it anyway)",
            file=sys.stderr,
        )
        return 2
    if record_problem(prov.record):
        print(f"warning: {args.source}: {record_problem(prov.record)} (replaying anyway: --allow-edited-record)")
    config = json.loads(json.dumps(prov.config))
    for key in prov.withheld:  # a shareable record: this machine's settings (conf/local, the defaults) fill them in
        drop_key(config, key)
    if "dataset.path" in prov.withheld and not args.dataset:
        print(
            f"error: {args.source}: a shareable record withholds where the images were (dataset.path); give them with --dataset DIR",
            file=sys.stderr,
        )
        return 2
    if "dataset.reg_path" in prov.withheld and prov.record.get("class_images") and not args.class_images:
        print(
            f"error: {args.source}: a shareable record withholds where the class images were (dataset.reg_path); give them with "
            "--class-images DIR",
            file=sys.stderr,
        )
        return 2
    if args.class_images:
        config["dataset"] = {**config.get("dataset", {}), "reg_path": str(args.class_images.absolute())}
    if prov.withheld:
        print(
            f"info: a shareable record: {len(prov.withheld)} setting(s) come from this machine: {', '.join(prov.withheld)}"
        )
    if args.outputs:
        config["paths"] = {
            **config.get("paths", {}),
            "outputs": str(args.outputs.absolute()),
            "cache": str(args.outputs.absolute() / "cache"),
        }
    if args.dataset:
        config["dataset"] = {**config.get("dataset", {}), "path": str(args.dataset.absolute())}
    print(
        f"replaying run {prov.record.get('run_id')} from {args.source}"
        + (f" (lineage: {prov.record['lineage']})" if prov.record.get("lineage") else "")
    )
    for line in drift(prov, config):
        print(f"drift: {line}")
    problem = dataset_problem(prov, config)
    if problem and not args.allow_changed_dataset:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if problem:
        print(f"warning: {problem} (replaying anyway: --allow-changed-dataset)")
    outputs = Path((config.get("paths") or {}).get("outputs") or PROJECT_ROOT / "outputs")
    outputs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".replay-", dir=outputs) as folder:
        command = replay_command(write_replay_config(config, Path(folder)), args.dry_run)
        return subprocess.run(command, cwd=os.getcwd(), check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
