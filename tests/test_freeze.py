"""Freeze: run identity, repro record and secret hygiene, on real composed configs and real files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flux_lora.compose import PROJECT_ROOT, resolved_container
from flux_lora.identity import compute_run_id
from flux_lora.redaction import is_secret_name, recorded_environment, redact, secret_values
from flux_lora.snapshot import git_state, package_versions
from tests.conftest import compose_config


def _resolved(*overrides: str) -> dict:
    return resolved_container(compose_config(list(overrides)))


def test_run_id_depends_on_semantics_not_paths_or_launch_switches() -> None:
    base = compute_run_id(_resolved(), "abc")
    assert base == compute_run_id(_resolved(), "abc")
    assert base == compute_run_id(_resolved("paths.outputs=/elsewhere", "launch.dry_run=true"), "abc")
    assert base == compute_run_id(_resolved("dataset.path=/moved/copy/of/the/same/data"), "abc")
    assert base != compute_run_id(_resolved(), "other-dataset-content")
    assert base != compute_run_id(_resolved("profile.learning_rate=2e-4"), "abc")
    assert base != compute_run_id(_resolved("ablation=a1_alpha"), "abc")
    assert len(base) == 12


@pytest.mark.parametrize(
    "name",
    ["HF_TOKEN", "WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD", "GOOGLE_APPLICATION_CREDENTIALS", "hf_token"],
)
def test_secret_names(name: str) -> None:
    assert is_secret_name(name)


def test_secrets_never_recorded_and_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijkl")
    monkeypatch.setenv("HF_HOME", "/cache/hf")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    env = recorded_environment()
    assert env["HF_HOME"] == "/cache/hf" and env["SLURM_JOB_ID"] == "1234"
    assert "HF_TOKEN" not in env and "hf_abcdefghijkl" not in json.dumps(env)
    assert redact("login with hf_abcdefghijkl ok", secret_values()) == "login with *** ok"


def test_git_state_of_this_checkout_and_outside_one(tmp_path: Path) -> None:
    state = git_state(PROJECT_ROOT)
    assert state["commit"] is None or len(state["commit"]) == 40
    assert git_state(tmp_path)["commit"] is None


def test_package_versions_read_in_process() -> None:
    versions = package_versions()
    assert versions["hydra-core"] == "1.3.8"
    assert "torch" in versions


def test_earlier_runs_with_the_same_id_are_found(tmp_path: Path) -> None:
    from flux_lora.snapshot import earlier_runs_with_id

    for name, run_id in (("a", "abc123abc123"), ("b", "def456def456"), ("c", "abc123abc123")):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "run.json").write_text(json.dumps({"run_id": run_id}, indent=2))
    found = earlier_runs_with_id(tmp_path, "abc123abc123", exclude=tmp_path / "runs" / "c")
    assert found == [tmp_path / "runs" / "a"]
    assert earlier_runs_with_id(tmp_path / "missing", "abc123abc123", exclude=tmp_path) == []
