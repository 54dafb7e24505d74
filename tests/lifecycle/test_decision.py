"""Which state a run resumes from and what a launch does with an earlier run of the same id (real files)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from flux_lora.checkpoint_files import write_manifest
from flux_lora.lifecycle.decision import Decision, decide, find_runs_with_id
from flux_lora.lifecycle.states import choose_state
from flux_lora.records import RunState, RunStatus, write_status


def make_state(output: Path, step: int, name: str = "flux-lora", manifest: bool = True) -> Path:
    state = output / f"{name}-step{step:08d}-state"
    state.mkdir(parents=True)
    (state / "lora_state.safetensors").write_bytes(os.urandom(4096))
    (state / "optimizer.bin").write_bytes(os.urandom(2048))
    (state / "random_states_0.pkl").write_bytes(b"rng")
    (state / "train_state.json").write_text(json.dumps({"current_epoch": 1, "current_step": step}))
    if manifest:
        write_manifest(state, step)
    return state


def make_run(root: Path, run_id: str, state: RunState, steps: tuple[int, ...] = (), **status: object) -> Path:
    root.mkdir(parents=True)
    (root / "run.json").write_text(json.dumps({"run_id": run_id}))
    for step in steps:
        make_state(root / "output", step)
    write_status(root, RunStatus(state=state, **status))  # type: ignore[arg-type]
    return root


def test_a_truncated_newest_state_is_passed_over_and_said(tmp_path: Path) -> None:
    output = tmp_path / "output"
    make_state(output, 2)
    newest = make_state(output, 4)
    with open(newest / "lora_state.safetensors", "r+b") as handle:
        handle.truncate(100)  # a write cut short
    choice = choose_state(output, "flux-lora")
    assert choice.state is not None and choice.state.step == 2
    (note,) = choice.notes()
    assert "flux-lora-step00000004-state" in note and "has 100 bytes, the manifest says 4096" in note


def test_sd_scripts_states_without_a_manifest_need_their_accelerate_files(tmp_path: Path) -> None:
    output = tmp_path / "output"
    make_state(output, 2, manifest=False)
    half = make_state(output, 4, manifest=False)
    (half / "optimizer.bin").write_bytes(b"")  # sd-scripts was killed while accelerate wrote it
    choice = choose_state(output, "flux-lora")
    assert choice.state is not None and choice.state.step == 2 and "optimizer.bin missing or empty" in choice.notes()[0]


def test_decisions_for_an_earlier_run_of_the_same_id(tmp_path: Path) -> None:
    here = socket.gethostname()
    done = make_run(tmp_path / "done", "id1", RunState.succeeded)
    assert decide([done], "flux-lora").decision == Decision.skip

    # Left `running` (the caller holds the lease, so its owner is gone): resumed from its newest state.
    dead = make_run(tmp_path / "dead", "id2", RunState.running, (2, 4), host=here, pid=2**22 + 7)
    decision = decide([dead], "flux-lora")
    assert decision.decision == Decision.resume and decision.run_dir == dead and decision.state.step == 4

    # Failed before any checkpoint: a new start. Failed after one: resumed.
    assert decide([make_run(tmp_path / "early", "id5", RunState.failed)], "flux-lora").decision == Decision.start
    assert decide([make_run(tmp_path / "late", "id6", RunState.failed, (2,))], "flux-lora").decision == Decision.resume


def test_runs_are_found_by_id_anywhere_under_the_outputs_root(tmp_path: Path) -> None:
    a = make_run(tmp_path / "sweeps" / "20260101-000000_ablation" / "0_baseline", "abc", RunState.interrupted)
    make_run(tmp_path / "runs" / "other", "xyz", RunState.succeeded)
    assert find_runs_with_id(tmp_path, "abc") == [a]


def test_a_cell_outside_the_outputs_root_is_found_in_its_own_folder(tmp_path: Path) -> None:
    cell = make_run(tmp_path / "elsewhere" / "0_baseline", "abc", RunState.interrupted)
    assert find_runs_with_id(tmp_path / "outputs", "abc") == []
    assert find_runs_with_id(tmp_path / "outputs", "abc", also=[cell]) == [cell]


def test_a_final_state_without_its_lora_is_passed_over_for_the_step_before(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", "id7", RunState.interrupted, (2, 4))
    final = run / "output" / "flux-lora-state"
    final.mkdir()
    (final / "train_state.json").write_text(json.dumps({"current_step": 6}))
    write_manifest(final, 6)
    decision = decide([run], "flux-lora", max_train_steps=6)
    assert decision.decision == Decision.resume and decision.state.step == 4
    assert "final LoRA is missing" in " ".join(decision.notes)


def test_a_folder_frozen_but_never_started_is_started_in_place(tmp_path: Path) -> None:
    """Its launcher died between freezing it and starting its job (a packed sweep's cells wait there for their job):
    the next launch holding the lease starts it in that folder, not in a new one beside it."""
    frozen = tmp_path / "0_cell"
    frozen.mkdir()
    (frozen / "run.json").write_text(json.dumps({"run_id": "abc"}))  # no status.json: never started
    decision = decide([frozen], "flux-lora", 6)
    assert (decision.decision, decision.run_dir, decision.state) == (Decision.resume, frozen, None)
    dry = make_run(tmp_path / "1_dry", "abc", RunState.dry_run)  # a dry run's folder is never trained in
    assert decide([dry], "flux-lora", 6).decision == Decision.start
