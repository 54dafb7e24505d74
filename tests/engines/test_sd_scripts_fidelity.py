"""Engine fidelity for sd-scripts: what a real run would do wrong while exiting 0, one test per item.

sd-scripts cannot train here. The checks that need its code run against a real checkout when
SD_SCRIPTS_DIR and SD_SCRIPTS_PYTHON point to one (tests/engines/sd_scripts_checkout.py), else against
the stand-in, which finds images and counts resumed steps with its transcription of sd-scripts' arithmetic.
A test that ran against the stand-in is marked `standin` (the tests that only ever run it, always), and the
pytest summary counts them: their passing is the stand-in's reading of sd-scripts, not sd-scripts'.
The stand-in itself is started with plain python (accelerate is exercised by tests/test_launch_e2e.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
from hydra import compose, initialize_config_dir
from safetensors import safe_open

from flux_lora.compose import CONF_DIR, load_run, register
from flux_lora.dataset.training_set import TRAINING_SET_FILE, training_set_from_folder
from flux_lora.engines.sd_scripts import SdScriptsEngine, engine_preflight, split_flags
from flux_lora.engines.sd_scripts_dataset import VIEWS_FOLDER, build_dataset_view
from flux_lora.engines.sd_scripts_resume import adopt_resumed_outputs
from flux_lora.lifecycle.outcome import gather_evidence, scalar_series, training_shortfall
from flux_lora.rules import apply_rules
from flux_lora.schema import RunConfig
from tests.cli import run_cli
from tests.conftest import ABLATIONS
from tests.engines.native.native_tiny_run import make_dataset
from tests.engines.sd_scripts_checkout import STANDIN, Checkout, checkout_for_tests, real_checkout


def compose_run(*overrides: str) -> RunConfig:
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return load_run(compose("config", overrides=["engine=sd_scripts", "model=flux_dev", *overrides]))


def flags(argv: list[str]) -> dict[str, list[str]]:
    return dict(split_flags(argv)[0])


def frozen_inputs(run: RunConfig, run_dir: Path, dataset: Path) -> list[str]:
    """Freeze what the launcher freezes for the engine (training set, dataset view, TOML) and return the argv."""
    run_dir.mkdir(parents=True, exist_ok=True)
    training_set_from_folder(dataset, run.dataset.caption_extension, run.dataset.class_tokens).write_json(
        run_dir / TRAINING_SET_FILE
    )
    engine = SdScriptsEngine()
    inputs = engine.render(run, run_dir, engine.unapplied_options(run))
    for name, text in inputs.files.items():
        (run_dir / name).write_text(text)
    return inputs.script_argv[1:]


def on_a_checkout(test: Callable[..., None]) -> Callable[..., None]:
    """For a test taking the `checkout` fixture: marked `standin` where no real checkout is configured (decided as
    checkout_for_tests decides, at collection, so that `-m standin` selects it)."""
    return pytest.mark.standin(test) if real_checkout() is None else test


@pytest.fixture
def checkout(tmp_path: Path, request: pytest.FixtureRequest) -> Checkout:
    found = checkout_for_tests(tmp_path / "sd-scripts")
    # The marker was given at collection: the checkout the test gets must be the one it says.
    assert (found.kind == "stand-in") == (request.node.get_closest_marker("standin") is not None), (
        f"marked, but got the {found.kind} checkout"
    )
    return found


def load_standin() -> ModuleType:
    spec = importlib.util.spec_from_file_location("standin", STANDIN)
    assert spec is not None and spec.loader is not None
    standin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(standin)
    return standin


def run_standin(argv: list[str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, str(STANDIN), *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


# ---------------------------------------------------------------- 1. bucket steps


@on_a_checkout
def test_bucket_steps_must_be_a_multiple_of_64_for_sd_scripts(tmp_path, checkout):
    findings = apply_rules(compose_run("profile=fast", "gpu=h100", "dataset.bucket_reso_steps=32"))
    assert any("dataset.bucket_reso_steps=32: engine=sd_scripts needs a multiple of 64" in e for e in findings.errors)
    native = apply_rules(compose_run("profile=fast", "gpu=h100", "engine=native", "dataset.bucket_reso_steps=32"))
    assert not any("bucket_reso_steps" in e for e in native.errors)
    # The engine's own checks catch it too (the base trainer's verify_bucket_reso_steps(64)).
    run = compose_run("profile=fast", "gpu=h100", "dataset.bucket_reso_steps=32", f"paths.cache={tmp_path / 'cache'}")
    argv = frozen_inputs(run, tmp_path / "run", make_dataset(tmp_path / "ds", count=2))
    verdict = engine_preflight(argv, checkout.path, checkout.python)
    assert verdict.state == "failed" and "64" in verdict.problem and verdict.steps[-1] == "assert_extra_args"


@on_a_checkout
def test_all_nine_ablation_cells_pass_the_engine_preflight(tmp_path, checkout):
    """The README's sd-scripts sweep (profile=fast gpu=h100) with 64 px bucket steps, through sd-scripts' own checks."""
    dataset = make_dataset(tmp_path / "ds", count=3)
    for ablation in ABLATIONS:
        run = compose_run(
            "profile=fast",
            "gpu=h100",
            f"ablation={ablation}",
            "dataset.bucket_reso_steps=64",
            f"paths.cache={tmp_path / 'cache'}",
        )
        argv = frozen_inputs(run, tmp_path / ablation, dataset)
        verdict = engine_preflight(argv, checkout.path, checkout.python)
        assert verdict.state == "passed", f"{ablation} on the {checkout.kind} checkout: {verdict.problem}"


# ---------------------------------------------------------------- 2. resume


@pytest.mark.standin
def test_the_skip_flag_trains_nothing_after_a_resume_with_accumulation(tmp_path):
    """The issue's case (fast/h100, 200 images per epoch, resumed at 500): the argv the launcher passes, and why it
    never passes --skip_until_initial_step. The arithmetic is the stand-in's transcription of train_network.py
    (resume_arithmetic, which cites the lines it follows), not sd-scripts running: what this checks of the launcher is
    its argv, as that reading of sd-scripts' code takes it."""
    standin = load_standin()
    loader_len = 100  # 20 images x 10 repeats / batch 2
    state = tmp_path / "flux-lora-step00000500-state"
    state.mkdir()
    (state / "train_state.json").write_text('{"current_epoch": 5, "current_step": 500}')
    argv = (
        SdScriptsEngine()
        .render(compose_run("profile=fast", "gpu=h100", f"launch.resume_from={state}"), tmp_path, {})
        .script_argv[1:]
    )
    passed = standin.setup_parser().parse_args(argv)
    # The launcher's own argv: sd-scripts' --resume with no epoch skipped, the count from 0, the remaining 1000 steps.
    assert (passed.resume, passed.skip_until_initial_step, passed.initial_step, passed.max_train_steps) == (
        str(state),
        False,
        0,
        1000,
    )
    assert passed.gradient_accumulation_steps == 4
    assert standin.resume_arithmetic(passed, 500, loader_len) == (
        0,
        0,
        0,
    )  # (epoch_to_start, micro-batches skipped, global_step)
    # What sd-scripts' own resume would do instead (the stand-in's reading of it), from the same state:
    flag = standin.setup_parser().parse_args(
        [
            "--max_train_steps",
            "1500",
            "--gradient_accumulation_steps",
            "4",
            "--train_batch_size",
            "2",
            "--resume",
            str(state),
            "--skip_until_initial_step",
        ]
    )
    epoch_to_start, _, global_step = standin.resume_arithmetic(flag, 500, loader_len)
    num_train_epochs = -(-1500 // -(-loader_len // 4))
    assert (epoch_to_start, num_train_epochs) == (80, 60)  # starts after the last epoch: 0 of 1000 steps train
    # Without the flag it trains from the epoch holding step 500 to max_train_steps with the count restarted at 0.
    flag.skip_until_initial_step = False
    assert standin.resume_arithmetic(flag, 500, loader_len) == (20, 0, 0)


@pytest.mark.slow
@pytest.mark.standin
def test_resume_trains_the_remaining_steps_exactly_once_and_continues_the_count(tmp_path):
    """Two resumes (4 -> 8 -> 12) run on the stand-in: what the launcher owns here is the argv of each attempt (the
    remaining steps, the count from 0) and what it does with sd-scripts' resume outputs afterwards (adopt_resumed_outputs:
    true step names, train_state.json, ss_steps; the evidence that each step trained once). How many steps an attempt
    trains from that argv is the stand-in's reading of sd-scripts' code (train_network.py's resume arithmetic), not
    sd-scripts running."""
    dataset = make_dataset(tmp_path / "ds", count=3)
    settings = [
        "profile=smoke",
        "gpu=h100",
        "gpu.batch_size=1",
        "gpu.gradient_accumulation_steps=2",
        "profile.max_train_steps=12",
        "profile.save_every_n_steps=4",
        "profile.sample_every_n_steps=100",
        f"paths.cache={tmp_path / 'cache'}",
    ]
    first = tmp_path / "first"
    run_standin(frozen_inputs(compose_run(*settings), first, dataset))
    assert gather_evidence(first, "flux-lora").last_step == 12

    # A run that stopped after step 4: resume it twice (4 -> 8 -> 12).
    resumed = tmp_path / "resumed"
    (resumed / "output").mkdir(parents=True)
    shutil.copytree(
        first / "output" / "flux-lora-step00000004-state", resumed / "output" / "flux-lora-step00000004-state"
    )
    for from_step in (4, 8):
        state = resumed / "output" / f"flux-lora-step{from_step:08d}-state"
        argv = frozen_inputs(compose_run(*settings, f"launch.resume_from={state}"), resumed, dataset)
        assert "--skip_until_initial_step" not in argv
        assert (flags(argv)["--initial_step"], flags(argv)["--max_train_steps"]) == (["0"], [str(12 - from_step)])
        done = run_standin(argv)
        assert (
            f"trained {12 - from_step} optimizer steps" in done.stdout
        )  # exactly the remaining steps (the stand-in's count)
        adopt_resumed_outputs(resumed / "output", "flux-lora")
        if from_step == 4:  # the second resume must stop at 12, so stop this attempt's files at 8 like a crash would
            shutil.rmtree(resumed / "output" / "flux-lora-step00000012-state")
            (resumed / "output" / "flux-lora-step00000012.safetensors").unlink()
            (resumed / "output" / "flux-lora.safetensors").unlink()
            shutil.rmtree(resumed / "output" / "flux-lora-state")
            assert (
                json.loads((state.parent / "flux-lora-step00000008-state" / "train_state.json").read_text())[
                    "current_step"
                ]
                == 8
            )
    names = sorted(p.name for p in (resumed / "output").iterdir())
    assert names == [
        "flux-lora-state",
        "flux-lora-step00000004-state",
        "flux-lora-step00000008-state",
        "flux-lora-step00000008.safetensors",
        "flux-lora-step00000012-state",
        "flux-lora-step00000012.safetensors",
        "flux-lora.safetensors",
    ]
    assert json.loads((resumed / "output" / "flux-lora-state" / "train_state.json").read_text())["current_step"] == 12
    steps = [step for step, _, _ in scalar_series(resumed / "logs", "loss/current")]
    # The first attempt's steps 9-12 (its files were lost in the simulated crash) were logged, then trained again:
    # the final LoRA descends from the second attempt's, so only those count (each step once).
    assert steps == [5, 6, 7, 8, 9, 10, 11, 12]
    assert training_shortfall(gather_evidence(resumed, "flux-lora"), 12) is None
    # Checkpoints of the resumed attempts carry their true global step, as the evaluator reads it.
    with safe_open(str(resumed / "output" / "flux-lora-step00000012.safetensors"), "pt") as lora:
        assert (lora.metadata()["ss_steps"], lora.metadata()["ss_attempt_steps"]) == ("12", "4")
        assert lora.keys()  # the tensors read back after the header was rewritten


def test_resume_is_refused_when_sd_scripts_cannot_continue(tmp_path):
    state = tmp_path / "flux-lora-state"
    state.mkdir()
    (state / "train_state.json").write_text('{"current_epoch": 9, "current_step": 1500}')
    engine = SdScriptsEngine()
    finished = compose_run("profile=fast", "gpu=h100", f"launch.resume_from={state}")
    inputs = engine.render(finished, tmp_path, {})
    assert any("nothing is left to train" in p for p in engine.check_inputs(finished, inputs))
    (state / "train_state.json").write_text('{"current_epoch": 2, "current_step": 500}')
    cosine = compose_run("profile=final", "gpu=h100", f"launch.resume_from={state}")
    assert any(
        "cannot continue a cosine_with_restarts schedule" in p
        for p in engine.check_inputs(cosine, engine.render(cosine, tmp_path, {}))
    )


# ---------------------------------------------------------------- 3 and 13. subfolders


@pytest.mark.standin
def test_a_dataset_in_subfolders_trains_through_the_view_and_the_old_toml_trained_nothing(tmp_path):
    dataset = tmp_path / "ds"
    make_dataset(dataset / "10_tok", count=2)
    make_dataset(dataset / "extra", count=1, seed=1)
    settings = [
        "profile=smoke",
        "gpu=h100",
        "gpu.batch_size=1",
        "gpu.gradient_accumulation_steps=1",
        "profile.max_train_steps=6",
        "profile.save_every_n_steps=100",
        "profile.sample_every_n_steps=100",
        f"dataset.path={dataset}",
        f"paths.cache={tmp_path / 'cache'}",
    ]
    run = compose_run(*settings)
    # What the launcher rendered before: the dataset folder as the one subset. sd-scripts finds nothing, exits 0.
    old = tmp_path / "old"
    argv = frozen_inputs(run, old, dataset)
    (old / "dataset.toml").write_text(
        (old / "dataset.toml").read_text().split("[[datasets.subsets]]")[0]
        + f'[[datasets.subsets]]\nimage_dir = "{dataset}"\nclass_tokens = "woman"\nnum_repeats = 1\n'
    )
    assert "No data found" in run_standin(argv).stdout
    assert training_shortfall(gather_evidence(old, "flux-lora"), 6) == (
        "exited 0 but trained 0 of 6 steps and wrote no LoRA (flux-lora.safetensors missing)"
    )
    # Now: one subset per folder, kohya's 10_ repeats, captions as the training set holds them.
    new = tmp_path / "new"
    argv = frozen_inputs(run, new, dataset)
    import tomllib

    subsets = tomllib.loads((new / "dataset.toml").read_text())["datasets"][0]["subsets"]
    assert [(Path(s["image_dir"]).name, s["num_repeats"]) for s in subsets] == [("00-10_tok", 10), ("01-extra", 1)]
    run_standin(argv)
    assert training_shortfall(gather_evidence(new, "flux-lora"), 6) is None


def test_dataset_view_follows_captions_and_never_writes_into_the_dataset(tmp_path):
    dataset = make_dataset(tmp_path / "ds", count=2)
    (dataset / "._img0.png").write_bytes(b"AppleDouble")  # macOS resource fork: never trained
    before = sorted((p.name, p.stat().st_mtime_ns) for p in dataset.iterdir())
    first = build_dataset_view(training_set_from_folder(dataset, ".txt", "woman"), tmp_path / "cache", ".txt")
    (subset,) = first.iterdir()
    assert sorted(p.name for p in subset.iterdir()) == ["img0.png", "img0.txt", "img1.png", "img1.txt"]
    assert (subset / "img0.png").resolve() == (dataset / "img0.png").resolve()
    assert (subset / "img0.txt").read_text() == "TOK woman, photo number 0\n"
    assert sorted((p.name, p.stat().st_mtime_ns) for p in dataset.iterdir()) == before
    # An edited caption is another view: sd-scripts' text-encoder cache beside the images can never be stale.
    (dataset / "img0.txt").write_text("TOK woman, edited", encoding="utf-8")
    second = build_dataset_view(training_set_from_folder(dataset, ".txt", "woman"), tmp_path / "cache", ".txt")
    assert second != first and len(list((tmp_path / "cache" / VIEWS_FOLDER).iterdir())) == 2


# ---------------------------------------------------------------- 4. warmup on several GPUs


def test_warmup_ends_at_the_configured_optimizer_step_on_several_gpus():
    for gpus in (1, 2, 4):
        run = compose_run("profile=fast", "gpu=h100", f"gpu.num_gpus={gpus}")
        warmup = int(flags(SdScriptsEngine().render(run, Path("/r"), {}).script_argv[1:])["--lr_warmup_steps"][0])
        # sd-scripts steps the scheduler once per process per optimizer step (train_util.py:5274-5277).
        assert warmup / gpus == run.profile.lr_warmup_steps == 100


# ---------------------------------------------------------------- 5. the engine's checks run in engine.python


@on_a_checkout
def test_engine_preflight_runs_in_engine_python_and_is_recorded(tmp_path, checkout):
    marker = tmp_path / "ran-in-engine-python"
    wrapper = tmp_path / "engine-venv-python"
    wrapper.write_text(f'#!/bin/sh\necho "$@" > {marker}\nexec {checkout.python} "$@"\n')
    wrapper.chmod(0o755)
    args = [
        "engine=sd_scripts",
        "model=flux_dev",
        "profile=fast",
        "gpu=h100",
        "launch.dry_run=true",
        "dataset.bucket_reso_steps=64",
        f"engine.python={wrapper}",
    ]
    done = run_cli(*args, folder=tmp_path, env={"SD_SCRIPTS_DIR": str(checkout.path)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (record,) = (tmp_path / "outputs").rglob("run.json")
    preflight = json.loads(record.read_text())["engine_preflight"]
    assert preflight["state"] == "passed" and preflight["python"] == str(wrapper), preflight
    assert "assert_extra_args" in preflight["steps"] and "sd_scripts_preflight_job.py" in marker.read_text()
    # An interpreter that does not exist refuses the run with one line naming the key.
    done = run_cli(
        *args[:-1],
        f"engine.python={tmp_path / 'no-such-python'}",
        folder=tmp_path,
        env={"SD_SCRIPTS_DIR": str(checkout.path)},
    )
    assert (
        done.returncode == 1
        and f"engine.python={tmp_path / 'no-such-python'}: no such executable" in done.stdout + done.stderr
    )


# ---------------------------------------------------------------- 6. options ignored in a combination


def test_options_sd_scripts_ignores_in_a_combination_are_recorded_not_passed():
    engine = SdScriptsEngine()
    run = compose_run("profile=fast", "gpu=h100", "profile.discrete_flow_shift=3.0", "profile.huber_schedule=constant")
    unapplied = engine.unapplied_options(run)
    assert {"profile.discrete_flow_shift", "profile.huber_schedule"} <= set(unapplied)
    argv = flags(engine.render(run, Path("/r"), unapplied).script_argv[1:])
    assert "--discrete_flow_shift" not in argv and "--huber_schedule" not in argv
    shifted = compose_run(
        "profile=fast",
        "gpu=h100",
        "profile.timestep_sampling=shift",
        "profile.discrete_flow_shift=3.0",
        "profile.loss_type=huber",
        "profile.huber_schedule=constant",
    )
    assert not {"profile.discrete_flow_shift", "profile.huber_schedule"} & set(engine.unapplied_options(shifted))
    argv = flags(engine.render(shifted, Path("/r"), {}).script_argv[1:])
    assert argv["--discrete_flow_shift"] == ["3.0"] and argv["--huber_schedule"] == ["constant"]


# ---------------------------------------------------------------- 7. tokenizers for offline pods


def test_missing_tokenizer_folders_warn_online_and_refuse_offline(tmp_path, monkeypatch):
    engine = SdScriptsEngine()
    run = compose_run(f"engine.tokenizer_cache_dir={tmp_path}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert any("google_t5-v1_1-xxl" in w for w in engine.warnings(run))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert any("google_t5-v1_1-xxl" in m for m in engine.missing_requirements(run))
    for name in ("openai_clip-vit-large-patch14", "google_t5-v1_1-xxl"):
        (tmp_path / name).mkdir()
    assert not any("tokenizer" in m for m in engine.missing_requirements(run) + engine.warnings(run))


@pytest.fixture(autouse=True)
def _no_ambient_checkout(monkeypatch):
    # Tests pick their checkout explicitly; an SD_SCRIPTS_DIR of the developer's shell must not leak into compose.
    if "SD_SCRIPTS_DIR" in os.environ and not os.environ.get("SD_SCRIPTS_PYTHON"):
        monkeypatch.delenv("SD_SCRIPTS_DIR")


def test_keep_last_states_is_passed_in_sd_scripts_units():
    engine = SdScriptsEngine()
    argv = flags(
        engine.render(compose_run("profile=fast", "gpu=h100", "launch.keep_last_states=3"), Path("/r"), {}).script_argv[
            1:
        ]
    )
    # save_every_n_steps=500: keep the states of the newest 1000 steps before the latest, i.e. 3 states.
    assert argv["--save_last_n_steps_state"] == ["1000"]
    assert "--save_last_n_steps_state" not in flags(
        engine.render(compose_run("profile=fast", "gpu=h100", "launch.keep_last_states=0"), Path("/r"), {}).script_argv[
            1:
        ]
    )
