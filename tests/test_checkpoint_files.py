"""Checkpoint files on real folders: a manifest that catches damage, and writes that a crash cannot half-finish."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flux_lora.checkpoint_files import (
    MANIFEST,
    WriteFailed,
    atomic_write_file,
    begin_dir,
    commit_dir,
    replaced_path,
    staging_path,
    state_problem,
    write_manifest,
)
from flux_lora.compose import PROJECT_ROOT
from flux_lora.engines.native.stopping import writing


def make_state(folder: Path, marker: str = "old", step: int = 4) -> Path:
    # As the trainer writes a state: fill a staging folder from begin_dir, then commit_dir names it.
    staging = begin_dir(folder)
    (staging / "weights.bin").write_bytes(os.urandom(4096))
    (staging / "sub").mkdir()
    (staging / "sub" / "note.txt").write_text(marker)
    return commit_dir(staging, folder, step)


def test_manifest_lists_every_file_and_is_written_last(tmp_path: Path) -> None:
    state = make_state(tmp_path / "run-state")
    manifest = json.loads((state / MANIFEST).read_text())
    assert manifest["complete"] is True and manifest["step"] == 4
    assert [(e["path"], e["size"]) for e in manifest["files"]] == [("sub/note.txt", 3), ("weights.bin", 4096)]
    assert all(len(e["blake3"]) == 64 for e in manifest["files"])
    assert state_problem(state) is None
    assert not staging_path(state).exists()


def test_damage_and_missing_pieces_are_named(tmp_path: Path) -> None:
    assert "missing" in state_problem(tmp_path / "nowhere")

    state = make_state(tmp_path / "a-state")
    weights = state / "weights.bin"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    assert state_problem(state) == f"{state}: weights.bin has 1000 bytes, the manifest says 4096"

    state = make_state(tmp_path / "b-state")
    data = bytearray((state / "weights.bin").read_bytes())
    data[7] ^= 0xFF  # same size, one byte flipped
    (state / "weights.bin").write_bytes(bytes(data))
    assert "weights.bin does not match its blake3 hash" in state_problem(state)

    state = make_state(tmp_path / "c-state")
    (state / "sub" / "note.txt").unlink()
    assert "sub/note.txt is missing" in state_problem(state)

    state = make_state(tmp_path / "d-state")
    (state / MANIFEST).unlink()
    assert f"no {MANIFEST}" in state_problem(state)

    (state / MANIFEST).write_text('{"complete": false, "step": 1, "files": []}')
    assert "does not say complete" in state_problem(state)
    (state / MANIFEST).write_text("{not json")
    assert "unreadable" in state_problem(state)

    write_manifest(state, 9)  # a manifest written over the files as they are now
    assert state_problem(state) is None and json.loads((state / MANIFEST).read_text())["step"] == 9


def test_an_error_inside_the_write_keeps_the_previous_state(tmp_path: Path) -> None:
    state = make_state(tmp_path / "run-state", marker="old")
    # As the trainer writes: a failure inside `writing` removes the staging folder it began and names the state.
    staging = staging_path(state)
    with pytest.raises(WriteFailed, match="run-state"):
        with writing(state, cleanup=staging):
            begin_dir(state)
            (staging / "weights.bin").write_bytes(b"partial")
            raise OSError(28, "No space left on device")
    assert state_problem(state) is None and (state / "sub" / "note.txt").read_text() == "old"
    assert not staging_path(state).exists()


def test_a_killed_writer_leaves_the_previous_state_valid_and_the_next_write_succeeds(tmp_path: Path) -> None:
    state = make_state(tmp_path / "run-state", marker="old")
    # A real crash runs no cleanup: the process ends (os._exit) halfway through writing the new state.
    code = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from flux_lora.checkpoint_files import begin_dir
        staging = begin_dir(Path({str(state)!r}))
        (staging / "weights.bin").write_bytes(b"half of it")
        os._exit(9)
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert done.returncode == 9, done.stderr
    assert staging_path(state).is_dir()  # the leftover, under a name nothing resumes from
    assert state_problem(state) is None and (state / "sub" / "note.txt").read_text() == "old"

    make_state(state, marker="new", step=8)
    assert state_problem(state) is None and (state / "sub" / "note.txt").read_text() == "new"
    assert not staging_path(state).exists() and not replaced_path(state).exists()


def test_a_crash_between_the_two_renames_is_repaired_by_the_next_write(tmp_path: Path) -> None:
    # What a crash right after moving the old state aside leaves: the old one aside, the complete new one staged.
    final = tmp_path / "run-state"
    make_state(replaced_path(final), marker="old")
    make_state(staging_path(final), marker="new", step=8)
    assert "the previous state is" in state_problem(final)

    make_state(final, marker="newer", step=12)
    assert state_problem(final) is None and (final / "sub" / "note.txt").read_text() == "newer"
    assert not replaced_path(final).exists() and not staging_path(final).exists()


def test_atomic_file_write_replaces_only_when_complete(tmp_path: Path) -> None:
    path = tmp_path / "lora.safetensors"
    atomic_write_file(path, lambda staging: staging.write_bytes(b"first"))

    def fails(staging: Path) -> None:
        staging.write_bytes(b"sec")
        raise OSError("killed")

    with pytest.raises(OSError):
        atomic_write_file(path, fails)
    assert path.read_bytes() == b"first" and not staging_path(path).exists()
    atomic_write_file(path, lambda staging: staging.write_bytes(b"second"))
    assert path.read_bytes() == b"second"


def test_importable_without_torch() -> None:
    code = "import sys, flux_lora.checkpoint_files; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT).returncode == 0
