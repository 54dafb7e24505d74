"""Bad input through the real CLI: each is refused with one line on stderr naming what to fix, no traceback.

Every case runs `python launch.py ...` in a subprocess with paths.outputs in tmp_path, as a dry run
or as a launch that is refused before anything trains. The GPU cases use this machine's real view
of the hardware (no nvidia-smi here), or CUDA_VISIBLE_DEVICES=-1, which hides GPUs on any machine.
The lines asserted here are the ones README's "Bad input" table quotes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from flux_lora.compose import PROJECT_ROOT
from flux_lora.rules import plain_stem_problem
from tests.cli import run_cli
from tests.models.model_stubs import write_model_folder

WEIGHT_FILES = ("flux1-dev.safetensors", "ae.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors")
HINT = "  (FLUX_LORA_TRACEBACK=1 shows the traceback)"


def launch(args: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # This machine's real view of the GPUs, whatever the shell hid: a test that hides them says so in env.
    return run_cli(*args, folder=tmp_path, env=env, drop=["CUDA_VISIBLE_DEVICES"])


def the_error(done: subprocess.CompletedProcess[str], code: int) -> str:
    """The one line on stderr, after checking the exit status and that no traceback was printed."""
    assert "Traceback" not in done.stdout + done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert done.returncode == code, (done.returncode, done.stderr)
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def assert_nothing_trained(tmp_path: Path) -> None:
    for status in (tmp_path / "outputs").rglob("status.json"):
        assert json.loads(status.read_text())["state"] == "refused"
        assert not (status.parent / "output").exists() and not (status.parent / "train.log").exists()


def placeholder_models(tmp_path: Path, missing: str = "") -> Path:
    """A models folder with every FLUX.1-dev file, less `missing`: real headers over a sparse hole (nothing here loads
    the weights, and the launch reads every header; tests/models/model_stubs.py)."""
    models = tmp_path / "models"
    for name in ("tokenizers/tokenizer", "tokenizers/tokenizer_2"):
        (models / name).mkdir(parents=True)
        (models / name / "vocab.json").write_text("{}")
    write_model_folder(models)
    if missing:
        (models / missing).unlink()
    return models


def test_unknown_key(tmp_path: Path) -> None:
    line = the_error(launch(["profile.resolutoin=512"], tmp_path), 2)
    assert line == (
        "error: profile.resolutoin: unknown key: Key 'resolutoin' not in 'ProfileConfig'; check the spelling "
        "(`python launch.py --cfg job` lists every key)" + HINT
    )
    assert not (tmp_path / "outputs").exists()


def test_key_added_with_plus_is_refused(tmp_path: Path) -> None:
    # Hydra's `+` adds a key with struct mode off; it used to be frozen while the default step count trained.
    line = the_error(launch(["+profile.max_steps=5", "launch.dry_run=true"], tmp_path), 2)
    assert line == (
        "error: profile.max_steps: unknown key: Key 'max_steps' not in 'ProfileConfig' (a `+` override cannot add keys "
        "the schema lacks); check the spelling (`python launch.py --cfg job` lists every key)"
    )
    assert not (tmp_path / "outputs").exists()


def test_wrong_type(tmp_path: Path) -> None:
    line = the_error(launch(["profile.max_train_steps=abc"], tmp_path), 2)
    assert (
        line
        == "error: profile.max_train_steps: wrong value: Value 'abc' of type 'str' could not be converted to Integer"
        + HINT
    )


def test_missing_group_option(tmp_path: Path) -> None:
    line = the_error(launch(["gpu=rtx5090"], tmp_path), 2)
    assert (
        line == "error: gpu=rtx5090: no such option in conf/gpu/; choose one of: a6000, cpu, h100, h200, rtx4090" + HINT
    )


def test_missing_dataset_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_dataset"
    line = the_error(launch([f"dataset.path={missing}", "launch.dry_run=true"], tmp_path), 1)
    assert line == f"error: dataset.path: dataset folder {missing} does not exist: check the dataset path"
    assert_nothing_trained(tmp_path)


def test_empty_dataset_folder(tmp_path: Path) -> None:
    empty = tmp_path / "empty_dataset"
    empty.mkdir()
    done = launch([f"dataset.path={empty}", "launch.dry_run=true"], tmp_path)
    line = the_error(done, 1)  # refused by the check, and recorded as refused in a complete run directory
    assert f"dataset folder {empty} holds no images" in line, line
    assert_nothing_trained(tmp_path)
    (run_json,) = (tmp_path / "outputs").rglob("run.json")
    assert json.loads((run_json.parent / "status.json").read_text())["state"] == "refused"


def test_missing_weights(tmp_path: Path) -> None:
    models = placeholder_models(tmp_path, missing="flux1-dev.safetensors")
    line = the_error(launch(["model=flux_dev", "engine=native", f"paths.models={models}"], tmp_path), 1)
    assert line == (
        f"error: model.transformer: {models / 'flux1-dev.safetensors'} not found; set model.transformer=<path> "
        "or paths.models=<dir>"
    )
    assert_nothing_trained(tmp_path)


def test_missing_sd_scripts_checkout(tmp_path: Path) -> None:
    models = placeholder_models(tmp_path)
    args = ["engine=sd_scripts", "model=flux_dev", f"paths.models={models}", "dataset.bucket_reso_steps=64"]
    line = the_error(launch(args, tmp_path), 1)
    assert (
        line
        == "error: engine.sd_scripts_dir: no sd-scripts checkout at (unset); set SD_SCRIPTS_DIR or engine.sd_scripts_dir=/path/to/sd-scripts"
    )
    assert_nothing_trained(tmp_path)


@pytest.mark.skipif(
    shutil.which("nvidia-smi") is not None or importlib.util.find_spec("pynvml") is not None,
    reason="this machine can see GPUs; the CUDA_VISIBLE_DEVICES case covers it",
)
def test_gpu_tier_on_a_machine_without_cuda(tmp_path: Path) -> None:
    line = the_error(launch(["gpu=h100"], tmp_path), 1)
    assert (
        line
        == "error: gpu=h100: no CUDA GPU visible on this machine (nvidia-smi not found); use gpu=cpu or run on a GPU node"
    )
    assert_nothing_trained(tmp_path)
    # A dry run of the same cluster config still works: the line is a warning there.
    done = launch(["gpu=h100", "launch.dry_run=true"], tmp_path)
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr
    assert "warning: gpu=h100: no CUDA GPU visible on this machine (nvidia-smi not found)" in done.stdout


def test_gpu_tier_with_every_gpu_hidden(tmp_path: Path) -> None:
    line = the_error(launch(["gpu=a6000"], tmp_path, {"CUDA_VISIBLE_DEVICES": "-1"}), 1)
    assert (
        line
        == "error: gpu=a6000: no CUDA GPU visible on this machine (CUDA_VISIBLE_DEVICES='-1' hides every GPU); use gpu=cpu or run on a GPU node"
    )
    assert_nothing_trained(tmp_path)


def test_conflicting_options(tmp_path: Path) -> None:
    line = the_error(launch(["gpu=rtx4090", "gpu.cpu_offload_checkpointing=true", "launch.dry_run=true"], tmp_path), 1)
    assert line == "error: gpu.cpu_offload_checkpointing=true: excluded by gpu.blocks_to_swap>0; set one of them off"
    assert_nothing_trained(tmp_path)


def test_outputs_that_cannot_be_created(tmp_path: Path) -> None:
    # Under a regular file: no folder can be made there, whoever runs the test (root included).
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    line = the_error(launch(["launch.dry_run=true", f"paths.outputs={blocker / 'outputs'}"], tmp_path), 2)
    assert (
        line
        == f"error: paths.outputs={blocker / 'outputs'}: cannot write there ({blocker} is a file, not a folder); set paths.outputs=<a writable folder>"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the regular-file case covers it")
def test_outputs_in_a_read_only_folder(tmp_path: Path) -> None:
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o555)
    line = the_error(launch(["launch.dry_run=true", f"paths.outputs={read_only}"], tmp_path), 2)
    assert (
        line
        == f"error: paths.outputs={read_only}: cannot write there (Permission denied); set paths.outputs=<a writable folder>"
    )


def test_outputs_on_a_nearly_full_disk(tmp_path: Path) -> None:
    # The threshold is settable, so a real disk is "nearly full" against a threshold above its size.
    line = the_error(launch(["launch.dry_run=true", "hydra.callbacks.preflight.min_free_gib=1000000"], tmp_path), 2)
    assert (
        line.startswith(f"error: paths.outputs={tmp_path / 'outputs'}: only ") and "GiB free (below 1e+06 GiB)" in line
    )


@pytest.mark.parametrize("name", ["../escaped", "/tmp/absolute", "sub/dir", ""])
def test_output_name_escaping_the_run_directory(tmp_path: Path, name: str) -> None:
    line = the_error(launch([f"launch.output_name={name}", "launch.dry_run=true"], tmp_path), 1)
    assert line == (
        f"error: launch.output_name={name!r}: must be a plain file name stem (letters, digits, '.', '_', '-'; "
        "no path separators or '..', at most 128 characters); set launch.output_name=flux-lora or a similar name"
    )
    assert_nothing_trained(tmp_path)


@pytest.mark.parametrize("name", [".hidden", "..", "my lora", "x" * 129, "lora."])
def test_names_that_are_not_a_plain_stem(name: str) -> None:
    # The same rule as above without a launch each: hidden, parent, spaces, too long, a cut-off extension.
    assert plain_stem_problem("launch.output_name", name) is not None
    assert plain_stem_problem("launch.output_name", "flux-lora_v2.1") is None


def test_run_name_escaping_the_outputs(tmp_path: Path) -> None:
    line = the_error(launch(["name=../../../../escaped", "launch.dry_run=true"], tmp_path), 2)
    assert line.startswith("error: name='../../../../escaped': must be a plain file name stem")
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "escaped").exists()


def test_a_second_launch_into_the_same_run_directory_gets_its_own(tmp_path: Path) -> None:
    """Not an error: two launches naming one folder (same second, or hydra.run.dir given twice) never share it."""
    run_dir = tmp_path / "outputs" / "runs" / "same"
    first = launch(["launch.dry_run=true", f"hydra.run.dir={run_dir}"], tmp_path)
    second = launch(["launch.dry_run=true", f"hydra.run.dir={run_dir}", "profile.learning_rate=2e-3"], tmp_path)
    assert first.returncode == second.returncode == 0, second.stderr
    assert (
        f"{run_dir} holds another launch's run; flux-lora never shares or overwrites one: this run is in {run_dir}-2"
        in second.stdout
    )
    assert (
        json.loads((run_dir / "run.json").read_text())["run_id"]
        != json.loads((run_dir.with_name("same-2") / "run.json").read_text())["run_id"]
    )
    assert "learning_rate: 0.001" in (run_dir / "config.yaml").read_text()  # the first run's record is untouched


def test_a_caption_with_terminal_escapes_is_refused_with_its_file_and_never_echoed(tmp_path: Path) -> None:
    dataset = tmp_path / "hostile"
    shutil.copytree(PROJECT_ROOT / "data" / "sample", dataset)
    caption = sorted(dataset.glob("*.txt"))[1]
    caption.write_text("TOK Woman, \x1b[31mred\x1b[0m portrait \x1b]0;pwned\x07 title")
    done = launch([f"dataset.path={dataset}", "launch.dry_run=true"], tmp_path)
    assert "\x1b" not in done.stdout + done.stderr and "\x07" not in done.stdout + done.stderr
    line = the_error(done, 1)
    assert line.startswith(
        f"error: dataset.path: {caption}: caption holds a control character (\\x1b at character 11)"
    ), line
    report = json.loads(next((tmp_path / "outputs").rglob("dataset_report.json")).read_text())
    (flagged,) = [image for image in report["images"] if "caption_control_chars" in image["caption"]["flags"]]
    assert "\\x1b[31mred" in flagged["caption"]["text"]  # kept written out, never raw


@pytest.mark.parametrize("link", ["dangling", "loop"])
def test_a_link_that_leads_nowhere_is_named_in_one_line(tmp_path: Path, link: str) -> None:
    dataset = tmp_path / "linked"
    shutil.copytree(PROJECT_ROOT / "data" / "sample", dataset)
    bad = dataset / "99_extra.jpg"
    bad.symlink_to(dataset / "gone.jpg" if link == "dangling" else bad)
    (dataset / "99_extra.txt").write_text("TOK Woman, extra")
    line = the_error(launch([f"dataset.path={dataset}", "launch.dry_run=true"], tmp_path), 1)
    expected = "99_extra.jpg (a link loop)" if link == "loop" else f"99_extra.jpg (dangling: -> {dataset / 'gone.jpg'})"
    assert f"dataset folder {dataset}: 1 link(s) lead to no file: {expected}; remove or repair them" in line, line


def test_a_link_out_of_the_dataset_folder_is_named(tmp_path: Path) -> None:
    dataset, elsewhere = tmp_path / "linked", tmp_path / "library"
    shutil.copytree(PROJECT_ROOT / "data" / "sample", dataset)
    elsewhere.mkdir()
    photo = sorted(dataset.glob("*.jpg"))[0]
    shutil.move(photo, elsewhere / photo.name)
    photo.symlink_to(elsewhere / photo.name)
    done = launch([f"dataset.path={dataset}", "launch.dry_run=true"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (
        f"1 file(s) are links out of the dataset folder (they train, but the folder alone is not the dataset): {photo.name} -> {elsewhere / photo.name}"
        in done.stdout + done.stderr
    )
