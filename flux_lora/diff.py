"""Diff: what differs between two runs, from their run folders or their LoRA files, and nothing else.

    python -m flux_lora.diff A B

Sections, each shown only when something in it differs: the recipe (semantic config keys), lineage, settings
outside the recipe (paths, launch and eval switches; the run's name and ablation label are left out, since the
keys they stand for are shown), engine inputs (run folders only: the frozen engine files and command, each
run's own folder written as <run>), environment (code version, packages, Python, engine code) and dataset.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from flux_lora.identity import config_differences, config_leaves, record_problem
from flux_lora.provenance import NoRecord, Provenance, load_record

ENGINE_FILES = ("native_config.json", "dataset.toml", "sample_prompts.txt", "command.json")
LABELS = ("name", "ablation.")  # derived from the keys that differ: showing them again says nothing new


def _leaf_changes(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    left, right = config_leaves(a), config_leaves(b)
    return [
        f"{prefix}{key}: {left.get(key)!r} -> {right.get(key)!r}"
        for key in sorted(left.keys() | right.keys())
        if left.get(key) != right.get(key)
    ]


def _settings_changes(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    semantic = {line.split(":")[0] for line in config_differences(a, b)}
    return [line for line in _leaf_changes(a, b) if line.split(":")[0] not in semantic and not line.startswith(LABELS)]


def _engine_input(run_dir: Path, name: str) -> Any | None:
    path = run_dir / name
    if not path.is_file():
        return None
    text = path.read_text().replace(str(run_dir.absolute()), "<run>").replace(str(run_dir), "<run>")
    return json.loads(text) if name.endswith(".json") else text


def _engine_changes(a: Path, b: Path) -> list[str]:
    lines: list[str] = []
    for name in ENGINE_FILES:
        left, right = _engine_input(a, name), _engine_input(b, name)
        if left == right:
            continue
        if isinstance(left, dict) and isinstance(right, dict):
            lines += _leaf_changes(left, right, prefix=f"{name} ")
        elif isinstance(left, str) and isinstance(right, str):
            old, new = set(left.splitlines()), set(right.splitlines())
            lines += [f"{name} - {line}" for line in left.splitlines() if line not in new]
            lines += [f"{name} + {line}" for line in right.splitlines() if line not in old]
        else:
            lines.append(
                f"{name}: {'absent' if left is None else 'present'} -> {'absent' if right is None else 'present'}"
            )
    return lines


def _without_labels(lines: list[str], a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Engine inputs repeat the run's name and ablation label (metadata, log names): not a difference of their own."""
    pairs = [
        (a.get("name"), b.get("name")),
        ((a.get("ablation") or {}).get("name"), (b.get("ablation") or {}).get("name")),
    ]
    endings = tuple(f": {old!r} -> {new!r}" for old, new in pairs if old != new)
    return [line for line in lines if not (endings and line.endswith(endings))]


def _withheld_lines(lines: list[str], withheld: set[str]) -> list[str]:
    """A key a shareable record left out is unknown on that side, not a difference."""
    return [line for line in lines if line.split(":")[0].removeprefix("config.") not in withheld]


def differences(a: Provenance, b: Provenance) -> dict[str, list[str]]:
    """Section -> `what: old -> new` lines; only sections with a difference (keys a shareable record withheld are
    left out of the comparison)."""
    ra, rb = a.record, b.record
    withheld = set(a.withheld) | set(b.withheld) | {k for r in (ra, rb) for k in r.get("withheld") or []}
    sections = {
        "recipe": config_differences(a.config, b.config),
        "lineage": []
        if ra.get("lineage") == rb.get("lineage")
        else [f"lineage: {ra.get('lineage')} -> {rb.get('lineage')}"],
        "settings outside the recipe": _settings_changes(a.config, b.config),
        "engine inputs": _without_labels(_engine_changes(a.run_dir, b.run_dir), a.config, b.config)
        if a.run_dir and b.run_dir
        else [],
        "environment": _leaf_changes(
            {k: ra.get(k) for k in ("code", "packages", "python", "engine")},
            {k: rb.get(k) for k in ("code", "packages", "python", "engine")},
        ),
        "dataset": _leaf_changes({"dataset": ra.get("dataset")}, {"dataset": rb.get("dataset")}),
    }
    sections = {name: _withheld_lines(lines, withheld) for name, lines in sections.items()}
    return {name: lines for name, lines in sections.items() if lines}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flux_lora.diff", description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path, help="a run folder or a LoRA file saved by flux-lora")
    parser.add_argument("b", type=Path, help="another one")
    args = parser.parse_args(argv)
    try:
        a, b = load_record(args.a), load_record(args.b)
    except NoRecord as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for source, prov in ((args.a, a), (args.b, b)):
        if record_problem(prov.record):  # said first: an edited record's differences are not what trained
            print(f"warning: {source}: {record_problem(prov.record)}")
    found = differences(a, b)
    if not found:
        print(f"no differences: {args.a} and {args.b} are the same run (same recipe, inputs, environment and dataset)")
        return 0
    for name, lines in found.items():
        print(f"{name}:")
        for line in lines:
            print(f"  {line}")
    return 1  # like diff(1): differences found


if __name__ == "__main__":
    sys.exit(main())
