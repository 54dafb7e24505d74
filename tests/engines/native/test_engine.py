"""NativeEngine: the frozen job input it renders, what it reports as unapplied or missing, and the
rule that the training job never imports the launcher's config machinery."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import MISSING, fields

import pytest

from flux_lora.compose import PROJECT_ROOT
from flux_lora.engines.base import EngineInputs
from flux_lora.engines.native.config import CONFIG_FILE, NativeTrainConfig
from flux_lora.engines.native.engine import NativeEngine, native_config_from_run


def test_render_writes_the_config_the_job_reads(compose_run, tmp_path):
    run = compose_run()
    engine = NativeEngine()
    inputs = engine.render(run, tmp_path, engine.unapplied_options(run))
    assert inputs.script_argv == ["-m", "flux_lora.engines.native.train", str(tmp_path.absolute())]
    assert inputs.cwd == str(PROJECT_ROOT) and inputs.env == {"HF_HUB_OFFLINE": "1"}
    (tmp_path / "native_config.json").write_text(inputs.files["native_config.json"])
    config = NativeTrainConfig.from_json(tmp_path / "native_config.json")
    assert config == native_config_from_run(run, tmp_path)
    assert config.output_dir == str(tmp_path.absolute() / "output") and config.logging_dir == str(
        tmp_path.absolute() / "logs"
    )
    assert config.model_kind == "tiny" and config.use_cpu and config.optimizer == "adamw8bit"
    assert config.sample_prompts[0] == {"text": run.dataset.sample_prompts[0].text, "seed": 1001}
    assert engine.check_inputs(run, inputs) == []


def test_the_job_config_has_no_defaults_and_the_run_sets_every_field(compose_run, tmp_path):
    # schema.py owns every default: a default here would be a second one that can drift from it.
    with_default = [f.name for f in fields(NativeTrainConfig) if (f.default, f.default_factory) != (MISSING, MISSING)]
    assert with_default == []
    run = compose_run()
    engine = NativeEngine()
    frozen = json.loads(engine.render(run, tmp_path, engine.unapplied_options(run)).files[CONFIG_FILE])
    assert sorted(frozen) == sorted(f.name for f in fields(NativeTrainConfig))
    del frozen["seed"]
    missing_seed = EngineInputs([], {CONFIG_FILE: json.dumps(frozen)})
    assert engine.check_inputs(run, missing_seed) == [f"{CONFIG_FILE}: missing key seed"]


def test_a_frozen_config_with_a_key_missing_or_unknown_is_refused_with_the_file_named(compose_run, tmp_path):
    data = json.loads(native_config_from_run(compose_run(), tmp_path).to_json())
    path = tmp_path / CONFIG_FILE
    path.write_text(json.dumps({k: v for k, v in data.items() if k != "seed"}))
    with pytest.raises(ValueError, match=re.escape(f"{path}: missing keys ['seed']")):
        NativeTrainConfig.from_json(path)
    path.write_text(json.dumps({**data, "max_data_loader_n_workers": 0}))
    with pytest.raises(ValueError, match=re.escape(f"{path}: unknown keys ['max_data_loader_n_workers']")):
        NativeTrainConfig.from_json(path)


def test_profile_values_reach_the_job(compose_run, tmp_path):
    config = native_config_from_run(
        compose_run("profile=final", "optimizer=adafactor", "launch.resume_from=/x/y-state"), tmp_path
    )
    assert (config.noise_offset, config.min_snr_gamma, config.network_dropout) == (0.1, 5.0, 0.1)
    assert config.lr_scheduler == "cosine_with_restarts" and config.resume_from == "/x/y-state"
    assert config.optimizer_args == {
        "weight_decay": 0.0,
        "relative_step": False,
        "scale_parameter": False,
        "warmup_init": False,
    }


def test_recipe_and_checkpoint_keys_reach_the_job(compose_run, tmp_path):
    run = compose_run(
        "profile.min_snr_gamma=5",
        "profile.min_snr_variant=clamp",
        "profile.save_precision=float",
        "launch.keep_last_states=0",
    )
    config = native_config_from_run(run, tmp_path)
    assert (config.min_snr_variant, config.save_precision, config.keep_last_states) == ("clamp", "float", 0)
    assert native_config_from_run(compose_run(), tmp_path).keep_last_states == 2


def test_a_resume_state_that_is_not_complete_is_named(compose_run, tmp_path):
    state = tmp_path / "flux-lora-step00000004-state"
    state.mkdir()
    (state / "optimizer.bin").write_bytes(b"half")  # no manifest: a write that never finished
    missing = NativeEngine().missing_requirements(compose_run(f"launch.resume_from={state}"))
    assert missing == [
        f"launch.resume_from: {state}: no manifest.json (an unfinished write, or a state from before manifests)"
    ]


def test_unapplied_options_are_reported_and_not_passed_on(compose_run, tmp_path):
    run = compose_run("gpu.blocks_to_swap=4", "profile.noise_offset=0.1", "profile.min_snr_gamma=5")
    unapplied = NativeEngine().unapplied_options(run)
    assert "gpu.blocks_to_swap" in unapplied
    assert "profile.noise_offset" not in unapplied and "profile.min_snr_gamma" not in unapplied
    assert native_config_from_run(run, tmp_path, unapplied).blocks_to_swap == 0
    assert NativeEngine().unapplied_options(compose_run("gpu=h100", "model=flux_dev")).get("gpu.blocks_to_swap") is None


def test_missing_requirements(compose_run, tmp_path):
    engine = NativeEngine()
    assert engine.missing_requirements(compose_run()) == []
    missing = engine.missing_requirements(compose_run("model=flux_dev", f"paths.models={tmp_path}"))
    assert missing and all(line.startswith("model.") for line in missing)


def test_version_record(compose_run):
    record = NativeEngine().version_record(compose_run())
    assert record["engine"] == "native" and {"diffusers", "peft", "torch"} <= set(record)


def test_training_job_imports_no_hydra_or_schema():
    code = (
        "import sys\n"
        "import flux_lora.engines.native.train, flux_lora.engines.native.models, flux_lora.engines.native.lora\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('hydra', 'omegaconf') or m in ('flux_lora.schema', 'flux_lora.compose'))\n"
        "print(bad[:8])\n"
        "sys.exit(1 if bad else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, f"the training job imports {done.stdout.strip()}"
