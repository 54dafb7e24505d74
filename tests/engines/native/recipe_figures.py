"""What a native run wrote, as figures that must not change when the trainer's code is reorganised: the LoRAs' tensor
bytes and metadata (without its clock readings), the TensorBoard scalars (without timings) and train_summary.json
(without timings). `python -m tests.engines.native.recipe_figures OUT.json` records them from the code checked out."""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

from flux_lora.checkpoint_files import read_safetensors_metadata, tensor_data_sha256

FIGURES_FILE = Path(__file__).with_name("recipe_figures.json")
CLOCK_KEYS = ("ss_training_started_at", "ss_training_finished_at", "modelspec.date")
TIMING_SCALARS = ("perf/seconds_per_step", "perf/peak_memory_gb")
TIMING_SUMMARY = ("seconds", "peak_memory_gb", "stop_lead_s")
PROMPTS = [{"text": "TOK woman, portrait", "seed": 1001}]


def cpu_signature() -> str:
    """Which CPU the figures come from: float results are bit-identical only on the same instruction set."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.machine()
    simd = sorted(flag for flag in flags if flag.startswith(("avx", "fma", "amx", "sse4")))
    return f"{platform.machine()} {model} {hashlib.sha256(' '.join(simd).encode()).hexdigest()[:12]}"


def run_figures(root: Path) -> dict[str, Any]:
    """Train the tiny model 8 steps on the sample dataset (dropout and a sample prompt on) and read back its figures."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from flux_lora.compose import PROJECT_ROOT
    from flux_lora.engines.native.train import run_training
    from tests.engines.native.native_tiny_run import tiny_config

    config = tiny_config(
        root,
        PROJECT_ROOT / "data" / "sample",
        "recipe",
        network_dropout=0.1,
        sample_prompts=PROMPTS,
        sample_every_n_steps=4,
        keep_last_states=0,
    )
    run_training(config)
    output = Path(config.output_dir)
    loras = {}
    for lora in sorted(output.glob("*.safetensors")):
        metadata = {k: v for k, v in read_safetensors_metadata(lora).items() if k not in CLOCK_KEYS}
        loras[lora.name] = {"tensors_sha256": tensor_data_sha256(lora), "metadata": metadata}
    accumulator = EventAccumulator(str(config.logging_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    scalars = {
        tag: [[e.step, e.value] for e in accumulator.Scalars(tag)]
        for tag in sorted(accumulator.Tags()["scalars"])
        if tag not in TIMING_SCALARS
    }
    summary = {
        k: v for k, v in json.loads((output / "train_summary.json").read_text()).items() if k not in TIMING_SUMMARY
    }
    states = sorted(p.name for p in output.glob("*-state"))
    return {"cpu": cpu_signature(), "loras": loras, "scalars": scalars, "summary": summary, "states": states}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        figures = run_figures(Path(folder))
    Path(sys.argv[1] if len(sys.argv) > 1 else FIGURES_FILE).write_text(
        json.dumps(figures, indent=1, sort_keys=True) + "\n"
    )
