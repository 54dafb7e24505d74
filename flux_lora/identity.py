"""What defines a run: its semantic config (without log paths and the like), how two configs differ, its run id,
and whether a record is still the run its id names.

Used by the check (a resume source's recipe), freeze (the run id) and the report (what a cell changed).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from flux_lora.provenance import seal
from flux_lora.schema import NON_SEMANTIC_KEYS


def drop_key(tree: dict[str, Any], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node: Any = tree
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(leaf, None)


def semantic_config(resolved: dict[str, Any], dataset_content_hash: str) -> dict[str, Any]:
    """What defines a run: the resolved config without log paths and the like, with the dataset by content."""
    tree = json.loads(json.dumps(resolved))
    for key in NON_SEMANTIC_KEYS:
        drop_key(tree, key)
    tree.setdefault("dataset", {})["content_hash"] = dataset_content_hash
    return tree


def config_leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as {"dotted.key": value}."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(config_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every semantic key that differs between two resolved configs."""
    a, b = config_leaves(semantic_config(old, "")), config_leaves(semantic_config(new, ""))
    return [
        f"{key}: {a.get(key)!r} -> {b.get(key)!r}" for key in sorted(a.keys() | b.keys()) if a.get(key) != b.get(key)
    ]


def compute_run_id(resolved: dict[str, Any], dataset_content_hash: str, lineage: dict[str, Any] | None = None) -> str:
    tree = semantic_config(resolved, dataset_content_hash)
    if lineage:
        tree["lineage"] = lineage
    canonical = json.dumps(tree, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------ a record's integrity


def record_problem(record: dict[str, Any]) -> str | None:
    """One line when the record was edited or does not match its run id; None when it checks out (or predates seals)."""
    digest = record.get("digest")
    if digest is None:
        return None  # written before records were sealed: nothing to check against
    if seal(record)["digest"] != digest:
        return "its embedded record was edited after it was written (its digest does not match its content)"
    inputs = record.get("run_id_inputs")
    if inputs and not [key for key in record.get("withheld") or [] if _is_semantic(key)]:
        recomputed = compute_run_id(record["config"], inputs.get("training_set") or "missing", inputs.get("lineage"))
        if recomputed != record.get("run_id"):
            return f"its record does not match its run id: the recorded config hashes to {recomputed}, the record says {record.get('run_id')}"
    return None


def _is_semantic(withheld_key: str) -> bool:
    if not withheld_key.startswith("config."):
        return False
    key = withheld_key.removeprefix("config.")
    return not any(key == k or key.startswith(f"{k}.") for k in NON_SEMANTIC_KEYS)
