"""Provenance: every LoRA carries its run's record; a LoRA alone replays into the same run; diff shows only what
differs. On the shared tiny sweep (tests/seed_sweep.py: baseline and a1_alpha, seeds 1-3, trained for real)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from flux_lora.checkpoint_files import read_safetensors_metadata
from flux_lora.identity import config_leaves
from flux_lora.provenance import METADATA_KEY, shareable_record
from tests.cli import ONE_THREAD, run_cli
from tests.seed_sweep import SWEEP_ARGS, Sweep


def cell(sweep: Sweep, name: str) -> Path:
    (found,) = sweep.path.glob(f"*{name}-seed1")
    return found


def without_launch(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in ("launch", "paths")}


def test_every_lora_of_a_run_carries_its_record_shareable_by_default(seed_sweep: Sweep) -> None:
    run_dir = cell(seed_sweep, "baseline")
    loras = [p for p in (run_dir / "output").glob("*.safetensors")]
    assert len(loras) >= 2  # the step checkpoints and the final LoRA
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    run = json.loads((run_dir / "run.json").read_text())
    full = json.loads((run_dir / "lora_record.json").read_text())  # the run folder keeps the whole record
    assert full["config"] == config and full["run_id"] == run["run_id"]
    for lora in loras:
        metadata = read_safetensors_metadata(lora)
        record = json.loads(metadata[METADATA_KEY])
        assert record == shareable_record(full) and record["run_id"] == run["run_id"]
        withheld = {key.removeprefix("config.") for key in record["withheld"]}
        assert {"dataset.path", "paths.outputs", "paths.root"} <= withheld
        assert {k: v for k, v in config_leaves(record["config"]).items() if k not in withheld} == {
            k: v for k, v in config_leaves(config).items() if k not in withheld
        }
        assert (
            record["dataset"]["content_hash"]
            == json.loads((run_dir / "dataset_fingerprint.json").read_text())["content_hash"]
        )
        assert record["code"]["commit"] and record["packages"]["torch"]
        assert metadata["ss_network_alpha"] and metadata["ss_steps"]  # kohya's keys stay as they were


def test_a_lora_alone_replays_into_the_same_run_and_a_changed_dataset_is_refused(
    seed_sweep: Sweep, tmp_path: Path
) -> None:
    run_dir = cell(seed_sweep, "a1_alpha")
    alone = tmp_path / "alone" / "my-lora.safetensors"
    alone.parent.mkdir()
    shutil.copyfile(run_dir / "output" / "flux-lora.safetensors", alone)  # nothing else travels with it

    done = run_cli(
        str(alone),
        "--dry-run",
        "--outputs",
        str(tmp_path / "replayed"),
        "--dataset",
        json.loads((run_dir / "lora_record.json").read_text())["config"]["dataset"]["path"],
        module="flux_lora.replay",
        cwd=tmp_path / "alone",
        env=ONE_THREAD,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (replayed,) = (tmp_path / "replayed" / "runs").iterdir()
    original, again = (yaml.safe_load((d / "config.yaml").read_text()) for d in (run_dir, replayed))
    assert without_launch(again) == without_launch(original)  # every recorded value, none left to today's defaults
    assert (
        json.loads((replayed / "run.json").read_text())["run_id"]
        == json.loads((run_dir / "run.json").read_text())["run_id"]
    )

    # The same images with one caption changed: refused in one line, unless told.
    changed = tmp_path / "changed"
    shutil.copytree(original["dataset"]["path"], changed)
    caption = sorted(changed.rglob("*.txt"))[0]
    caption.write_text(caption.read_text() + ", smiling")
    refused = run_cli(
        str(alone),
        "--dry-run",
        "--outputs",
        str(tmp_path / "again"),
        "--dataset",
        str(changed),
        module="flux_lora.replay",
        cwd=tmp_path,
        env=ONE_THREAD,
    )
    assert refused.returncode == 2 and not (tmp_path / "again" / "runs").exists()
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith(f"error: dataset.path={changed}: its content changed since the run"), line
    allowed = run_cli(
        str(alone),
        "--dry-run",
        "--outputs",
        str(tmp_path / "again"),
        "--dataset",
        str(changed),
        "--allow-changed-dataset",
        module="flux_lora.replay",
        cwd=tmp_path,
        env=ONE_THREAD,
    )
    assert allowed.returncode == 0 and "replaying anyway" in allowed.stdout, (
        allowed.stdout[-2000:] + allowed.stderr[-2000:]
    )


def test_diff_of_two_ablation_cells_shows_exactly_their_declared_change(seed_sweep: Sweep) -> None:
    baseline, alpha = cell(seed_sweep, "baseline"), cell(seed_sweep, "a1_alpha")
    declared = json.loads((alpha / "run.json").read_text())["ablation"]["changes"]
    assert declared == ["profile.network_alpha"]
    folders = run_cli(str(baseline), str(alpha), module="flux_lora.diff", env=ONE_THREAD)
    assert folders.returncode == 1
    assert folders.stdout.splitlines() == [
        "recipe:",
        "  profile.network_alpha: 1.0 -> 8.0",
        "engine inputs:",
        "  native_config.json network_alpha: 1.0 -> 8.0",
    ]
    files = run_cli(
        str(baseline / "output" / "flux-lora.safetensors"),
        str(alpha / "output" / "flux-lora.safetensors"),
        module="flux_lora.diff",
        env=ONE_THREAD,
    )
    assert files.stdout.splitlines() == ["recipe:", "  profile.network_alpha: 1.0 -> 8.0"]
    same = run_cli(
        str(baseline), str(baseline / "output" / "flux-lora.safetensors"), module="flux_lora.diff", env=ONE_THREAD
    )
    assert same.returncode == 0 and same.stdout.startswith("no differences")


def test_a_file_without_a_record_is_one_line(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.safetensors"
    header = json.dumps({"__metadata__": {"ss_network_dim": "4"}}).encode()
    foreign.write_bytes(len(header).to_bytes(8, "little") + header)
    done = run_cli(str(foreign), module="flux_lora.replay", cwd=tmp_path, env=ONE_THREAD)
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == f"error: {foreign}: a LoRA without a flux-lora record (saved by kohya sd-scripts); only LoRAs saved by flux-lora can be replayed"
    )


@pytest.mark.slow
def test_a_lora_as_starting_point_is_loaded_and_recorded_as_lineage(seed_sweep: Sweep, tmp_path: Path) -> None:
    """launch.init_lora: with a learning rate of 1e-9 (0 is refused: the engines need a positive one) the final LoRA
    is the starting LoRA to within 1e-6, where a fresh LoRA starts with all-zero up weights, so the starting file's
    weights were the ones trained (read back from the output); the run id tells the run apart from a fresh one."""
    import hashlib

    import torch
    from safetensors.torch import load_file

    start = cell(seed_sweep, "a1_alpha") / "output" / "flux-lora.safetensors"
    same = [a for a in SWEEP_ARGS if a.startswith(("profile.resolution", "dataset.min_bucket_reso"))]
    args = [
        *same,
        "ablation=a1_alpha",
        "profile.max_train_steps=2",
        "profile.lr_warmup_steps=0",
        "profile.learning_rate=1e-9",
        "profile.sample_every_n_steps=100",
        "profile.save_every_n_steps=100",
    ]
    done = run_cli(*args, f"launch.init_lora={start}", folder=tmp_path, env=ONE_THREAD)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "starting from the LoRA in" in done.stdout
    (run_dir,) = [p.parent for p in (tmp_path / "outputs").rglob("run.json")]
    trained, initial = load_file(str(run_dir / "output" / "flux-lora.safetensors")), load_file(str(start))
    assert trained.keys() == initial.keys() and all(
        torch.allclose(trained[k].float(), initial[k].float(), rtol=0, atol=1e-6) for k in initial
    )
    assert any(
        initial[k].abs().max() > 1e-3 for k in initial if k.endswith("lora_up.weight")
    )  # not a fresh LoRA's zeros
    lineage = json.loads((run_dir / "run.json").read_text())["lineage"]
    assert lineage["init_lora_sha256"] == hashlib.sha256(start.read_bytes()).hexdigest()
    fresh = run_cli(*args, "launch.dry_run=true", folder=tmp_path, env=ONE_THREAD)
    assert json.loads((run_dir / "run.json").read_text())["run_id"] not in fresh.stdout
