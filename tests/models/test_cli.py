"""`python -m flux_lora.models check` and the launch refusing a broken base-model file, as real subprocesses,
on files with FLUX.1-dev's true headers (data regions are sparse holes)."""

from __future__ import annotations

import os
from pathlib import Path

from tests.cli import run_cli
from tests.models.model_stubs import DEFAULT_FILES, write_model_folder


def test_check_cli(tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_model_folder(models)
    check = ["check", "model=flux_dev", f"paths.models={models}"]
    done = run_cli(*check, module="flux_lora.models", drop=["CUDA_VISIBLE_DEVICES"])
    assert done.returncode == 0 and done.stderr == "", done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["model.transformer", "model.vae", "model.clip_l", "model.t5xxl"]
    assert lines[0].startswith(
        f"model.transformer: {models / 'flux1-dev.safetensors'} ok: FLUX.1-dev transformer, bf16 (BF16), 19 double blocks"
    )

    (models / DEFAULT_FILES["vae"]).rename(models / DEFAULT_FILES["transformer"])  # the ae under the transformer's name
    done = run_cli(*check, module="flux_lora.models", drop=["CUDA_VISIBLE_DEVICES"])
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"error: model.transformer: {models / 'flux1-dev.safetensors'} holds the FLUX autoencoder (ae), not the FLUX.1-dev "
        "transformer: a wrong file under this name; point model.vae at it and model.transformer at flux1-dev.safetensors",
        f"error: model.vae: {models / 'ae.safetensors'} not found; set model.vae=<path> or paths.models=<dir>, or run "
        "python -m flux_lora.models fetch model=flux_dev paths.models=<dir>",
    ]


def test_check_cli_bad_input_is_one_line(capsys) -> None:
    from flux_lora.models.__main__ import main

    assert main(["check", "model=tiny"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: model=tiny: its weights are made in code, no files to check; add model=flux_dev"
    ]
    assert main(["check", "model=flux_dex"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: model=flux_dex: no such option in conf/model/")


def test_launch_check_refuses_a_truncated_model_file_with_one_line(compose_run, tmp_path: Path) -> None:
    """The launcher's check (flux_lora/check.py), as launch.py calls it: an error for a launch, a warning for a dry run."""
    from flux_lora.check import check_run
    from flux_lora.engines import get_engine

    models = tmp_path / "models"
    write_model_folder(models)
    for name in ("tokenizers/tokenizer", "tokenizers/tokenizer_2"):  # what the native engine's own file check wants
        (models / name).mkdir(parents=True)
        (models / name / "vocab.json").write_text("{}")
    t5 = models / DEFAULT_FILES["t5xxl"]
    full = t5.stat().st_size
    os.truncate(t5, full // 2)
    run = compose_run(
        "model=flux_dev",
        "engine=native",
        f"paths.models={models}",
        f"paths.cache={tmp_path / 'cache'}",
        "dataset.analysis.detect_faces=false",
    )  # faces are not what this test is about
    line = (
        f"model.t5xxl: {t5} is truncated: {full // 2:,} bytes where its header says {full:,} ({full - full // 2:,} missing); "
        "download it again (python -m flux_lora.models fetch model=flux_dev paths.models=<dir>)"
    )
    assert check_run(run, get_engine("native"), dry_run=False).errors == [line]
    assert line in check_run(run, get_engine("native"), dry_run=True).warnings
