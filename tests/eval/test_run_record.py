"""Reading a run directory, labelling a run that did not succeed, and what invalidates the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from flux_lora.eval import EvalSettings, evaluate_run
from flux_lora.eval.run_record import read_run
from tests.cli import run_cli
from tests.eval.tiny_eval import copy_run

CHECKS_ONLY = EvalSettings(validation=False, likeness=False)


def test_checkpoints_are_ordered_by_step_with_the_final_last(tiny_run: Path) -> None:
    run = read_run(tiny_run)
    assert [(c.path.name, c.step, c.final) for c in run.checkpoints] == [
        ("flux-lora-step00000002.safetensors", 2, False),
        ("flux-lora.safetensors", 4, True),
    ]
    assert run.succeeded and run.final.final
    trained, held_out = run.training_examples(), run.held_out_examples()
    assert len(trained) == 6 and len(held_out) == 2 and not {e.image for e in trained} & {e.image for e in held_out}


def test_a_failed_run_is_evaluated_and_labelled(tiny_run: Path, tmp_path: Path) -> None:
    run_dir = copy_run(tiny_run, tmp_path / "run")
    (run_dir / "output" / "flux-lora.safetensors").unlink()  # it stopped after the step-2 save
    status = json.loads((run_dir / "status.json").read_text())
    (run_dir / "status.json").write_text(json.dumps({**status, "state": "failed", "reason": "exit code 1"}))
    result = evaluate_run(run_dir, CHECKS_ONLY, log=lambda _: None)
    assert result["run"]["succeeded"] is False
    assert result["run"]["label"] == "evaluated a run that did not succeed (state failed: exit code 1)"
    assert result["load_check"]["file"].endswith("flux-lora-step00000002.safetensors")


def test_a_changed_lora_file_misses_the_cache(tiny_run: Path, tmp_path: Path) -> None:
    run_dir = copy_run(tiny_run, tmp_path / "run")
    assert evaluate_run(run_dir, CHECKS_ONLY, log=lambda _: None)["cached"] is False
    assert evaluate_run(run_dir, CHECKS_ONLY, log=lambda _: None)["cached"] is True
    final = run_dir / "output" / "flux-lora.safetensors"
    tensors = load_file(str(final))
    first = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[first] = tensors[first] * 2
    save_file(tensors, str(final))
    assert evaluate_run(run_dir, CHECKS_ONLY, log=lambda _: None)["cached"] is False


def test_a_directory_without_a_run_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config.yaml not found; pass a run directory"):
        read_run(tmp_path)


def test_a_truncated_lora_file_is_one_line_naming_it(tiny_run: Path, tmp_path: Path) -> None:
    run_dir = copy_run(tiny_run, tmp_path / "run")
    final = run_dir / "output" / "flux-lora.safetensors"
    final.write_bytes(final.read_bytes()[: final.stat().st_size // 2])  # an interrupted copy
    done = run_cli(str(run_dir), module="flux_lora.eval")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: {final}: not a readable safetensors file") and "copy it again or delete it" in line
