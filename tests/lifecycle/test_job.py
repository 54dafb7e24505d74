"""The runner starts real `accelerate launch` subprocesses (on CPU) and records how they ended."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from flux_lora.engines.base import EngineInputs
from flux_lora.lifecycle.job import ExpectedTraining, accelerate_argv, launch_run
from flux_lora.records import RunState, read_status
from flux_lora.schema import RunConfig
from flux_lora.snapshot import LaunchCommand

JOB = textwrap.dedent(
    """
    import os, sys, time
    print("job started", flush=True)
    print("token in output:", os.environ.get("FLUX_TEST_API_TOKEN"), flush=True)
    if sys.argv[1] == "sleep":
        print("ready", flush=True)
        time.sleep(60)
    sys.exit(int(sys.argv[1]))
    """
)


@pytest.fixture
def job_script(tmp_path: Path) -> Path:
    path = tmp_path / "job.py"
    path.write_text(JOB)
    return path


def test_accelerate_flags_follow_the_tier(compose_run: Callable[..., RunConfig]) -> None:
    inputs = EngineInputs(script_argv=["-m", "some.module", "cfg.json"])
    cpu = accelerate_argv(compose_run(), inputs)
    assert cpu[1:3] == ["-m", "accelerate.commands.launch"]
    assert "--cpu" in cpu and "--multi_gpu" not in cpu
    assert cpu[cpu.index("--mixed_precision") + 1] == "bf16"
    assert cpu[-3:] == ["-m", "some.module", "cfg.json"]
    multi = accelerate_argv(compose_run("profile=fast", "gpu=h100", "gpu.num_gpus=4"), inputs)
    assert multi[multi.index("--num_processes") + 1] == "4"
    assert "--multi_gpu" in multi and "--cpu" not in multi
    single = accelerate_argv(compose_run("profile=fast", "gpu=h100"), inputs)
    assert "--multi_gpu" not in single and "--cpu" not in single


def _cpu_argv(job: Path, arg: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(job),
        arg,
    ]


def test_successful_job_streams_log_and_redacts_secrets(
    tmp_path: Path, job_script: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FLUX_TEST_API_TOKEN", "s3cr3t-value-123")
    status = launch_run(tmp_path, LaunchCommand(_cpu_argv(job_script, "0"), cwd=str(tmp_path), env={}))
    assert status.state == RunState.succeeded and status.exit_code == 0
    log = (tmp_path / "train.log").read_text()
    assert "job started" in log and "s3cr3t-value-123" not in log and "token in output: ***" in log
    assert "s3cr3t-value-123" not in capsys.readouterr().out
    on_disk = read_status(tmp_path)
    assert on_disk is not None and on_disk.state == RunState.succeeded and on_disk.duration_s is not None


def test_failing_job_is_recorded_as_failed(tmp_path: Path, job_script: Path) -> None:
    status = launch_run(tmp_path, LaunchCommand(_cpu_argv(job_script, "3"), cwd=str(tmp_path), env={}))
    assert status.state == RunState.failed and status.exit_code != 0
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "failed"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR2])
def test_stop_signals_are_forwarded_and_run_marked_interrupted(tmp_path: Path, job_script: Path, signum: int) -> None:
    # The launcher itself runs in a subprocess so that the test can signal it as SLURM would.
    code = (
        "from pathlib import Path; from flux_lora.lifecycle.job import launch_run; from flux_lora.snapshot import LaunchCommand; "
        f"launch_run(Path({str(tmp_path)!r}), LaunchCommand({_cpu_argv(job_script, 'sleep')!r}, cwd={str(tmp_path)!r}, env={{}}))"
    )
    launcher = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert launcher.stdout is not None
    for line in launcher.stdout:
        if "ready" in line:
            break
    launcher.send_signal(signum)
    launcher.wait(timeout=60)
    status = read_status(tmp_path)
    assert status is not None and status.state == RunState.interrupted


TRAINING_JOB = textwrap.dedent(
    """
    import math, sys
    from pathlib import Path
    from torch.utils.tensorboard import SummaryWriter

    run_dir, steps, nan_at, write_lora = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "lora"
    first = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    if "oom-line" in sys.argv:
        print("warning: CUDA out of memory on the first try, retried with a smaller chunk", flush=True)
    writer = SummaryWriter(str(run_dir / "logs"))
    for step in range(first, steps + 1):
        writer.add_scalar("loss/current", math.nan if step == nan_at else 1.0 / step, step)
    writer.close()
    if write_lora:
        (run_dir / "output").mkdir(exist_ok=True)
        (run_dir / "output" / "flux-lora.safetensors").write_bytes(b"lora bytes")
    """
)


@pytest.mark.parametrize(
    ("steps", "nan_at", "lora", "reason"),
    [
        (4, 0, "lora", None),
        (0, 0, "none", "exited 0 but trained 0 of 4 steps and wrote no LoRA (flux-lora.safetensors missing)"),
        (2, 0, "lora", "exited 0 but trained 2 of 4 steps"),
        (4, 0, "none", "exited 0 but wrote no LoRA (flux-lora.safetensors missing)"),
        (4, 3, "lora", "exited 0 but the loss became NaN/inf at step 3"),
    ],
)
def test_exit_0_is_success_only_when_the_artefacts_show_every_step_trained(
    tmp_path: Path, steps: int, nan_at: int, lora: str, reason: str | None
) -> None:
    # A plain python job (no accelerate needed to judge artefacts) writing real TensorBoard events.
    job = tmp_path / "training_job.py"
    job.write_text(TRAINING_JOB)
    command = LaunchCommand(
        [sys.executable, str(job), str(tmp_path), str(steps), str(nan_at), lora], cwd=str(tmp_path), env={}
    )
    status = launch_run(tmp_path, command, ExpectedTraining(max_train_steps=4, output_name="flux-lora"))
    assert status.exit_code == 0
    assert (status.state, status.reason) == (
        (RunState.succeeded, None) if reason is None else (RunState.failed, reason)
    )


def _training(tmp_path: Path, *args: str, from_step: int = 0):
    job = tmp_path / "training_job.py"
    job.write_text(TRAINING_JOB)
    command = LaunchCommand([sys.executable, str(job), str(tmp_path), *args], cwd=str(tmp_path), env={})
    return launch_run(
        tmp_path, command, ExpectedTraining(max_train_steps=8, output_name="flux-lora", from_step=from_step)
    )


@pytest.mark.slow
def test_a_nan_in_an_abandoned_attempt_does_not_fail_the_clean_retry(tmp_path: Path) -> None:
    first = _training(tmp_path, "5", "5", "none")  # steps 1-5, NaN at 5, no LoRA
    assert first.state == RunState.failed and "NaN/inf at step 5" in first.reason
    time.sleep(1.1)  # TensorBoard wall times order the attempts
    second = _training(tmp_path, "8", "0", "lora", "5", from_step=4)  # resumed from step 4: steps 5-8, finite
    assert (second.state, second.reason) == (RunState.succeeded, None)
    assert [a["state"] for a in second.attempts] == ["failed", "succeeded"]
    assert [a["from_step"] for a in second.attempts] == [0, 4]
    # Time adds up over attempts, and each attempt records the command it ran.
    assert second.duration_s == pytest.approx(sum(a["duration_s"] for a in second.attempts), abs=0.02)
    assert all(a["command"][0] == sys.executable and a["command"][-1] in ("none", "5") for a in second.attempts)


def test_out_of_memory_text_does_not_fail_a_job_that_exited_0_with_its_artefacts(tmp_path: Path) -> None:
    status = _training(tmp_path, "8", "0", "lora", "1", "oom-line")
    assert (status.state, status.reason) == (RunState.succeeded, None)


SCRIPTED_JOB = textwrap.dedent(
    """
    import sys, time
    for line in sys.argv[2:]:
        print(line, flush=True)
        time.sleep(0.05)
    if sys.argv[1] == "hang":
        time.sleep(120)  # a trainer that would go on with a NaN loss: the launcher must stop it
    sys.exit(int(sys.argv[1]) if sys.argv[1] != "hang" else 0)
    """
)


def _scripted(tmp_path: Path, end: str, *lines: str):
    job = tmp_path / "scripted_job.py"
    job.write_text(SCRIPTED_JOB)
    command = LaunchCommand([sys.executable, str(job), end, *lines], cwd=str(tmp_path), env={})
    expect = ExpectedTraining(
        max_train_steps=10, output_name="flux-lora", memory_advice="gpu.batch_size=1, gpu.fp8_base=true"
    )
    return launch_run(tmp_path, command, expect)


def test_a_nan_loss_in_sd_scripts_progress_stops_the_job_and_fails_the_run(tmp_path: Path) -> None:
    started = time.monotonic()
    status = _scripted(
        tmp_path,
        "hang",
        "steps:  10%| | 1/10 [00:01<00:09, 1.0it/s, avr_loss=0.31]",
        "steps:  20%| | 2/10 [00:02<00:08, 1.0it/s, avr_loss=nan]",
    )
    assert time.monotonic() - started < 60  # stopped at once, not after the job's two minutes
    assert status.state == RunState.failed and status.reason == "loss became NaN at step 2; last good checkpoint: none"


def test_out_of_memory_is_named_with_the_settings_that_would_help(tmp_path: Path) -> None:
    status = _scripted(
        tmp_path, "1", "steps: 1/10 loss=0.5", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    )
    assert status.state == RunState.failed and status.reason.startswith(
        "out of memory (torch.OutOfMemoryError: CUDA out of memory"
    )
    assert status.reason.endswith("to use less memory: gpu.batch_size=1, gpu.fp8_base=true")


def test_a_failure_names_its_last_error_line(tmp_path: Path) -> None:
    status = _scripted(tmp_path, "1", "steps: 1/10 loss=0.5", "ValueError: image 07.jpg could not be decoded")
    assert (
        status.state == RunState.failed
        and status.reason == "exit code 1: ValueError: image 07.jpg could not be decoded"
    )


UNSAVING_JOB = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from torch.utils.tensorboard import SummaryWriter

    run_dir = Path(sys.argv[1])
    state = run_dir / "output" / "flux-lora-step00000004-state"  # as sd-scripts saves one: no manifest
    state.mkdir(parents=True)
    (state / "train_state.json").write_text(json.dumps({"current_step": 4}))
    for name in ("optimizer.bin", "random_states_0.pkl"):
        (state / name).write_bytes(b"x" * 64)
    writer = SummaryWriter(str(run_dir / "logs"))
    for step in range(1, 7):
        writer.add_scalar("loss/current", 1.0 / step, step)
    writer.close()
    print("ready", flush=True)
    time.sleep(60)  # dies of the stop signal: it cannot save, like sd-scripts
    """
)


def test_a_job_that_cannot_save_on_a_signal_says_how_many_steps_were_lost(tmp_path: Path) -> None:
    job = tmp_path / "unsaving_job.py"
    job.write_text(UNSAVING_JOB)
    code = (
        "from pathlib import Path; from flux_lora.lifecycle.job import ExpectedTraining, launch_run; "
        "from flux_lora.snapshot import LaunchCommand; "
        f"launch_run(Path({str(tmp_path)!r}), LaunchCommand([{sys.executable!r}, {str(job)!r}, {str(tmp_path)!r}], cwd={str(tmp_path)!r}, env={{}}), "
        "ExpectedTraining(max_train_steps=10, output_name='flux-lora'))"
    )
    launcher = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert launcher.stdout is not None
    for line in launcher.stdout:
        if "ready" in line:
            break
    launcher.send_signal(signal.SIGTERM)
    launcher.wait(timeout=60)
    status = read_status(tmp_path)
    assert status is not None and status.state == RunState.interrupted
    assert status.reason.endswith("flux-lora-step00000004-state; 2 step(s) trained after it (up to step 6) are lost"), (
        status.reason
    )
