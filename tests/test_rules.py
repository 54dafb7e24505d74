"""Semantic rules: each fires on the configuration it guards against, none fires on the shipped ones."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from flux_lora.compose import PROJECT_ROOT
from flux_lora.rules import RULES, apply_rules, lora_scale_line
from flux_lora.schema import RunConfig

ComposeRun = Callable[..., RunConfig]


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["profile=fast", "gpu=rtx4090"],
        ["profile=fast", "gpu=a6000"],
        ["profile=final", "gpu=a6000"],
        ["profile=final", "gpu=h100"],
        ["profile=final", "gpu=h200"],
        ["profile=final", "gpu=h200", "engine=sd_scripts", "model=flux_dev", "dataset=subject"],
        ["profile=fast", "gpu=h100", "gpu.num_gpus=8"],
    ],
)
def test_shipped_combinations_pass(compose_run: ComposeRun, overrides: list[str]) -> None:
    findings = apply_rules(compose_run(*overrides))
    assert findings.errors == []
    assert findings.warnings == []


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["profile.resolution=250"], "profile.resolution=250: must be a multiple of 16"),
        (["dataset.bucket_reso_steps=48"], "dataset.bucket_reso_steps=48"),
        (["profile=final", "gpu=rtx4090"], "profile.resolution=768: gpu=rtx4090 holds at most 512 px"),
        (["gpu=h100", "profile=fast", "gpu.blocks_to_swap=36"], "gpu.blocks_to_swap=36"),
        (
            ["gpu=rtx4090", "profile=fast", "gpu.cpu_offload_checkpointing=true"],
            "gpu.cpu_offload_checkpointing=true: excluded",
        ),
        (["gpu=rtx4090", "profile=fast", "gpu.num_gpus=2"], "gpu.blocks_to_swap=22: not supported with gpu.num_gpus=2"),
        (["gpu.fp8_base=true", "profile.mixed_precision=no"], "gpu.fp8_base=true: needs profile.mixed_precision=bf16"),
        (["profile.shuffle_caption=true"], "profile.shuffle_caption/caption_dropout_rate"),
        (["profile.caption_dropout_rate=0.1"], "profile.shuffle_caption/caption_dropout_rate"),
        (["profile.loss_type=huber"], "profile.huber_schedule=snr"),
        (["engine=sd_scripts"], "engine=sd_scripts: trains FLUX.1-dev weight files, not model=tiny"),
        (["profile.network_dropout=1.5"], "profile.network_dropout=1.5"),
        (["profile.lr_warmup_steps=100"], "profile.lr_warmup_steps=100"),
        (["gpu.num_gpus=3"], "gpu.num_gpus=3: the cpu tier runs one or two processes (gloo)"),
        (["dataset.validation_split=0.6"], "dataset.validation_split=0.6: must be in [0, 0.5]"),
        (
            ["dataset.validation_split=0.2", "dataset.validation_path=/data/holdout"],
            "dataset.validation_split=0.2 and dataset.validation_path",
        ),
        # Ranges the engines require: checked first and alone (the other rules divide by some of these).
        (["profile.learning_rate=-1"], "profile.learning_rate=-1: must be positive"),
        (["profile.resolution=0"], "profile.resolution=0: must be positive"),
        (["profile.network_dim=0"], "profile.network_dim=0: must be positive"),
        (["profile.max_train_steps=0"], "profile.max_train_steps=0: must be positive"),
        (["gpu.batch_size=0"], "gpu.batch_size=0: must be positive"),
        (["dataset.num_repeats=0"], "dataset.num_repeats=0: must be positive"),
        (
            ["profile.caption_dropout_rate=1.0", "profile.cache_text_encoder_outputs_to_disk=false"],
            "profile.caption_dropout_rate=1: must be in [0, 1)",
        ),
        (["optimizer.betas=[0.9,1.5]"], "optimizer.betas=[0.9, 1.5]: each must be in [0, 1)"),
        (["dataset.reg_path=/x", "dataset.reg_repeats=0"], "dataset.reg_repeats=0: must be positive"),
        (["dataset.reg_path=/x", "dataset.prior_loss_weight=-1"], "dataset.prior_loss_weight=-1: must be 0 or more"),
        # class images inside the subject's folder (or the other way round) would train the same photos as both
        (["dataset.reg_path=${paths.root}/data/sample/reg"], "dataset.reg_path=/"),
        (["dataset.reg_path=${paths.root}/data"], "dataset.reg_path=/"),
    ],
)
def test_rule_errors_name_the_key(compose_run: ComposeRun, overrides: list[str], key: str) -> None:
    errors = apply_rules(compose_run(*overrides)).errors
    assert any(e.startswith(key) for e in errors), errors
    assert all("\n" not in e for e in errors)


def test_alpha_one_is_flagged_as_shrinking_updates(compose_run: ComposeRun) -> None:
    run = compose_run("profile=fast", "gpu=h100", "ablation=baseline")
    warnings = apply_rules(run).warnings
    assert any("scaled DOWN 32x" in w for w in warnings), warnings
    assert lora_scale_line(run) == "LoRA update scale alpha/rank = 1/32 = 0.03125"


def test_class_image_settings_without_class_images_are_named(compose_run: ComposeRun) -> None:
    warnings = apply_rules(compose_run("dataset.prior_loss_weight=0.5", "dataset.reg_repeats=3")).warnings
    assert (
        "dataset.reg_repeats=3, dataset.prior_loss_weight=0.5: no effect without class images; set dataset.reg_path"
        "=<folder of class images> or drop it" in warnings
    )
    assert not [w for w in apply_rules(compose_run()).warnings if "reg_path" in w]


def test_every_rule_has_a_reason() -> None:
    assert len({r.name for r in RULES}) == len(RULES)
    assert all(r.reason and "\n" not in r.reason for r in RULES)


def test_check_holds_out_a_split_and_refuses_one_that_leaves_a_single_image(
    compose_run: ComposeRun, tmp_path: Path
) -> None:
    from flux_lora.check import check_run
    from flux_lora.engines import get_engine

    report = check_run(
        compose_run("dataset.validation_split=0.25", f"paths.cache={tmp_path}"), get_engine("native"), dry_run=True
    )
    assert report.errors == [] and len(report.training_set.validation) == 2 and len(report.training_set.examples) == 6
    assert any(
        line.startswith("dataset: 2 image(s) held out for validation, never trained (6 train)") for line in report.infos
    )

    two = tmp_path / "two"
    two.mkdir()
    for photo in sorted((PROJECT_ROOT / "data" / "sample").glob("*.jpg"))[:2]:
        shutil.copy(photo, two / photo.name)
    run = compose_run(
        "dataset.validation_split=0.5", f"dataset.path={two}", f"paths.cache={tmp_path}", "dataset.gate.enforce=false"
    )
    errors = check_run(run, get_engine("native"), dry_run=True).errors
    assert (
        "dataset.validation_split=0.5: holds out 1 image(s) and leaves 1 to train (at least 2 needed); lower "
        "dataset.validation_split or add images to dataset.path" in errors
    )
