"""Launch-time rules and info lines about the training recipe (flux_lora/rules.py) that follow from the flow
math the native engine implements: sigma_scaled refused, alpha 0 read as kohya does, save_precision typed,
and noise offset / min-SNR described in numbers that agree with what the job draws."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from hydra.errors import ConfigCompositionException

from flux_lora.compose import PROJECT_ROOT
from flux_lora.engines.native import flow
from flux_lora.rules import apply_rules, lora_scale_line, recipe_effect_lines
from tests.conftest import compose_config


def test_sigma_scaled_is_refused_for_flux(compose_run):
    errors = apply_rules(compose_run("profile.model_prediction_type=sigma_scaled")).errors
    assert errors == [
        "profile.model_prediction_type=sigma_scaled: compares an estimated clean latent with FLUX's velocity target "
        "(a math error in sd-scripts); set profile.model_prediction_type=raw"
    ]
    assert apply_rules(compose_run("profile.model_prediction_type=additive")).errors == []


def test_alpha_zero_means_alpha_equals_rank(compose_run):
    run = compose_run("profile=fast", "gpu=h100", "profile.network_alpha=0")
    findings = apply_rules(run)  # divided by alpha before: ZeroDivisionError
    assert findings.errors == [] and findings.warnings == []
    rank = run.profile.network_dim
    assert (
        lora_scale_line(run)
        == f"LoRA update scale alpha/rank = {rank}/{rank} = 1 (network_alpha=0 means alpha = rank, as in kohya)"
    )


@pytest.mark.parametrize("name", ["float", "fp16", "bf16"])
def test_save_precision_takes_sd_scripts_names(compose_run, name):
    assert compose_run(f"profile.save_precision={name}").profile.save_precision.value == name


@pytest.mark.parametrize("typo", ["fp32", "bf61", "BF16"])
def test_a_save_precision_typo_fails_at_compose_time(typo):
    with pytest.raises(ConfigCompositionException):
        compose_config([f"profile.save_precision={typo}"])


def test_noise_offset_line_compares_training_with_sampling_noise(compose_run):
    lines = recipe_effect_lines(compose_run("profile=final", "gpu=h100", "profile.min_snr_gamma=null"))
    # 768 px: 96x96 latent values per channel, so the sampler's per-channel mean has std 1/96.
    assert lines == [
        "profile.noise_offset=0.1: per-channel mean std about 0.10 in training vs about 0.01 in sampling noise "
        "at 768 px (10x the sampler's: teaches a train/sample mismatch)"
    ]


def _numbers(line: str) -> dict[str, float]:
    found = re.search(r"mean loss weight ([0-9.]+) .* sigma <= ([0-9.]+) \(unweighted median sigma ([0-9.]+)\)", line)
    assert found, line
    return dict(zip(("mean", "weighted_median", "median"), map(float, found.groups())))


@pytest.mark.parametrize("variant", ["flow_min_snr", "clamp"])
def test_min_snr_line_matches_what_the_job_draws(compose_run, variant):
    run = compose_run("profile=final", "gpu=h100", "profile.noise_offset=0", f"profile.min_snr_variant={variant}")
    (line,) = recipe_effect_lines(run)
    assert line.startswith(f"profile.min_snr_gamma=5 ({variant}: w = ")
    said = _numbers(line)
    # The same statistics from the job's own sampler and weight (torch), on other random draws.
    sigmas = flow.sample_sigmas("flux_shift", 20_000, 96, 96, generator=torch.Generator().manual_seed(1)).double()
    weights = flow.min_snr_weight(sigmas, 5.0, variant)
    order = torch.argsort(sigmas)
    cumulative = torch.cumsum(weights[order], 0)
    weighted_median = sigmas[order][torch.searchsorted(cumulative, cumulative[-1] / 2)].item()
    assert said["mean"] == pytest.approx(weights.mean().item(), abs=0.015)
    assert said["weighted_median"] == pytest.approx(weighted_median, abs=0.015)
    assert said["median"] == pytest.approx(sigmas.median().item(), abs=0.015)
    if variant == "flow_min_snr":  # it moves the loss towards low noise; clamp barely does at gamma 5
        assert said["weighted_median"] < said["median"] - 0.1


def test_recipe_lines_leave_out_what_the_engine_does_not_apply(compose_run):
    run = compose_run("profile=final", "gpu=h100")
    assert len(recipe_effect_lines(run)) == 2
    assert recipe_effect_lines(run, skip={"profile.noise_offset": "ignored", "profile.min_snr_gamma": "ignored"}) == []
    assert recipe_effect_lines(compose_run()) == []  # neither is set


def test_a_min_snr_variant_without_gamma_and_a_negative_state_count_are_flagged(compose_run):
    assert apply_rules(compose_run("profile.min_snr_variant=clamp")).warnings == [
        "profile.min_snr_variant=clamp: has no effect without profile.min_snr_gamma; set profile.min_snr_gamma (e.g. 5)"
    ]
    errors = apply_rules(compose_run("launch.keep_last_states=-1")).errors
    assert errors == ["launch.keep_last_states=-1: must be 0 (keep every step state) or more"]


def test_the_rules_import_no_torch():
    code = "import sys, flux_lora.rules; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT).returncode == 0


def test_check_reports_the_lines_only_for_an_engine_that_applies_them(compose_run):
    from flux_lora.check import check_run
    from flux_lora.engines import get_engine

    native = check_run(
        compose_run("profile.noise_offset=0.1", "profile.min_snr_gamma=5"), get_engine("native"), dry_run=True
    )
    assert sum(line.startswith(("profile.noise_offset=", "profile.min_snr_gamma=")) for line in native.infos) == 2
    run = compose_run("engine=sd_scripts", "model=flux_dev", "profile.noise_offset=0.1", "profile.min_snr_gamma=5")
    ignored = check_run(run, get_engine("sd_scripts"), dry_run=True)
    assert not any(line.startswith(("profile.noise_offset=", "profile.min_snr_gamma=")) for line in ignored.infos)
