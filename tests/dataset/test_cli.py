"""The real CLI in a subprocess: reports, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.cli import run_cli
from tests.dataset.conftest import TRIGGER


def _run(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    """The dataset CLI with its own cache folder, printing at a fixed width."""
    return run_cli(*args, module="flux_lora.dataset", env={"XDG_CACHE_HOME": str(cache), "COLUMNS": "160"})


def test_analyze_writes_report_and_sheet(good_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = _run("analyze", str(good_dataset), "--trigger", TRIGGER, "--out", str(out), cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    assert "gate passed" in result.stdout
    assert json.loads((out / "dataset_report.json").read_text())["summary"]["n_images"] == 6
    assert (out / "contact_sheet.png").stat().st_size > 1000
    assert any((tmp_path / "cache").rglob("*.json"))


def test_analyze_failing_gate_and_json(bad_dataset: Path, tmp_path: Path) -> None:
    result = _run("analyze", str(bad_dataset), "--trigger", TRIGGER, "--json", "--no-faces", cache=tmp_path / "c")
    assert result.returncode == 1
    document = json.loads(result.stdout)
    assert not document["gate"]["passed"] and document["gate"]["problems"]


def test_bad_input_is_one_line_exit_2(tmp_path: Path) -> None:
    for args in (
        ("analyze", str(tmp_path / "missing")),
        ("analyze",),
        ("prepare", str(tmp_path), str(tmp_path / "o"), "--crop-aspect", "wide"),
        ("fingerprint", str(tmp_path)),
        ("analyze", str(tmp_path), "--resolution", "-3"),
    ):
        result = _run(*args, cache=tmp_path / "c")
        assert result.returncode == 2, args
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr


def test_prepare_and_fingerprint(good_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    result = _run(
        "prepare", str(good_dataset), str(out), "--trigger", TRIGGER, "--crop-aspect", "3:4", cache=tmp_path / "c"
    )
    assert result.returncode == 0, result.stderr
    assert (out / "manifest.json").exists()
    printed = _run("fingerprint", str(out), cache=tmp_path / "c")
    assert printed.returncode == 0 and json.loads(printed.stdout)["algorithm"] == "blake3"
