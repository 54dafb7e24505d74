"""Several processes (the multi-GPU path) on CPU: torch.distributed with the gloo backend stands in
for NCCL, which needs GPUs. Each process must train on its own batches, and the job must finish."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from flux_lora.engines.native.config import CONFIG_FILE
from tests.engines.native.native_tiny_run import make_dataset, tiny_config


@pytest.mark.slow
def test_two_processes_train_on_different_batches_and_finish(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, make_dataset(tmp_path / "ds", count=4), max_train_steps=3, save_every_n_steps=0)
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / CONFIG_FILE).write_text(config.to_json())
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "-m",
            "flux_lora.engines.native.train",
            str(run_dir),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    finals = re.findall(r"done: 3 steps, final loss ([0-9.]+)", done.stdout)
    assert len(finals) == 2 and finals[0] != finals[1]  # one line per process, each from its own batches
    assert (run_dir / "output" / "flux-lora.safetensors").is_file()


PROBE = """
import hashlib, pathlib, sys, torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from flux_lora.engines.native.config import CONFIG_FILE, NativeTrainConfig
from flux_lora.engines.native.models import build_tiny_flux
from flux_lora.engines.native.setup import prepare_lora_training

accelerator = Accelerator(cpu=True)
config = NativeTrainConfig.from_json(pathlib.Path(sys.argv[1]) / CONFIG_FILE)
set_seed(config.seed)  # as run_training does: the same seed on every process
training = prepare_lora_training(build_tiny_flux().transformer, config, accelerator, torch.float32)
down = accelerator.unwrap_model(training.transformer).single_transformer_blocks[0].proj_out.lora_A["default"]
mask = down(torch.ones(256, down.in_features)) != 0
digest = lambda t: hashlib.sha256(t.detach().numpy().tobytes()).hexdigest()[:16]
# One file per rank: two processes sharing one stdout pipe is not a reliable channel under load.
out = pathlib.Path(sys.argv[1]) / f"rank{accelerator.process_index}.txt"
out.write_text(f"weights {digest(down.weight)} mask {digest(mask)}")
"""


@pytest.mark.slow
def test_each_process_draws_its_own_dropout_masks_from_the_same_initial_lora(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    config = tiny_config(tmp_path, tmp_path, network_dropout=0.5, optimizer="adamw", gradient_checkpointing=False)
    (tmp_path / CONFIG_FILE).write_text(config.to_json())
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(probe), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[3],
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ranks = {r: (tmp_path / f"rank{r}.txt").read_text() for r in ("0", "1")}
    weights, masks = zip(*(re.match(r"weights (\w+) mask (\w+)", ranks[r]).groups() for r in ("0", "1")))
    assert weights[0] == weights[1] and masks[0] != masks[1]
