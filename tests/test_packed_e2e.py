"""launch.pack through the real CLI on the embedded default: a sweep's cells that share a base train as one job (one
`accelerate launch`, one adapter each), each in its own run folder; killed with its whole process tree and launched
again, every cell resumes and finishes; launched once more, every cell is skipped as done; a packed cell replayed alone
trains the very same LoRA. Real processes, real training, real kill -9."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flux_lora.report import read_run
from tests.cli import ONE_THREAD, run_cli
from tests.test_resume_e2e import SHORT, descendants, finish, start, wait_until_gone

pytestmark = pytest.mark.slow

CELLS = ("baseline", "a2_noise_offset")


def test_a_packed_sweep_killed_resumes_then_skips_and_a_cell_replayed_alone_trains_the_same_lora(
    tmp_path: Path,
) -> None:
    sweep_dir = tmp_path / "sweep"
    sweep = ["-m", f"ablation={','.join(CELLS)}", "launch.pack=true", *SHORT, f"hydra.sweep.dir={sweep_dir}"]
    first = start(sweep, tmp_path)
    deadline = time.monotonic() + 300
    while len(list(sweep_dir.glob("*/output/flux-lora-step00000002-state/manifest.json"))) < 2:  # both packed cells
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read() if first.stdout else ""
        time.sleep(0.2)
    tree = [first.pid, *descendants(first.pid)]
    for pid in tree:  # all at once, as a reboot would: nobody gets to clean up
        os.kill(pid, signal.SIGKILL)
    first.wait(timeout=30)
    wait_until_gone(tree)
    cells = {name: next(sweep_dir.glob(f"*-{name}")) for name in CELLS}
    packed = [cells["baseline"], cells["a2_noise_offset"]]
    for cell in packed:
        attempt = json.loads((cell / "status.json").read_text())["attempts"][-1]
        # One job trained both: its command names both folders, and each record names the other.
        assert [str(c) for c in packed if c != cell] == attempt["packed_with"]
        assert all(str(c) in attempt["command"] for c in packed)
        assert read_run(cell).state == "owner gone"

    again = start(sweep, tmp_path)
    output = finish(again)
    assert again.returncode == 0, output[-3000:]
    assert "packed job: 2 runs on one base" in output
    for name, cell in cells.items():
        status = json.loads((cell / "status.json").read_text())
        assert status["state"] == "succeeded", (name, status["reason"])
        summary = json.loads((cell / "output" / "train_summary.json").read_text())
        assert summary["steps"] == summary["max_train_steps"] == 6
        log = (cell / "train.log").read_text()
        assert "step 6/6" in log and "[" + cell.name not in log  # its own lines, without the job's labels
        assert not any(other.name in log for other in cells.values() if other != cell)
    for cell in packed:
        attempts = json.loads((cell / "status.json").read_text())["attempts"]
        assert [a["state"] for a in attempts] == ["interrupted", "succeeded"] and attempts[1]["from_step"] >= 2
        assert attempts[1]["packed_with"]  # resumed packed again
    assert {row.state for row in map(read_run, cells.values())} == {"succeeded"}
    watched = run_cli(str(sweep_dir), "--once", module="flux_lora.watch", env={"COLUMNS": "200"})
    assert watched.returncode == 0, watched.stderr[-2000:]
    for cell in cells.values():  # watch shows a packed cell as any other: its state and its own steps
        assert re.search(rf"{cell.name}\s+│\s*succeeded\s*│[^\n]*6/6", watched.stdout), watched.stdout[-3000:]

    once_more = run_cli(*sweep, folder=tmp_path)
    assert once_more.returncode == 0 and once_more.stdout.count("skipped: done") == len(CELLS), once_more.stdout[-3000:]
    assert "packed job" not in once_more.stdout

    # Replayed alone (a single run, so not packed), the cell killed and resumed in a pack trains the same LoRA.
    replayed = run_cli(
        str(cells["a2_noise_offset"]),
        "--outputs",
        str(tmp_path / "replayed"),
        module="flux_lora.replay",
        cwd=tmp_path,
        env=ONE_THREAD,
    )
    assert replayed.returncode == 0, replayed.stdout[-3000:] + replayed.stderr[-3000:]
    (alone,) = (tmp_path / "replayed").rglob("output/flux-lora.safetensors")
    left, right = load_file(str(alone)), load_file(str(cells["a2_noise_offset"] / "output" / "flux-lora.safetensors"))
    assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)
