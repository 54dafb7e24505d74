"""GPU probe: what CUDA GPUs the launcher sees without torch, and that the launcher never imports torch.

Test double: where a test needs GPUs this machine lacks, only the probe's view of the hardware is
replaced, by a fake `nvidia-smi` script first on PATH that prints what the real one prints (or fails
as it fails without a driver). Everything else runs for real.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from flux_lora.compose import PROJECT_ROOT
from flux_lora.gpu_probe import Gpu, apply_visible_devices, probe_gpus, visible_entries
from tests.cli import LAUNCH_PY, child_env, in_folder, run_cli

H100_LINE = "NVIDIA H100 80GB HBM3, 81559 MiB, 550.54.15"
DRIVER_FAILURE = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."

# With pynvml installed the probe asks NVML first, and a fake nvidia-smi would not be consulted.
needs_nvidia_smi_path = pytest.mark.skipif(
    importlib.util.find_spec("pynvml") is not None, reason="pynvml installed: the probe asks NVML"
)


def fake_nvidia_smi(tmp_path: Path, stdout: str, exit_code: int = 0) -> Path:
    """A bin/ folder whose nvidia-smi prints `stdout` and exits with `exit_code`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "nvidia-smi"
    lines = " ".join(shlex.quote(line) for line in stdout.splitlines())
    script.write_text(
        f"#!/bin/sh\nprintf '%s\\n' {lines}\nexit {exit_code}\n"
    )  # builtins only: PATH may hold just this folder
    script.chmod(0o755)
    return bin_dir


@pytest.fixture
def no_cuda_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return monkeypatch


@needs_nvidia_smi_path
def test_probe_reads_nvidia_smi(tmp_path: Path, no_cuda_env: pytest.MonkeyPatch) -> None:
    bin_dir = fake_nvidia_smi(tmp_path, f"{H100_LINE}\n{H100_LINE}")
    no_cuda_env.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    probe = probe_gpus()
    assert probe.problem is None and probe.source == "nvidia-smi"
    assert probe.gpus == (Gpu("NVIDIA H100 80GB HBM3", 81559, "550.54.15"),) * 2
    no_cuda_env.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert len(probe_gpus().gpus) == 1


@needs_nvidia_smi_path
def test_probe_says_why_no_gpu_is_visible(tmp_path: Path, no_cuda_env: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    no_cuda_env.setenv("PATH", str(empty))
    assert probe_gpus().problem == "nvidia-smi not found"

    bin_dir = fake_nvidia_smi(tmp_path, DRIVER_FAILURE, exit_code=9)
    no_cuda_env.setenv("PATH", str(bin_dir))
    assert probe_gpus().problem == f"nvidia-smi failed: {DRIVER_FAILURE}"

    bin_dir = fake_nvidia_smi(tmp_path, H100_LINE)
    for hidden in ("", "-1"):
        no_cuda_env.setenv("CUDA_VISIBLE_DEVICES", hidden)
        probe = probe_gpus()
        assert probe.gpus == () and probe.problem == f"CUDA_VISIBLE_DEVICES={hidden!r} hides every GPU"


def test_visible_devices_follow_cuda_rules() -> None:
    gpus = [Gpu(f"gpu{i}", 1, "d") for i in range(4)]
    assert visible_entries("0,1,-1,2") == ["0", "1"]  # CUDA stops at the first invalid entry
    assert [g.name for g in apply_visible_devices(gpus, "2,0")] == ["gpu2", "gpu0"]
    assert [g.name for g in apply_visible_devices(gpus, "1,7,2")] == ["gpu1"]
    assert len(apply_visible_devices(gpus, "GPU-8d3f,GPU-11aa")) == 2
    assert apply_visible_devices(gpus, None) == gpus


def test_torch_cuda_build_read_without_importing_torch() -> None:
    code = "import sys; from flux_lora.gpu_probe import torch_cuda_build; print(repr(torch_cuda_build()), 'torch' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    import torch

    assert done.stdout.split() == [repr(torch.version.cuda), "False"]


# Runs launch.py as __main__ in one interpreter, then says which heavy modules it imported.
IMPORT_PROBE = """
import runpy, sys
sys.path.insert(0, sys.argv[1])
script, sys.argv = sys.argv[2], sys.argv[2:]
code = 0
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as exc:
    code = exc.code
print("HEAVY_MODULES=" + ",".join(m for m in ("torch", "diffusers", "transformers") if m in sys.modules))
sys.exit(code)
"""


@pytest.mark.parametrize(
    "setup", [[], ["model=flux_dev"], ["engine=sd_scripts", "model=flux_dev", "dataset.bucket_reso_steps=64"]]
)
def test_launcher_dry_run_imports_no_torch_diffusers_or_transformers(tmp_path: Path, setup: list[str]) -> None:
    # torch alone cost 2 s of a 3.7 s dry run; the training job imports it, the launcher has no use for it.
    # Not run_cli: launch.py runs inside the probe (runpy), which then lists the modules it loaded.
    args = [
        sys.executable,
        "-c",
        IMPORT_PROBE,
        str(PROJECT_ROOT),
        str(LAUNCH_PY),
        *in_folder(["launch.dry_run=true", *setup], tmp_path),
    ]
    done = subprocess.run(args, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "HEAVY_MODULES=\n" in done.stdout, done.stdout.splitlines()[-1]
    assert "dry_run" in done.stdout


@needs_nvidia_smi_path
def test_cuda_tier_launch_is_refused_by_gpu_count(tmp_path: Path) -> None:
    bin_dir = fake_nvidia_smi(tmp_path, H100_LINE)
    fake = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    # One visible H100: a dry run has nothing to say about the GPU ...
    done = run_cli("gpu=h100", "launch.dry_run=true", folder=tmp_path, env=fake, drop=["CUDA_VISIBLE_DEVICES"])
    assert done.returncode == 0 and "CUDA GPU" not in done.stdout + done.stderr, done.stderr
    # ... and a real launch asking for two is refused before anything starts.
    done = run_cli("gpu=h100", "gpu.num_gpus=2", folder=tmp_path, env=fake, drop=["CUDA_VISIBLE_DEVICES"])
    assert done.returncode == 1
    assert (
        done.stderr.strip()
        == "error: gpu.num_gpus=2: only 1 CUDA GPU(s) visible on this machine (per nvidia-smi); set gpu.num_gpus=1 or run on a node with 2"
    )
