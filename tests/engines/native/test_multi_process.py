"""Several processes (the multi-GPU path) on CPU: torch.distributed with the gloo backend stands in
for NCCL, which needs GPUs. Each process must train on its own batches, and the job must finish."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from flux_lora.engines.native.config import CONFIG_FILE
from tests.engines.native.native_tiny_run import make_dataset, tiny_config


def test_two_processes_train_on_different_batches_and_finish(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, make_dataset(tmp_path / "ds", count=4), max_train_steps=3, save_every_n_steps=0)
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / CONFIG_FILE).write_text(config.to_json())
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "flux_lora.engines.native.train", str(run_dir)],
        capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    finals = re.findall(r"done: 3 steps, final loss ([0-9.]+)", done.stdout)
    assert len(finals) == 2 and finals[0] != finals[1]  # one line per process, each from its own batches
    assert (run_dir / "output" / "flux-lora.safetensors").is_file()
