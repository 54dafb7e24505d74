"""End to end through the real CLI (`python launch.py ...` in a subprocess): compose, check, freeze,
`accelerate launch`, train, snapshot, report.

The sd-scripts cases cannot run kohya's trainer here (no GPU, no 24 GB weights, no checkout): they
use the stand-in script tests/engines/sd_scripts_standin.py (copied into a fake checkout), which parses the argv with a parser
built from sd-scripts' option table and writes the files sd-scripts would write. The weight files
given to it are empty placeholders, since the stand-in never reads them.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from flux_lora.checkpoint_files import read_safetensors_metadata
from flux_lora.provenance import METADATA_KEY
from tests.cli import ONE_THREAD, run_cli, start_cli
from tests.engines.sd_scripts_checkout import sd_scripts_run_args, standin_checkout
from tests.engines.sd_scripts_standin import STANDIN_LORA_ENV
from tests.eval.tiny_eval import EVAL_SECTIONS, SMALL_EVAL_ARGS

SECRET = "hf_e2e-secret-never-recorded"
FAST_NATIVE = [
    "profile.max_train_steps=4",
    "profile.lr_warmup_steps=1",
    "profile.save_every_n_steps=2",
    "profile.sample_every_n_steps=4",
    "profile.sample_steps=2",
]


def launch(
    args: list[str], tmp_path: Path, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The launcher with a secret in its environment (HF_TOKEN), which no file of the run may hold (assert_no_secret)."""
    return run_cli(*args, folder=tmp_path, env={"HF_TOKEN": SECRET, **(extra_env or {})})


def run_dirs(tmp_path: Path) -> list[Path]:
    return sorted(p.parent for p in (tmp_path / "outputs").rglob("run.json"))


def assert_no_secret(run_dir: Path) -> None:
    for path in run_dir.rglob("*"):
        if path.is_file() and path.suffix in {".json", ".yaml", ".log", ".txt", ".toml"}:
            assert SECRET not in path.read_text(errors="replace"), path


def assert_complete_snapshot(run_dir: Path, engine_files: list[str]) -> dict:
    for name in [
        "config.yaml",
        "run.json",
        "status.json",
        "command.json",
        "repro.json",
        "dataset_fingerprint.json",
        "dataset_report.json",
        "dataset_contact_sheet.png",
        *engine_files,
    ]:
        assert (run_dir / name).is_file(), f"{run_dir.name} lacks {name}"
    repro = json.loads((run_dir / "repro.json").read_text())
    assert repro["packages"] and repro["seed"] == 42 and "git" in repro
    fingerprint = json.loads((run_dir / "dataset_fingerprint.json").read_text())
    assert fingerprint["n_files"] >= 10 and len(fingerprint["content_hash"]) >= 32
    assert_no_secret(run_dir)
    return json.loads((run_dir / "run.json").read_text())


@pytest.mark.slow
def test_embedded_default_trains_end_to_end(tmp_path: Path) -> None:
    evaluation = [
        "eval.enabled=true",
        "eval.strengths=[1.0]",
        "eval.seeds=[0]",
        "eval.max_prompts=1",
        "eval.heldout_prompts=false",
    ]
    done = launch([*FAST_NATIVE, *evaluation], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path)
    assert run_dir.parent.name == "runs" and run_dir.name.endswith("_tiny-smoke-cpu-native")
    # Evaluated at the end of the run, from its run directory alone (flux_lora/eval).
    evaluation_record = json.loads((run_dir / "eval" / "eval.json").read_text())
    assert evaluation_record["schema_version"] == 1 and evaluation_record["load_check"]["passed"] is True
    # Held out by default (8 sample photos: one), never trained, and every place that shows the number says so.
    held_out = json.loads((run_dir / "training_set.json").read_text())["validation"]
    assert len(held_out) == 1 and held_out[0]["image"] not in {
        e["image"] for e in json.loads((run_dir / "training_set.json").read_text())["examples"]
    }
    assert "1 image(s) held out for validation by default" in done.stdout
    validation = evaluation_record["validation"]
    assert (
        validation["images"] == "held-out"
        and validation["count"] == 1
        and evaluation_record["basis"]["images"] == "held-out"
    )
    assert "validation loss on held-out images (never trained)" in " ".join(
        done.stdout.split()
    )  # the evaluator's summary (wrapped at 80)
    report = run_cli(str(run_dir), module="flux_lora.report", cwd=tmp_path)
    assert report.returncode == 0, report.stdout[-2000:] + report.stderr[-2000:]
    assert "val loss final (held-out images)" in (run_dir / "report.md").read_text()
    assert_complete_snapshot(run_dir, ["native_config.json", "train.log"])
    assert json.loads((run_dir / "status.json").read_text())["state"] == "succeeded"
    command = json.loads((run_dir / "command.json").read_text())
    assert command["argv"][1:3] == ["-m", "accelerate.commands.launch"] and command["env"] == {
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
    }
    assert command["argv"][-3:] == ["-m", "flux_lora.engines.native.train", str(run_dir)]
    output = run_dir / "output"
    assert (output / "flux-lora.safetensors").is_file()
    device = json.loads((output / "device.json").read_text())  # the job's own account
    assert device["device"] == "cpu"
    # The threads the user set (tests/conftest.py sets OMP_NUM_THREADS=1) are the job's, not accelerate's default.
    assert device["cpu_threads"] == int(os.environ["OMP_NUM_THREADS"]) == 1
    assert (output / "flux-lora-step00000002.safetensors").is_file()
    assert list((output / "sample").glob("flux-lora_000004_0[0-4]_*.png"))
    assert list((run_dir / "logs").rglob("events.out.tfevents.*"))
    assert "LoRA update scale alpha/rank = 8/8 = 1" in done.stdout


@pytest.mark.slow
def test_sd_scripts_ablation_sweep_dry_run(tmp_path: Path) -> None:
    from flux_lora.engines.sd_scripts import check_args_against_reference

    # A secret pasted into a config value is redacted from every snapshot file (assert_no_secret).
    # No dataset.bucket_reso_steps: the sample dataset's buckets take sd-scripts' step (64) by default.
    args = [
        "sweep=ablation",
        "engine=sd_scripts",
        "model=flux_dev",
        "launch.dry_run=true",
        f"dataset.class_tokens={SECRET}",
    ]
    done = launch(args, tmp_path)
    assert done.returncode == 1, (
        done.stdout[-3000:] + done.stderr[-3000:]
    )  # a2 and a6 are refused: not a finished sweep
    dirs = run_dirs(tmp_path)
    assert len(dirs) == 9
    states = {}
    for run_dir in dirs:
        run = assert_complete_snapshot(run_dir, ["dataset.toml", "sample_prompts.txt"])
        assert "bucket_reso_steps = 64" in (run_dir / "dataset.toml").read_text()
        states[run["ablation"]["name"]] = json.loads((run_dir / "status.json").read_text())["state"]
        argv = json.loads((run_dir / "command.json").read_text())["argv"]
        script = next(i for i, a in enumerate(argv) if a.endswith("flux_train_network.py"))
        assert check_args_against_reference(argv[script + 1 :]) == []
        assert "--noise_offset" not in argv and "--min_snr_gamma" not in argv
    assert states.pop("a2_noise_offset") == "refused" and states.pop("a6_min_snr") == "refused"
    assert set(states.values()) == {"dry_run"}
    assert "has no effect with engine=sd_scripts" in done.stdout
    assert "sweep" in done.stdout and "a6_min_snr" in done.stdout  # the summary table


@pytest.mark.slow
def test_sd_scripts_engine_runs_through_accelerate_with_standin(tmp_path: Path) -> None:
    args = sd_scripts_run_args(tmp_path)
    checkout = standin_checkout(tmp_path / "sd-scripts")
    # The stand-in writes real kohya LoRA files for the tiny model, so the evaluator can judge this run below.
    done = launch(args, tmp_path, {"SD_SCRIPTS_DIR": str(checkout), STANDIN_LORA_ENV: "tiny"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path)
    run = assert_complete_snapshot(run_dir, ["dataset.toml", "sample_prompts.txt", "train.log"])
    assert set(run["not_applied"]) == {"profile.noise_offset", "profile.min_snr_gamma"}
    assert run["engine_preflight"]["state"] == "passed"  # the stand-in's checks (tests/engines/sd_scripts_checkout.py)
    assert json.loads((run_dir / "status.json").read_text())["state"] == "succeeded"
    assert (run_dir / "output" / "flux-lora.safetensors").is_file()
    # sd-scripts writes its own LoRA files; the launcher adds the run's record to each after the attempt.
    for lora in (run_dir / "output").glob("*.safetensors"):
        metadata = read_safetensors_metadata(lora)
        assert json.loads(metadata[METADATA_KEY])["run_id"] == run["run_id"] and metadata["ss_steps"]
    assert done.stdout.count("has no effect with engine=sd_scripts") == 2
    # The report reads sd-scripts' TensorBoard events (no train_summary.json from that engine).
    from flux_lora.report import read_run

    row = read_run(run_dir)
    assert row.state == "succeeded" and row.final_loss is not None and row.run_id == run["run_id"]

    # The evaluator judges it with the same code and the same kinds of numbers as a native run (tests/eval);
    # the tiny model stands in for the FLUX.1-dev weights this machine lacks.
    evaluated = run_cli(str(run_dir), "--base-model", "tiny", *SMALL_EVAL_ARGS, module="flux_lora.eval", env=ONE_THREAD)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    result = json.loads((run_dir / "eval" / "eval.json").read_text())
    assert set(result) == EVAL_SECTIONS
    assert (
        result["run"]["engine"] == "sd_scripts"
        and result["run"]["model"] == "flux_dev"
        and result["run"]["base_model_stand_in"]
    )
    assert [(p["step"], p.get("final")) for p in result["validation"]["curve"]] == [
        (0, False),
        (2, False),
        (4, False),
        (4, True),
    ]
    assert (
        result["validation"]["images"] == "held-out"
        and result["validation"]["final"]["loss"] != result["validation"]["base_loss"]
    )
    assert result["load_check"]["passed"] and result["comfy_keys"]["passed"]
    assert (
        len(result["samples"]) == 2 * 3 * 2 and result["likeness"]["ceiling"]["faces_found"] == 7
    )  # one photo held out


def test_config_errors_are_one_line(tmp_path: Path) -> None:
    for override, expected in [
        ("profile.resolutoin=512", "error: profile.resolutoin: unknown key"),
        ("gpu.batch_size=two", "error: gpu.batch_size: wrong value"),
        ("profile=medium", "error: profile=medium: no such option in conf/profile/"),
    ]:
        done = launch([override], tmp_path)
        assert done.returncode == 2
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(expected), done.stderr
    assert not (tmp_path / "outputs").exists()


def test_failing_dataset_gate_stops_before_anything_starts(tmp_path: Path) -> None:
    data = tmp_path / "broken"
    data.mkdir()
    (data / "a.jpg").write_text("not an image")
    (data / "a.txt").write_text("TOK Woman, portrait")
    done = launch([f"dataset.path={data}"], tmp_path)
    assert done.returncode == 1
    (run_dir,) = run_dirs(tmp_path)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "refused" and "a.jpg" in status["reason"]
    assert not (run_dir / "output").exists() and not (run_dir / "train.log").exists()
    assert sorted(p.name for p in data.iterdir()) == ["a.jpg", "a.txt"]  # the dataset is untouched


@pytest.mark.slow
def test_sweep_through_submitit_launcher(tmp_path: Path) -> None:
    # submitit's local executor runs each cell as its own process, the same path SLURM jobs take
    # (the scheduler itself cannot run here).
    args = [
        "-m",
        "hydra/launcher=submitit_local",
        "ablation=baseline,a6_min_snr",
        "engine=sd_scripts",
        "model=flux_dev",
        "launch.dry_run=true",
    ]
    done = launch(args, tmp_path)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]  # a refused cell: the sweep is not done
    states = {d.name.split("-")[-1]: json.loads((d / "status.json").read_text())["state"] for d in run_dirs(tmp_path)}
    assert states == {"baseline": "dry_run", "a6_min_snr": "refused"}


@pytest.mark.slow
def test_ctrl_c_stops_the_sweep_and_marks_the_cell_interrupted(tmp_path: Path) -> None:
    import signal

    # 100 steps: the first progress line comes at step 5 (every 5%), long before the cell could end.
    launcher = start_cli("sweep=ablation", "ablation.baseline_steps=100", folder=tmp_path)
    assert launcher.stdout is not None
    for line in launcher.stdout:
        if line.startswith("step "):  # the first cell is training
            break
    launcher.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C delivers to the launcher
    rest = launcher.stdout.read()
    assert launcher.wait(timeout=120) != 0
    (run_dir,) = run_dirs(tmp_path)  # the sweep stopped: no second cell was started
    assert json.loads((run_dir / "status.json").read_text())["state"] == "interrupted"
    assert "interrupted" in rest and "sweep" in rest  # the summary table is still printed
