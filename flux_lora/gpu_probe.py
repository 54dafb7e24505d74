"""What CUDA GPUs this machine shows, found without importing torch (2 s the launcher never needs).

NVML answers when pynvml is installed; otherwise `nvidia-smi` does. CUDA_VISIBLE_DEVICES is
applied the way CUDA applies it, so the answer is what a job started from here would see.
The launcher uses it to refuse a CUDA tier where no GPU is visible and to record the hardware
in repro.json; the training job records what torch itself sees.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

NVIDIA_SMI_ARGS = ["--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
NVIDIA_SMI_TIMEOUT_S = 10.0  # a wedged driver can hang nvidia-smi; the launcher must not hang with it


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_mib: int | None
    driver: str | None


@dataclass(frozen=True)
class GpuProbe:
    gpus: tuple[Gpu, ...]  # the GPUs a CUDA job started from here would see
    source: str  # "nvml", "nvidia-smi" or "none"
    problem: str | None = None  # why none are visible, in a few words (e.g. "nvidia-smi not found")

    def as_record(self) -> dict[str, Any]:
        return {"gpu_probe": self.source, "gpus": [asdict(g) for g in self.gpus], "gpu_problem": self.problem}


def visible_entries(value: str) -> list[str]:
    """CUDA_VISIBLE_DEVICES entries CUDA honours: it stops at the first invalid one ("", "-1", ...)."""
    entries = []
    for entry in (e.strip() for e in value.split(",")):
        if not entry or (entry.lstrip("-").isdigit() and int(entry) < 0):
            break
        entries.append(entry)
    return entries


def apply_visible_devices(gpus: list[Gpu], value: str | None) -> list[Gpu]:
    if value is None:
        return gpus
    chosen: list[Gpu] = []
    for entry in visible_entries(value):
        if entry.isdigit():
            if int(entry) >= len(gpus):
                break  # CUDA treats an out-of-range index like any invalid entry
            chosen.append(gpus[int(entry)])
        elif len(chosen) < len(gpus):
            chosen.append(gpus[len(chosen)])  # a UUID: names no index here, but it does count one GPU
    return chosen


def _memory_mib(text: str) -> int | None:
    digits = text.replace("MiB", "").strip()
    return int(digits) if digits.isdigit() else None


def parse_nvidia_smi(stdout: str) -> list[Gpu]:
    gpus = []
    for line in stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3 and parts[0]:
            gpus.append(Gpu(name=parts[0], memory_mib=_memory_mib(parts[1]), driver=parts[2] or None))
    return gpus


def _from_nvidia_smi() -> tuple[list[Gpu], str | None]:
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return [], "nvidia-smi not found"
    try:
        done = subprocess.run(
            [executable, *NVIDIA_SMI_ARGS], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return [], f"nvidia-smi did not answer in {NVIDIA_SMI_TIMEOUT_S:.0f} s"
    except OSError as exc:
        return [], f"nvidia-smi failed to start: {exc.strerror or exc}"
    if done.returncode != 0:
        said = (done.stdout + done.stderr).strip().splitlines()
        return [], f"nvidia-smi failed: {said[0] if said else f'exit code {done.returncode}'}"
    gpus = parse_nvidia_smi(done.stdout)
    return gpus, None if gpus else "nvidia-smi lists no GPU"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _from_nvml() -> tuple[list[Gpu], str | None]:
    try:
        import pynvml
    except ImportError as exc:
        return [], f"pynvml not importable: {exc}"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return [], f"NVML error: {exc}"
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total // 2**20
            gpus.append(Gpu(name=_text(pynvml.nvmlDeviceGetName(handle)), memory_mib=int(memory), driver=driver))
    except pynvml.NVMLError as exc:
        return [], f"NVML error: {exc}"
    finally:
        pynvml.nvmlShutdown()
    return gpus, None if gpus else "NVML lists no GPU"


def probe_gpus() -> GpuProbe:
    """The GPUs a CUDA job started from this process would see, or why there are none."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and not visible_entries(visible):
        return GpuProbe(gpus=(), source="none", problem=f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU")
    source, (gpus, problem) = "nvidia-smi", ([], None)
    if importlib.util.find_spec("pynvml") is not None:
        source, (gpus, problem) = "nvml", _from_nvml()
    if not gpus:
        nvml_problem = problem
        source, (gpus, problem) = "nvidia-smi", _from_nvidia_smi()
        if nvml_problem and problem:
            problem = f"{nvml_problem}; {problem}"
    if not gpus:
        return GpuProbe(gpus=(), source="none", problem=problem)
    shown = apply_visible_devices(gpus, visible)
    if not shown:
        return GpuProbe(
            gpus=(), source=source, problem=f"CUDA_VISIBLE_DEVICES={visible!r} names none of the {len(gpus)} GPUs"
        )
    return GpuProbe(gpus=tuple(shown), source=source)


def torch_cuda_build() -> str | None:
    """The CUDA version torch was built for, read from torch/version.py without importing torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return None
    try:
        tree = ast.parse((Path(spec.origin).parent / "version.py").read_text())
    except (OSError, SyntaxError):
        return None
    for node in tree.body:
        target = (
            node.target
            if isinstance(node, ast.AnnAssign)
            else node.targets[0]
            if isinstance(node, ast.Assign)
            else None
        )
        if isinstance(target, ast.Name) and target.id == "cuda" and isinstance(node.value, ast.Constant):
            return node.value.value
    return None
