"""Class (regularization) images through the real CLI on both engines' paths (issue 17 item 2): the launch checks
them, records them (training_set.json, fingerprint, run id) and each engine trains them as planned. What trained is
read back from the run's outputs: the native engine's TensorBoard (class images per step, their loss), the sd-scripts
stand-in's log of what DreamBoothDataset registers and its LoRA metadata (sd-scripts itself cannot run here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flux_lora.checkpoint_files import read_safetensors_metadata
from flux_lora.lifecycle.outcome import scalar_series
from flux_lora.provenance import load_record
from flux_lora.replay import dataset_problem
from tests.class_images import write_class_images
from tests.cli import run_cli
from tests.engines.sd_scripts_checkout import sd_scripts_run_args, standin_checkout
from tests.test_launch_e2e import run_dirs


def _plan(run_dir: Path) -> dict[str, int]:
    training_set = json.loads((run_dir / "training_set.json").read_text())
    return {e["image"]: e["per_epoch"] for e in training_set["regularization"]}


@pytest.mark.slow
def test_native_trains_the_class_images_at_their_weight(tmp_path: Path) -> None:
    classes = write_class_images(tmp_path / "classes")
    # prior_loss_weight=0 makes the weight visible in the log: a step on a class image (batch size 1) has loss 0.
    args = [
        f"dataset.reg_path={classes}",
        "dataset.prior_loss_weight=0",
        "profile.max_train_steps=14",
        "profile.lr_warmup_steps=1",
        "profile.save_every_n_steps=100",
        "profile.sample_every_n_steps=100",
        "profile.resolution=64",
        "dataset.min_bucket_reso=64",
    ]
    done = run_cli(*args, folder=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path)
    assert json.loads((run_dir / "status.json").read_text())["state"] == "succeeded"
    # 7 subject photos train (one of 8 held out), so the 4 class images fill 7 places: 2, 2, 2, 1 (kohya's rule)
    assert _plan(run_dir) == {"class_0.jpg": 2, "class_1.jpg": 2, "class_2.jpg": 2, "class_3.jpg": 1}
    assert "class images: 4 of them, 7 places per epoch beside 7 subject places, loss weight 0" in done.stdout
    assert "dataset.prior_loss_weight=0 with dataset.reg_path" in done.stdout  # the warning that it teaches nothing
    per_step = {step: value for step, value, _ in scalar_series(run_dir / "logs", "data/class_images")}
    losses = {step: value for step, value, _ in scalar_series(run_dir / "logs", "loss/current")}
    assert (
        sorted(per_step) == list(range(1, 15)) and sum(per_step.values()) == 7
    )  # one epoch: 14 places, 7 of them class
    assert all((losses[step] == 0.0) == (per_step[step] == 1.0) for step in per_step), (per_step, losses)
    metadata = read_safetensors_metadata(run_dir / "output" / "flux-lora.safetensors")
    assert (metadata["ss_num_train_images"], metadata["ss_num_reg_images"], metadata["ss_prior_loss_weight"]) == (
        "7",
        "4",
        "0.0",
    )
    fingerprint = json.loads((run_dir / "dataset_fingerprint.json").read_text())
    assert fingerprint["regularization"]["n_files"] == 5 and fingerprint["regularization"]["path"] == str(classes)
    assert json.loads((run_dir / "reg_dataset_report.json").read_text())["summary"]["n_usable"] == 4
    run = json.loads((run_dir / "run.json").read_text())
    assert run["reg_gate_passed"] is True
    # The LoRA alone carries the class images' content: replay finds them as recorded, and refuses them changed.
    prov = load_record(run_dir / "output" / "flux-lora.safetensors")
    assert prov.record["class_images"]["n_files"] == 5 and "config.dataset.reg_path" in prov.record["withheld"]
    prov = load_record(run_dir)  # the run folder's whole record: where the class images are
    assert dataset_problem(prov, prov.record["config"]) is None
    (classes / "class_3.jpg").unlink()
    assert dataset_problem(prov, prov.record["config"]).startswith(
        f"dataset.reg_path={classes}: the class images changed since the run"
    )


@pytest.mark.slow
def test_sd_scripts_gets_is_reg_subsets_and_the_prior_loss_weight(tmp_path: Path) -> None:
    classes = write_class_images(tmp_path / "classes")
    args = [
        *sd_scripts_run_args(tmp_path),
        f"dataset.reg_path={classes}",
        "dataset.reg_repeats=2",
        "dataset.prior_loss_weight=0.5",
    ]
    done = run_cli(*args, folder=tmp_path, env={"SD_SCRIPTS_DIR": str(standin_checkout(tmp_path / "sd-scripts"))})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path)
    assert json.loads((run_dir / "status.json").read_text())["state"] == "succeeded"
    import tomllib

    subsets = tomllib.loads((run_dir / "dataset.toml").read_text())["datasets"][0]["subsets"]
    assert [(s.get("is_reg", False), s["num_repeats"]) for s in subsets] == [(False, 1), (True, 2)]
    view_classes = Path(subsets[1]["image_dir"])
    assert sorted(p.name for p in view_classes.iterdir()) == [
        f"class_{i}.{x}" for i in range(4) for x in ("jpg", "txt")
    ]
    assert (view_classes / "class_2.txt").read_text() == "woman\n"  # no caption file: the class tokens, written out
    argv = json.loads((run_dir / "command.json").read_text())["argv"]
    assert argv[argv.index("--prior_loss_weight") + 1] == "0.5"
    # What the stand-in registered from the view (kohya's loop, its own code) is the plan the launcher recorded:
    # 7 places, repeats of 2 registered whole: 2, 2, 2, 2 (the last one overshoots, as kohya's does).
    log = (run_dir / "train.log").read_text()
    registered = json.loads(log.split("reg images per epoch (stand-in): ")[1].splitlines()[0])
    assert registered == _plan(run_dir) == {"class_0.jpg": 2, "class_1.jpg": 2, "class_2.jpg": 2, "class_3.jpg": 2}
    assert "7 train images with repeats." in log and "8 reg images with repeats." in log
    metadata = read_safetensors_metadata(run_dir / "output" / "flux-lora.safetensors")
    assert (metadata["ss_num_reg_images"], metadata["ss_prior_loss_weight"]) == ("8", "0.5")
