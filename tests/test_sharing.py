"""A LoRA safe to share: one real run of the embedded default with planted credentials (a mirror URL with a password,
tokens in the environment, a token in a path given as an override), then every file of its folder, its terminal
output and every LoRA it wrote are searched; the shareable record replays, an edited or truncated file is named."""

from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

from flux_lora.checkpoint_files import read_safetensors_metadata, tensor_data_sha256, update_safetensors_metadata
from flux_lora.compose import PROJECT_ROOT
from flux_lora.identity import record_problem
from flux_lora.provenance import METADATA_KEY, embedded_record_text, seal
from flux_lora.redaction import recorded_environment, redact
from tests.cli import run_cli

PASSWORD = "Pa55word-in-the-mirror-url"
PATH_TOKEN = "tok3n-in-a-cache-path"
SECRETS = {
    "HF_ENDPOINT": f"https://alice:{PASSWORD}@hub.internal.example",
    "HF_TOKEN": "hf_" + "A1b2C3d4E5f6G7h8I9j0K1l2",
    "WANDB_API_KEY": "wandb-0123456789abcdef",
    "PGPASSWORD": "postgres-secret-value",
}
PLANTED = [PASSWORD, PATH_TOKEN, *(v for k, v in SECRETS.items() if k != "HF_ENDPOINT")]


@dataclass(frozen=True)
class SharedRun:
    root: Path
    run_dir: Path
    output: str


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory: pytest.TempPathFactory) -> SharedRun:
    root = tmp_path_factory.mktemp("sharing")
    done = run_cli(
        "ablation=baseline",
        "ablation.baseline_steps=2",
        "profile.save_every_n_steps=1",
        "profile.sample_steps=1",
        f"paths.outputs={root / 'outputs'}",
        f"paths.cache='{root}/cache?token={PATH_TOKEN}'",
        cwd=root,
        env=SECRETS,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run_dir,) = [p.parent for p in (root / "outputs" / "runs").glob("*/run.json")]
    return SharedRun(root, run_dir, done.stdout + done.stderr)


def loras(run: SharedRun) -> list[Path]:
    return sorted(p for p in (run.run_dir / "output").glob("*.safetensors"))


@pytest.mark.slow
def test_no_secret_is_written_printed_or_embedded_and_a_shared_lora_names_no_path_host_or_user(
    shared_run: SharedRun,
) -> None:
    for planted in PLANTED:
        assert planted not in shared_run.output, planted
        for path in shared_run.run_dir.rglob("*"):
            assert not path.is_file() or planted.encode() not in path.read_bytes(), (planted, path)
    repro = json.loads((shared_run.run_dir / "repro.json").read_text())
    assert repro["environment"]["HF_ENDPOINT"] == "https://***@hub.internal.example"  # recorded, without its password
    assert set(repro["environment"]) <= {
        "HF_ENDPOINT",
        "HF_HOME",
        "HF_HUB_OFFLINE",
        "OMP_NUM_THREADS",
        "CUDA_VISIBLE_DEVICES",
        "SD_SCRIPTS_DIR",
    } | {
        k
        for k in repro["environment"]
        if k.startswith(("SLURM_", "CUDA_", "MKL_", "TORCH_", "PYTORCH_", "ACCELERATE_", "CUBLAS_", "NVIDIA_"))
    }

    assert len(loras(shared_run)) == 2  # the step-1 LoRA and the final one
    private = [str(shared_run.root), str(PROJECT_ROOT), os.path.expanduser("~")]
    host = socket.gethostname()
    for lora in loras(shared_run):
        metadata = read_safetensors_metadata(lora)
        text = json.dumps(metadata)
        assert not [p for p in private if p in text], lora
        assert len(host) < 3 or host not in text
        record = json.loads(metadata[METADATA_KEY])
        assert (
            record["shareable"] is True
            and "config.dataset.path" in record["withheld"]
            and "config.paths.outputs" in record["withheld"]
        )
        assert record_problem(record) is None
        strings = [v for v in json.dumps(record).split('"') if v.startswith("/")]
        assert not strings, strings  # no absolute path anywhere in the record


@pytest.mark.slow
def test_a_shareable_lora_replays_the_same_run_given_the_dataset_folder(shared_run: SharedRun, tmp_path: Path) -> None:
    lora = shared_run.run_dir / "output" / "flux-lora.safetensors"
    asked = run_cli(
        str(lora), "--dry-run", "--outputs", str(tmp_path / "replay"), module="flux_lora.replay", cwd=tmp_path
    )
    assert (
        asked.returncode == 2
        and "withholds where the images were (dataset.path); give them with --dataset DIR" in asked.stderr
    )
    done = run_cli(
        str(lora),
        "--dry-run",
        "--outputs",
        str(tmp_path / "replay"),
        "--dataset",
        str(PROJECT_ROOT / "data" / "sample"),
        module="flux_lora.replay",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (replayed,) = (tmp_path / "replay" / "runs").glob("*/run.json")
    assert (
        json.loads(replayed.read_text())["run_id"]
        == json.loads((shared_run.run_dir / "run.json").read_text())["run_id"]
    )


@pytest.mark.slow
def test_an_edited_record_is_named_and_refused_and_a_truncated_lora_is_named_by_every_reader(
    shared_run: SharedRun, tmp_path: Path
) -> None:
    original = shared_run.run_dir / "output" / "flux-lora.safetensors"
    edited = tmp_path / "edited.safetensors"
    shutil.copyfile(original, edited)

    def raise_lr(metadata: dict[str, str]) -> dict[str, str]:
        record = json.loads(metadata[METADATA_KEY])
        record["config"]["profile"]["learning_rate"] = 0.5
        return {**metadata, METADATA_KEY: json.dumps(record)}

    update_safetensors_metadata(edited, raise_lr)
    refused = run_cli(
        str(edited),
        "--dry-run",
        "--outputs",
        str(tmp_path / "r"),
        "--dataset",
        str(PROJECT_ROOT / "data" / "sample"),
        module="flux_lora.replay",
        cwd=tmp_path,
    )
    assert refused.returncode == 2 and "its embedded record was edited after it was written" in refused.stderr, (
        refused.stderr
    )
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()
    compared = run_cli(str(edited), str(original), module="flux_lora.diff", cwd=tmp_path)
    assert (
        compared.stdout.startswith(f"warning: {edited}: its embedded record was edited")
        and "learning_rate" in compared.stdout
    )

    # Re-sealed after the edit (the digest redone by hand): the run id no longer matches its config.
    record = json.loads(read_safetensors_metadata(edited)[METADATA_KEY])
    record.pop("shareable"), record.pop("withheld"), record.pop("full_digest")
    full = json.loads((shared_run.run_dir / "lora_record.json").read_text())
    resealed = seal(
        {**full, "config": {**full["config"], "profile": {**full["config"]["profile"], "learning_rate": 0.5}}}
    )
    assert "does not match its run id" in (record_problem(resealed) or "")

    truncated = tmp_path / "half.safetensors"
    truncated.write_bytes(original.read_bytes()[: original.stat().st_size // 2])
    for module, args in (
        ("flux_lora.replay", [str(truncated), "--dry-run"]),
        ("flux_lora.diff", [str(truncated), str(original)]),
    ):
        done = run_cli(*args, module=module, cwd=tmp_path)
        assert (
            done.returncode == 2
            and f"{truncated}: truncated:" in done.stderr
            and len(done.stderr.strip().splitlines()) == 1
        ), done.stderr


@pytest.mark.slow
def test_share_strips_a_lora_to_shareable_or_none_without_touching_its_tensors(
    shared_run: SharedRun, tmp_path: Path
) -> None:
    original = shared_run.run_dir / "output" / "flux-lora.safetensors"
    full = tmp_path / "full.safetensors"  # what launch.embed_record=full writes: the run folder's whole record
    shutil.copyfile(original, full)
    whole = json.loads((shared_run.run_dir / "lora_record.json").read_text())
    update_safetensors_metadata(
        full,
        lambda m: {
            **m,
            METADATA_KEY: embedded_record_text(
                {
                    **whole,
                    "config": {**whole["config"], "launch": {**whole["config"]["launch"], "embed_record": "full"}},
                }
            )
            or "",
        },
    )
    assert str(shared_run.root) in read_safetensors_metadata(full)[METADATA_KEY]
    for mode in ("shareable", "none"):
        done = run_cli(str(full), "--to", mode, module="flux_lora.share", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        shared = tmp_path / f"full.{mode}.safetensors"
        assert tensor_data_sha256(shared) == tensor_data_sha256(full) == tensor_data_sha256(original)
        metadata = read_safetensors_metadata(shared)
        assert str(shared_run.root) not in json.dumps(metadata)
        assert (METADATA_KEY in metadata) == (mode == "shareable") and metadata["ss_network_dim"] == "8"
        assert f"tensors unchanged, sha256 {tensor_data_sha256(full)[:16]}" in done.stdout


def test_redaction_of_urls_query_credentials_token_shapes_and_an_allow_listed_environment() -> None:
    assert (
        redact("mirror https://bob:s3cret-pass@hub.example/api and git://x@y")
        == "mirror https://***@hub.example/api and git://***@y"
    )
    assert (
        redact("/m/flux.safetensors?token=abcdef123&rev=main&X-Amz-Signature=99ffee")
        == "/m/flux.safetensors?token=***&rev=main&X-Amz-Signature=***"
    )
    assert redact("login hf_" + "x" * 30 + " ok") == "login *** ok"
    env = {
        "HF_ENDPOINT": "https://u:longpassword@mirror",
        "MY_SERVICE_URL": "https://u:longpassword@svc",
        "HOME": "/home/alice",
        "OMP_NUM_THREADS": "4",
        "HF_TOKEN": "hf_" + "y" * 30,
    }
    assert recorded_environment(env) == {"HF_ENDPOINT": "https://***@mirror", "OMP_NUM_THREADS": "4"}
