"""sd-scripts engine: the argv contract with the pinned parser, the dataset TOML, the sample prompts,
and the checks made at launch (option table, the checkout's own parser in a subprocess, commit pin).

sd-scripts itself is never run here: where a checkout is needed, a fake one in tmp_path wraps the
stand-in (tests/engines/sd_scripts_standin.py), whose parser is built from the reference option table.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from flux_lora.compose import CONF_DIR, load_run, register
from flux_lora.engines.sd_scripts import (
    NOOP_FLAGS,
    REFERENCE_JSON,
    SAMPLE_GUIDANCE,
    UNSAFE_DEFAULT_FLAGS,
    SdScriptsEngine,
    check_args_against_reference,
    checkout_commit,
    commit_warning,
    load_reference_options,
    render_dataset_toml,
    render_sample_prompts,
    split_flags,
)
from flux_lora.schema import RunConfig
from tests.conftest import ABLATIONS
from tests.engines.native.native_tiny_run import make_dataset

REPO = Path(__file__).resolve().parents[2]
SHARED_REFERENCE = REPO.parent / "shared" / "reference" / "sd_scripts_flux_args.json"
REFERENCE = SHARED_REFERENCE if SHARED_REFERENCE.is_file() else REFERENCE_JSON
STANDIN = Path(__file__).resolve().parent / "sd_scripts_standin.py"

PROFILES = ("fast", "final", "smoke")
GPUS = ("rtx4090", "a6000", "h100", "h200")
RUN_DIR = Path("/runs/test-run")


def compose_runs(override_sets: list[list[str]]) -> list[RunConfig]:
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        base = ["engine=sd_scripts", "model=flux_dev"]
        return [load_run(compose("config", overrides=[*base, *overrides])) for overrides in override_sets]


def compose_run(*overrides: str) -> RunConfig:
    return compose_runs([list(overrides)])[0]


def render_args(run: RunConfig) -> list[str]:
    engine = SdScriptsEngine()
    return engine.render(run, RUN_DIR, engine.unapplied_options(run)).script_argv[1:]


def flags(argv: list[str]) -> dict[str, list[str]]:
    return dict(split_flags(argv)[0])


@pytest.fixture(scope="module")
def matrix() -> list[tuple[str, RunConfig, list[str]]]:
    """Every profile x gpu x ablation cell, rendered once for the module (about 100 compositions)."""
    cells = list(itertools.product(PROFILES, GPUS, ABLATIONS))
    runs = compose_runs([[f"profile={p}", f"gpu={g}", f"ablation={a}"] for p, g, a in cells])
    return [("/".join(cell), run, render_args(run)) for cell, run in zip(cells, runs)]


@pytest.fixture(scope="module")
def reference_parser():
    """The stand-in's parser: an argparse parser built from the reference option table."""
    spec = importlib.util.spec_from_file_location("sd_scripts_standin", STANDIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.OPTIONS_JSON = REFERENCE
    return module.setup_parser()


# ---------------------------------------------------------------- the flag contract


def test_packaged_option_table_is_the_reference():
    if not SHARED_REFERENCE.is_file():
        pytest.skip("no shared reference next to the repository")
    assert json.loads(REFERENCE_JSON.read_text()) == json.loads(SHARED_REFERENCE.read_text())


def test_option_table_is_of_the_pinned_commit():
    assert json.loads(REFERENCE_JSON.read_text(encoding="utf-8"))["commit"] == compose_run().engine.pinned_commit


def test_every_emitted_flag_is_a_valid_option_of_the_pinned_parser(matrix, reference_parser):
    options = load_reference_options(REFERENCE)
    for cell, _, argv in matrix:
        assert check_args_against_reference(argv, options) == [], cell
        groups, stray = split_flags(argv)
        assert stray == [], cell
        names = [flag for flag, _ in groups]
        assert len(names) == len(set(names)), f"{cell}: a flag given twice"
        for flag, values in groups:
            option = options[flag]
            if option.action == "store_true":
                assert values == [], f"{cell}: {flag} is a switch"
        reference_parser.parse_args(argv)  # type conversion and choices, as argparse does them
        for flag in UNSAFE_DEFAULT_FLAGS:
            assert flag in names, f"{cell}: {flag} left to its unsafe parser default"
        for flag in NOOP_FLAGS:
            assert flag not in names, f"{cell}: {flag} does nothing for FLUX"


def test_option_table_check_reports_each_kind_of_problem():
    problems = check_args_against_reference(
        [
            "stray",
            "--noise_offsett",
            "0.1",
            "--network_dim",
            "sixty-four",
            "--mixed_precision",
            "fp32",
            "--gradient_checkpointing",
            "true",
            "--seed",
            "1",
            "--seed",
            "2",
            "--learning_rate",
            "--lr_warmup_steps",
            "10%",
        ]
    )
    text = "\n".join(problems)
    assert "'stray': a value before any flag" in text
    assert "--noise_offsett: not an option" in text
    assert "--network_dim: 'sixty-four' is not a valid int" in text
    assert "--mixed_precision: 'fp32' is not one of ['no', 'fp16', 'bf16']" in text
    assert "--gradient_checkpointing: a switch (store_true) given 1 value(s)" in text
    assert "--seed: given more than once" in text
    assert "--learning_rate: takes one value, given 0" in text
    assert len(problems) == 7  # "10%" is a valid int_or_float


def test_network_alpha_is_the_configured_alpha(matrix):
    for cell, run, argv in matrix:
        assert float(flags(argv)["--network_alpha"][0]) == run.profile.network_alpha, cell
        assert int(flags(argv)["--network_dim"][0]) == run.profile.network_dim, cell
    baseline = compose_run("profile=final", "gpu=h100", "ablation=baseline")
    a1 = compose_run("profile=final", "gpu=h100", "ablation=a1_alpha")
    assert flags(render_args(baseline))["--network_alpha"] == ["1.0"]
    assert flags(render_args(a1))["--network_alpha"] == ["64.0"]


def test_drift_list_options_are_passed_when_configured(matrix):
    """The options the old shell scripts documented but never passed (original-pipeline.md)."""
    optimizer_types = {"adamw8bit": "AdamW8bit", "adamw": "AdamW", "adafactor": "Adafactor"}
    for cell, run, argv in matrix:
        got = flags(argv)
        assert got["--gradient_accumulation_steps"] == [str(run.gpu.gradient_accumulation_steps)], cell
        assert ("--fp8_base" in got) == run.gpu.fp8_base, cell
        dropout = run.profile.network_dropout
        assert got.get("--network_dropout") == (None if dropout is None else [repr(dropout)]), cell
        assert got["--optimizer_type"] == [optimizer_types[run.optimizer.name.value]], cell
        assert got["--mixed_precision"] == ["bf16"] and got["--caption_extension"] == [".txt"], cell
        assert ("--blocks_to_swap" in got) == (run.gpu.blocks_to_swap > 0), cell
    a3 = compose_run("profile=fast", "gpu=h200", "ablation=a3_grad_accum")
    a5 = compose_run("profile=fast", "gpu=h100", "ablation=a5_fp8_base")
    assert flags(render_args(a3))["--gradient_accumulation_steps"] == ["4"]
    assert "--fp8_base" in flags(render_args(a5))


def test_optimizer_args_fit_each_optimizer():
    adamw = flags(render_args(compose_run("profile=fast", "gpu=h100")))["--optimizer_args"]
    adafactor = flags(render_args(compose_run("profile=fast", "gpu=h100", "optimizer=adafactor")))["--optimizer_args"]
    assert adamw == ["weight_decay=0.01", "betas=0.9,0.999", "eps=1e-08"]
    assert adafactor == ["weight_decay=0.0", "relative_step=False", "scale_parameter=False", "warmup_init=False"]


def test_noop_options_are_reported_not_passed():
    run = compose_run("profile=final", "gpu=h100")  # final sets noise_offset 0.1 and min_snr_gamma 5
    unapplied = SdScriptsEngine().unapplied_options(run)
    assert set(unapplied) == {"profile.noise_offset", "profile.min_snr_gamma"}
    assert all("engine=native applies it" in reason for reason in unapplied.values())
    assert SdScriptsEngine().unapplied_options(compose_run("profile=smoke", "gpu=h100")) == {}


def test_cpu_offload_checkpointing_needs_gradient_checkpointing():
    run = compose_run("profile=fast", "gpu=h100", "gpu.cpu_offload_checkpointing=true")
    assert "--cpu_offload_checkpointing" in flags(render_args(run))
    run = compose_run(
        "profile=fast", "gpu=h100", "gpu.cpu_offload_checkpointing=true", "profile.gradient_checkpointing=false"
    )
    assert "gpu.cpu_offload_checkpointing" in SdScriptsEngine().unapplied_options(run)
    assert "--cpu_offload_checkpointing" not in flags(render_args(run))


def test_run_directory_paths_resume_and_data_loader(tmp_path):
    got = flags(render_args(compose_run("profile=fast", "gpu=h100")))
    assert got["--output_dir"] == [str(RUN_DIR / "output")]
    assert got["--logging_dir"] == [str(RUN_DIR / "logs")] and got["--log_with"] == ["tensorboard"]
    assert got["--dataset_config"] == [str(RUN_DIR / "dataset.toml")]
    assert got["--sample_prompts"] == [str(RUN_DIR / "sample_prompts.txt")]
    assert got["--output_name"] == ["flux-lora"] and "--save_state" in got
    assert got["--tokenizer_cache_dir"] == [str(REPO / "models" / "tokenizer_cache")]
    assert "--resume" not in got and "--skip_until_initial_step" not in got
    state = tmp_path / "flux-lora-step00000500-state"
    state.mkdir()
    (state / "train_state.json").write_text('{"current_epoch": 3, "current_step": 500}')
    resumed = flags(render_args(compose_run("profile=fast", "gpu=h100", f"launch.resume_from={state}")))
    # Never the skip flag (wrong with accumulation > 1); the remaining 1000 of 1500 steps in a folder of their own.
    assert resumed["--resume"] == [str(state)] and "--skip_until_initial_step" not in resumed
    assert resumed["--initial_step"] == ["0"] and resumed["--max_train_steps"] == ["1000"]
    assert resumed["--output_dir"] == [str(RUN_DIR / "output" / "resumed-from-step00000500")]
    assert resumed["--log_prefix"] == ["from-step00000500-"]
    smoke = flags(render_args(compose_run("profile=smoke", "gpu=h100")))
    assert smoke["--max_data_loader_n_workers"] == ["0"] and "--persistent_data_loader_workers" not in smoke


# ---------------------------------------------------------------- run-directory files


def test_dataset_toml_holds_the_dataset_group():
    run = compose_run("profile=final", "gpu=h100", "dataset=subject")
    config = tomllib.loads(render_dataset_toml(run))
    assert config["general"] == {"caption_extension": ".txt", "shuffle_caption": False}
    (dataset,) = config["datasets"]
    (subset,) = dataset.pop("subsets")
    assert dataset == {
        "resolution": 768,
        "enable_bucket": True,
        "min_bucket_reso": 256,
        "max_bucket_reso": 1024,
        "bucket_reso_steps": 64,
        "bucket_no_upscale": False,
    }
    assert subset == {"image_dir": str(REPO / "data" / "subject"), "class_tokens": "woman", "num_repeats": 10}
    # Batch size is passed once, as --train_batch_size, which the dataset falls back to.
    assert flags(render_args(run))["--train_batch_size"] == ["2"]


def test_dataset_toml_keeps_the_trigger_first_when_captions_are_shuffled():
    run = compose_run("profile=fast", "gpu=h100", "profile.shuffle_caption=true", "profile.caption_dropout_rate=0.1")
    general = tomllib.loads(render_dataset_toml(run))["general"]
    assert general == {
        "caption_extension": ".txt",
        "shuffle_caption": True,
        "keep_tokens": 1,
        "caption_dropout_rate": 0.1,
    }
    # Cached text-encoder outputs cannot follow caption augmentations.
    assert "--cache_text_encoder_outputs" not in flags(render_args(run))


def test_sample_prompts_have_fixed_seeds_size_steps_and_guidance():
    run = compose_run("profile=final", "gpu=h100")
    lines = render_sample_prompts(run).splitlines()
    assert len(lines) == len(run.dataset.sample_prompts) == 5
    for line, prompt in zip(lines, run.dataset.sample_prompts):
        assert line == f"{prompt.text} --w 768 --h 768 --d {prompt.seed} --s 20 --g {SAMPLE_GUIDANCE}"
    bad = compose_run("profile=final", "gpu=h100", "dataset.trigger='TOK --n ugly'")
    with pytest.raises(ValueError, match=r"sample_prompts\[0\]"):
        render_sample_prompts(bad)


def test_render_returns_script_files_and_cwd(tmp_path):
    run = compose_run("profile=fast", "gpu=h100")
    inputs = SdScriptsEngine().render(run, tmp_path, {})
    assert inputs.script_argv[0] == "<engine.sd_scripts_dir unset>/flux_train_network.py"
    assert inputs.cwd == str(tmp_path) and inputs.env == {}
    assert set(inputs.files) == {"dataset.toml", "sample_prompts.txt"}
    checkout = tmp_path / "sd-scripts"
    run = compose_run("profile=fast", "gpu=h100", f"engine.sd_scripts_dir={checkout}")
    inputs = SdScriptsEngine().render(run, tmp_path, {})
    assert inputs.script_argv[0] == str(checkout / "flux_train_network.py") and inputs.cwd == str(checkout)


# ---------------------------------------------------------------- launch checks


def fake_checkout(root: Path, body: str | None = None) -> Path:
    """A stand-in sd-scripts checkout: its flux_train_network.py re-exports the stand-in's parser."""
    root.mkdir(parents=True, exist_ok=True)
    body = body or (
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('standin', {str(STANDIN)!r})\n"
        "standin = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(standin)\n"
        "setup_parser = standin.setup_parser\n"
    )
    (root / "flux_train_network.py").write_text(body)
    return root


def git_checkout(root: Path) -> str:
    fake_checkout(root)
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git[:3], "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "stand-in"], check=True)
    return subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()


def test_commit_is_recorded_and_a_mismatch_warns(tmp_path):
    checkout = tmp_path / "sd-scripts"
    commit = git_checkout(checkout)
    assert checkout_commit(checkout) == commit and checkout_commit(tmp_path / "none") is None
    (checkout / "library").mkdir()
    assert checkout_commit(checkout / "library") is None  # a folder inside a repository is not a checkout
    run = compose_run(f"engine.sd_scripts_dir={checkout}")
    record = SdScriptsEngine().version_record(run)
    assert record == {
        "engine": "sd_scripts",
        "sd_scripts_dir": str(checkout),
        "commit": commit,
        "pinned_commit": "48d368fa557731ad0488c07304dfeba8c07910eb",
        "matches_pin": False,
    }
    assert "not the pinned 48d368fa" in commit_warning(run)
    pinned = compose_run(f"engine.sd_scripts_dir={checkout}", f"engine.pinned_commit={commit}")
    assert SdScriptsEngine().version_record(pinned)["matches_pin"] is True and commit_warning(pinned) is None


def test_missing_requirements_name_the_key_to_fix(tmp_path):
    run = compose_run(f"paths.models={tmp_path}")
    missing = SdScriptsEngine().missing_requirements(run)
    assert missing[0].startswith("engine.sd_scripts_dir: no sd-scripts checkout at (unset); set SD_SCRIPTS_DIR")
    assert (
        f"model.transformer: {tmp_path}/flux1-dev.safetensors not found; set model.transformer=... or paths.models=..."
    ) in missing
    assert len(missing) == 5
    for name in ("flux1-dev", "ae", "clip_l", "t5xxl_fp16"):
        (tmp_path / f"{name}.safetensors").write_bytes(b"")
    ready = compose_run(f"paths.models={tmp_path}", f"engine.sd_scripts_dir={fake_checkout(tmp_path / 'sd')}")
    assert SdScriptsEngine().missing_requirements(ready) == []
    tiny = compose_run("model=tiny", f"engine.sd_scripts_dir={tmp_path / 'sd'}")
    assert SdScriptsEngine().missing_requirements(tiny) == [
        "engine=sd_scripts trains FLUX.1-dev weights; choose model=flux_dev"
    ]


def test_standin_writes_what_sd_scripts_writes(tmp_path):
    """The stand-in itself (run with python, not accelerate): sd-scripts' output names and a TensorBoard run."""
    make_dataset(tmp_path / "images", count=2)
    run = compose_run(
        "profile=smoke",
        "gpu=h100",
        f"dataset.path={tmp_path / 'images'}",
        "profile.max_train_steps=30",
        "profile.save_every_n_steps=15",
    )
    inputs = SdScriptsEngine().render(run, tmp_path, {})
    for name, text in inputs.files.items():
        (tmp_path / name).write_text(text)
    command = [sys.executable, str(STANDIN), *inputs.script_argv[1:]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "steps: 30/30" in done.stdout
    output = tmp_path / "output"
    assert sorted(p.name for p in output.iterdir()) == [
        "flux-lora-state",
        "flux-lora-step00000015-state",
        "flux-lora-step00000015.safetensors",
        "flux-lora-step00000030-state",
        "flux-lora-step00000030.safetensors",
        "flux-lora.safetensors",
    ]
    assert json.loads((output / "flux-lora-state" / "train_state.json").read_text())["current_step"] == 30
    from safetensors import safe_open

    with safe_open(str(output / "flux-lora.safetensors"), "pt") as lora:
        metadata = lora.metadata()
        assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in lora.keys()
    assert metadata["ss_network_alpha"] == "8.0" and "ss_noise_offset" not in metadata
    (event_dir,) = (tmp_path / "logs").glob("*/network_train")
    assert list(event_dir.glob("events.out.tfevents.*"))
    assert subprocess.run([sys.executable, str(STANDIN), "--not_an_option"], capture_output=True).returncode == 2
