"""`hydra/launcher=local_gpus`: cells side by side, each on its own device ids, never two on one GPU at a time.

No GPU here: the device ids are given (hydra.launcher.devices) and the cells are dry runs on the CPU tier; what is
checked is the pool's assignment, read back from each cell's own repro.json (CUDA_VISIBLE_DEVICES as the job saw it).
"""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import pytest

from tests.cli import run_cli


@pytest.mark.slow
def test_cells_share_the_devices_and_never_overlap_on_one(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    done = run_cli(
        "-m",
        "ablation=baseline,a1_alpha,a2_noise_offset",
        "hydra/launcher=local_gpus",
        "hydra.launcher.devices=[3,5]",
        "launch.dry_run=true",
        f"hydra.sweep.dir={sweep}",
        folder=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    pool = json.loads((sweep / "gpu_pool.json").read_text())
    assert pool["slots"] == [[3], [5]] and len(pool["cells"]) == 3
    for cell in pool["cells"]:
        (folder,) = sweep.glob(f"{cell['cell']}_*")
        seen = json.loads((folder / "repro.json").read_text())["environment"]["CUDA_VISIBLE_DEVICES"]
        assert seen == ",".join(map(str, cell["devices"]))
    for a, b in combinations(pool["cells"], 2):
        if a["devices"] == b["devices"]:
            assert a["ended"] <= b["started"] or b["ended"] <= a["started"], (a, b)
    assert {tuple(c["devices"]) for c in pool["cells"]} == {(3,), (5,)}  # both devices used: side by side


def test_a_cell_needing_more_gpus_than_the_pool_holds_is_one_line(tmp_path: Path) -> None:
    done = run_cli(
        "-m",
        "ablation=baseline",
        "hydra/launcher=local_gpus",
        "hydra.launcher.devices=[0]",
        "hydra.launcher.gpus_per_node=2",
        "launch.dry_run=true",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        folder=tmp_path,
    )
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        .splitlines()[0]
        .startswith("error: gpu.num_gpus=2: a cell needs more GPUs than hydra.launcher.devices=[0]")
    )
