"""fetch against a stand-in Hub on 127.0.0.1 (tests/models/hub_standin.py): download, resume, check, keep, refuse."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from flux_lora.models.fetch import fetch_model_files
from flux_lora.models.layout import flux_layout
from flux_lora.models.sources import HUB_FILES
from tests.cli import run_cli
from tests.models.hub_standin import StandInHub
from tests.models.model_stubs import DEFAULT_FILES, TEST_SIZED, TEST_SIZED_DIMS, write_model_folder, write_part

TOKEN = "hf_standin_secret_token"


@pytest.fixture(autouse=True)
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the engines set it for their jobs; fetch is online


def hub_content(tmp_path: Path) -> dict[tuple[str, str], bytes]:
    """The four files, test-sized with real bytes, under the repos and names the source table gives."""
    made = write_model_folder(tmp_path / "published", TEST_SIZED, dense=True)
    return {(HUB_FILES[p.name].repo_id, p.name): p.read_bytes() for p in made.values()}


def wanted(folder: Path) -> dict[str, Path]:
    return {key: folder / name for key, name in DEFAULT_FILES.items()}


def test_fetch_downloads_checks_and_keeps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    content = hub_content(tmp_path)
    files = wanted(tmp_path / "models")
    with StandInHub(content, gated={"black-forest-labs/FLUX.1-dev": TOKEN}) as hub:
        verdicts = fetch_model_files(files, layout=TEST_SIZED, endpoint=hub.endpoint, token=TOKEN)
        assert [v.problem for v in verdicts] == [None] * 4, [v.line for v in verdicts]
        for path in files.values():
            assert path.read_bytes() == content[(HUB_FILES[path.name].repo_id, path.name)]
        # The token went to the gated repo and appears in no output.
        assert all(had_token for method, path, _, had_token in hub.requests if "FLUX.1-dev" in path)
        assert TOKEN not in capsys.readouterr().out
        # Files that pass the check are kept: a second fetch downloads nothing.
        before = len(hub.requests)
        again = fetch_model_files(files, layout=TEST_SIZED, endpoint=hub.endpoint, token=TOKEN)
        assert [v.problem for v in again] == [None] * 4 and len(hub.requests) == before
        # A broken one is fetched again.
        os.truncate(files["t5xxl"], 100)
        fixed = fetch_model_files(files, layout=TEST_SIZED, endpoint=hub.endpoint, token=TOKEN)
        assert [v.problem for v in fixed] == [None] * 4 and len(hub.gets("t5xxl_fp16.safetensors")) == 2


def test_a_dropped_transfer_resumes_where_it_stopped(tmp_path: Path) -> None:
    """huggingface_hub writes in 10 MiB chunks and, within a run, asks for the rest with a Range request."""
    layout = flux_layout(dataclasses.replace(TEST_SIZED_DIMS, clip_vocab=400_000))  # a 26 MB CLIP: more than one chunk
    published = tmp_path / "clip_l.safetensors"
    write_part(published, layout.parts["clip_l"], dense=True)
    files = {"clip_l": tmp_path / "models" / "clip_l.safetensors"}
    with StandInHub(
        {("comfyanonymous/flux_text_encoders", "clip_l.safetensors"): published.read_bytes()},
        drop_once={"clip_l.safetensors"},
    ) as hub:
        (verdict,) = fetch_model_files(files, layout=layout, endpoint=hub.endpoint, token=TOKEN)
        assert verdict.problem is None, verdict.line
        assert hub.gets("clip_l.safetensors") == [None, f"bytes={10 * 2**20}-"]
    assert files["clip_l"].read_bytes() == published.read_bytes()


def test_a_wrong_download_is_refused_by_the_check(tmp_path: Path) -> None:
    content = hub_content(tmp_path)
    content[("comfyanonymous/flux_text_encoders", "t5xxl_fp16.safetensors")] = content[
        ("comfyanonymous/flux_text_encoders", "clip_l.safetensors")
    ]
    files = {"t5xxl": tmp_path / "models" / "t5xxl_fp16.safetensors"}
    with StandInHub(content) as hub:
        (verdict,) = fetch_model_files(files, layout=TEST_SIZED, endpoint=hub.endpoint, token=TOKEN)
    assert "holds the CLIP-L text encoder, not the T5-XXL text encoder" in verdict.line


def test_a_token_without_the_licence_is_one_line(tmp_path: Path) -> None:
    with StandInHub(hub_content(tmp_path), gated={"black-forest-labs/FLUX.1-dev": TOKEN}) as hub:
        (verdict,) = fetch_model_files(
            {"vae": tmp_path / "ae.safetensors"}, layout=TEST_SIZED, endpoint=hub.endpoint, token="hf_another_account"
        )
    assert verdict.line == (
        f"model.vae: {tmp_path / 'ae.safetensors'} black-forest-labs/FLUX.1-dev refused HF_TOKEN: accept the licence at "
        f"{hub.endpoint}/black-forest-labs/FLUX.1-dev with that token's account (and give the token read access), then run fetch again"
    )
    assert "hf_another_account" not in verdict.line


def test_cli_fetch_of_the_gated_repo_without_a_token(tmp_path: Path) -> None:
    """The real CLI in a subprocess, pointed at the stand-in with HF_ENDPOINT, with no token anywhere."""
    no_token = [k for k in os.environ if k.startswith(("HF_", "HUGGING"))]
    models = tmp_path / "models"
    with StandInHub(hub_content(tmp_path), gated={"black-forest-labs/FLUX.1-dev": TOKEN}) as hub:
        env = {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf_home")}
        done = run_cli(
            "fetch",
            "model=flux_dev",
            f"paths.models={models}",
            "model.clip_l=null",
            "model.t5xxl=null",
            module="flux_lora.models",
            env=env,
            drop=no_token,
        )
    assert done.returncode == 1, done.stderr
    gated = f"black-forest-labs/FLUX.1-dev is gated: set HF_TOKEN to a Hugging Face access token and accept the licence at {hub.endpoint}/black-forest-labs/FLUX.1-dev, then run fetch again"
    assert done.stderr.splitlines() == [
        f"error: model.transformer: {models / 'flux1-dev.safetensors'} {gated}",
        f"error: model.vae: {models / 'ae.safetensors'} {gated}",
    ]
    assert not any(had_token for *_, had_token in hub.requests)
    assert not (models / "flux1-dev.safetensors").exists()
