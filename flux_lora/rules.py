"""Semantic checks of a composed run, listed in one place, each with the reason it exists.

A rule looks at the typed `RunConfig` and returns a one-line message (naming the key and the
fix) or None. Errors stop the launch; warnings are printed and recorded in the snapshot.
Engine-specific checks (options an engine ignores, missing checkouts or weights) live with the
engine; this module only knows what FLUX, accelerate and the hardware tiers demand.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from flux_lora.schema import (
    BUCKET_STEP_MULTIPLE,
    Accelerator,
    EngineName,
    HuberSchedule,
    LossType,
    MinSnrVariant,
    MixedPrecision,
    ModelKind,
    ModelPredictionType,
    RunConfig,
)


class Severity(str, Enum):
    error = "error"
    warning = "warning"


@dataclass(frozen=True)
class Rule:
    name: str
    severity: Severity
    reason: str
    check: Callable[[RunConfig], str | None]


MAX_BLOCKS_TO_SWAP = 35  # sd-scripts: 19 double + 38 single blocks, swap granularity leaves 35


def _resolution_multiple_of_16(run: RunConfig) -> str | None:
    r = run.profile.resolution
    if r % 16:
        return f"profile.resolution={r}: must be a multiple of 16; set profile.resolution={r // 16 * 16 or 16}"
    return None


def _bucket_steps_fit_engine(run: RunConfig) -> str | None:
    s, multiple = run.dataset.bucket_reso_steps, BUCKET_STEP_MULTIPLE[run.engine.name]
    if s % multiple:
        fix = s // multiple * multiple or multiple
        return (
            f"dataset.bucket_reso_steps={s}: engine={run.engine.name.value} needs a multiple of {multiple}; "
            f"set dataset.bucket_reso_steps={fix}"
        )
    return None


def _resolution_within_buckets(run: RunConfig) -> str | None:
    d, r = run.dataset, run.profile.resolution
    if d.enable_bucket and not d.min_bucket_reso <= r <= d.max_bucket_reso:
        return (
            f"profile.resolution={r}: outside dataset.min_bucket_reso={d.min_bucket_reso}.."
            f"dataset.max_bucket_reso={d.max_bucket_reso}; widen the bucket range or change the resolution"
        )
    return None


def _tier_holds_resolution(run: RunConfig) -> str | None:
    g, r = run.gpu, run.profile.resolution
    if r > g.max_resolution:
        return (
            f"profile.resolution={r}: gpu={g.name} holds at most {g.max_resolution} px; "
            f"choose a smaller profile or a larger gpu tier"
        )
    return None


def _blocks_to_swap_max(run: RunConfig) -> str | None:
    n = run.gpu.blocks_to_swap
    if not 0 <= n <= MAX_BLOCKS_TO_SWAP:
        return f"gpu.blocks_to_swap={n}: must be between 0 and {MAX_BLOCKS_TO_SWAP}"
    return None


def _blocks_to_swap_vs_cpu_offload(run: RunConfig) -> str | None:
    if run.gpu.blocks_to_swap > 0 and run.gpu.cpu_offload_checkpointing:
        return "gpu.cpu_offload_checkpointing=true: excluded by gpu.blocks_to_swap>0; set one of them off"
    return None


def _blocks_to_swap_single_gpu(run: RunConfig) -> str | None:
    if run.gpu.blocks_to_swap > 0 and run.gpu.num_gpus > 1:
        return (
            f"gpu.blocks_to_swap={run.gpu.blocks_to_swap}: not supported with gpu.num_gpus={run.gpu.num_gpus}; "
            "set gpu.blocks_to_swap=0 or gpu.num_gpus=1"
        )
    return None


def _cpu_tier_single_process(run: RunConfig) -> str | None:
    if run.gpu.accelerator == Accelerator.cpu and run.gpu.num_gpus > 2:
        return (
            f"gpu.num_gpus={run.gpu.num_gpus}: the cpu tier runs one or two processes (gloo); set gpu.num_gpus=1 or 2"
        )
    return None


def _fp8_needs_mixed_precision(run: RunConfig) -> str | None:
    if run.gpu.fp8_base and run.profile.mixed_precision == MixedPrecision.no:
        return "gpu.fp8_base=true: needs profile.mixed_precision=bf16 (or fp16)"
    return None


def _cached_text_excludes_caption_augmentation(run: RunConfig) -> str | None:
    p = run.profile
    if p.cache_text_encoder_outputs_to_disk and (p.shuffle_caption or p.caption_dropout_rate > 0):
        return (
            "profile.shuffle_caption/caption_dropout_rate: impossible with cached text-encoder outputs; "
            "set profile.cache_text_encoder_outputs_to_disk=false or turn the augmentation off"
        )
    return None


def _huber_needs_non_snr_schedule(run: RunConfig) -> str | None:
    p = run.profile
    if p.loss_type in (LossType.huber, LossType.smooth_l1) and p.huber_schedule == HuberSchedule.snr:
        return f"profile.huber_schedule=snr: not implemented for FLUX with loss_type={p.loss_type.value}; set profile.huber_schedule=constant"
    return None


def _sd_scripts_needs_flux_dev(run: RunConfig) -> str | None:
    if run.engine.name == EngineName.sd_scripts and run.model.kind != ModelKind.flux_dev:
        return f"engine=sd_scripts: trains FLUX.1-dev weight files, not model={run.model.name}; choose model=flux_dev or engine=native"
    return None


def _dropout_is_a_probability(run: RunConfig) -> str | None:
    p = run.profile.network_dropout
    if p is not None and not 0.0 <= p < 1.0:
        return f"profile.network_dropout={p}: must be in [0, 1)"
    return None


def _sigma_scaled_is_wrong_for_flux(run: RunConfig) -> str | None:
    if run.profile.model_prediction_type == ModelPredictionType.sigma_scaled:
        return (
            "profile.model_prediction_type=sigma_scaled: compares an estimated clean latent with FLUX's velocity "
            "target (a math error in sd-scripts); set profile.model_prediction_type=raw"
        )
    return None


def _min_snr_variant_needs_gamma(run: RunConfig) -> str | None:
    p = run.profile
    if p.min_snr_variant != MinSnrVariant.flow_min_snr and not p.min_snr_gamma:
        return f"profile.min_snr_variant={p.min_snr_variant.value}: has no effect without profile.min_snr_gamma; set profile.min_snr_gamma (e.g. 5)"
    return None


def _keep_last_states_not_negative(run: RunConfig) -> str | None:
    n = run.launch.keep_last_states
    if n < 0:
        return f"launch.keep_last_states={n}: must be 0 (keep every step state) or more"
    return None


def _warmup_shorter_than_training(run: RunConfig) -> str | None:
    p = run.profile
    if p.lr_warmup_steps >= p.max_train_steps:
        return f"profile.lr_warmup_steps={p.lr_warmup_steps}: must be below profile.max_train_steps={p.max_train_steps}"
    return None


# The ranges the engines require, one line per key. Checked before every other rule (and before anything else the
# check computes): a zero resolution or rank would otherwise end in a division by zero without the key, and a
# negative learning rate loads the model and dies in the trainer's first step.
POSITIVE = ("must be positive", lambda v: v > 0)
NOT_NEGATIVE = ("must be 0 or more", lambda v: v >= 0)
A_SHARE = ("must be in [0, 1)", lambda v: 0 <= v < 1)
RANGES: tuple[tuple[str, tuple[str, Callable[[float], bool]]], ...] = (
    ("profile.resolution", POSITIVE),
    ("profile.max_train_steps", POSITIVE),
    ("profile.network_dim", POSITIVE),
    ("profile.network_alpha", NOT_NEGATIVE),
    ("profile.learning_rate", POSITIVE),
    ("profile.lr_warmup_steps", NOT_NEGATIVE),
    ("profile.lr_scheduler_num_cycles", POSITIVE),
    ("profile.noise_offset", NOT_NEGATIVE),
    ("profile.min_snr_gamma", POSITIVE),
    ("profile.max_grad_norm", NOT_NEGATIVE),
    ("profile.guidance_scale", NOT_NEGATIVE),
    ("profile.sigmoid_scale", POSITIVE),
    ("profile.discrete_flow_shift", POSITIVE),
    ("profile.caption_dropout_rate", A_SHARE),
    ("profile.save_every_n_steps", POSITIVE),
    ("profile.sample_every_n_steps", POSITIVE),
    ("profile.sample_steps", POSITIVE),
    ("profile.max_data_loader_n_workers", NOT_NEGATIVE),
    ("gpu.num_gpus", POSITIVE),
    ("gpu.batch_size", POSITIVE),
    ("gpu.gradient_accumulation_steps", POSITIVE),
    ("gpu.blocks_to_swap", NOT_NEGATIVE),
    ("optimizer.weight_decay", NOT_NEGATIVE),
    ("optimizer.eps", POSITIVE),
    ("dataset.num_repeats", POSITIVE),
    ("dataset.min_bucket_reso", POSITIVE),
    ("dataset.max_bucket_reso", POSITIVE),
    ("dataset.bucket_reso_steps", POSITIVE),
    ("dataset.reg_repeats", POSITIVE),
    ("dataset.prior_loss_weight", NOT_NEGATIVE),
    ("ablation.baseline_steps", POSITIVE),
    ("ablation.warmup_share", A_SHARE),
)


def range_problems(run: RunConfig) -> list[str]:
    """Every key outside the range the engines require, each as `key=value: must be ...; set key=...`."""
    problems = []
    for key, (wording, ok) in RANGES:
        section, name = key.split(".")
        value = getattr(getattr(run, section), name)
        if value is not None and not ok(value):
            problems.append(
                f"{key}={value:g}: {wording}; set {key} to such a value, or drop the override for its config group's"
            )
    betas = run.optimizer.betas
    if betas is not None and not all(0 <= b < 1 for b in betas):
        problems.append(f"optimizer.betas={list(betas)}: each must be in [0, 1); set optimizer.betas=[0.9,0.999]")
    return problems


def effective_alpha(run: RunConfig) -> float:
    """kohya reads network_alpha 0 as alpha = rank (scale 1); so do the rules and the native engine."""
    return run.profile.network_alpha or float(run.profile.network_dim)


def _alpha_shrinks_updates(run: RunConfig) -> str | None:
    p = run.profile
    scale = effective_alpha(run) / p.network_dim
    if scale <= 1 / 8:
        return (
            f"profile.network_alpha={p.network_alpha:g} with network_dim={p.network_dim}: LoRA updates are scaled "
            f"DOWN {1 / scale:.0f}x (alpha/rank={scale:.4g}); set profile.network_alpha={p.network_dim} for scale 1"
        )
    return None


def _cpu_offload_needs_checkpointing(run: RunConfig) -> str | None:
    if run.gpu.cpu_offload_checkpointing and not run.profile.gradient_checkpointing:
        return "gpu.cpu_offload_checkpointing=true: has no effect without profile.gradient_checkpointing=true"
    return None


MAX_VALIDATION_SPLIT = 0.5  # holding out more than half leaves a LoRA trained on the minority of the photos
MIN_TRAINING_IMAGES_AFTER_HOLD_OUT = 2


def _validation_split_in_range(run: RunConfig) -> str | None:
    s = run.dataset.validation_split
    if s is not None and not 0.0 <= s <= MAX_VALIDATION_SPLIT:
        return (
            f"dataset.validation_split={s:g}: must be in [0, {MAX_VALIDATION_SPLIT:g}] (the share of images held out "
            "from training); set e.g. dataset.validation_split=0.2, or 0 to validate on the training images"
        )
    return None


def _one_validation_source(run: RunConfig) -> str | None:
    d = run.dataset
    if d.validation_split and d.validation_path:
        return (
            f"dataset.validation_split={d.validation_split:g} and dataset.validation_path={d.validation_path}: choose one; "
            "set dataset.validation_split=0 to validate on the folder"
        )
    return None


def _reg_keys_need_reg_path(run: RunConfig) -> str | None:
    d = run.dataset
    changed = [
        f"dataset.{k}={getattr(d, k):g}"
        for k, default in (("reg_repeats", 1), ("prior_loss_weight", 1.0))
        if getattr(d, k) != default
    ]
    if changed and not d.reg_path:
        return f"{', '.join(changed)}: no effect without class images; set dataset.reg_path=<folder of class images> or drop it"
    return None


def _reg_path_apart_from_dataset(run: RunConfig) -> str | None:
    d = run.dataset
    if not d.reg_path:
        return None
    reg, subject = Path(d.reg_path).resolve(), Path(d.path).resolve()
    if reg == subject or subject in reg.parents or reg in subject.parents:
        return (
            f"dataset.reg_path={d.reg_path}: overlaps dataset.path={d.path} (the subject's photos would train as "
            "class images, or the class images as the subject); put the class images in a folder of their own"
        )
    return None


def _prior_weight_trains_nothing(run: RunConfig) -> str | None:
    d = run.dataset
    if d.reg_path and d.prior_loss_weight == 0:
        return (
            f"dataset.prior_loss_weight=0 with dataset.reg_path={d.reg_path}: the class images take training steps and "
            "teach nothing; set dataset.prior_loss_weight=1 or drop dataset.reg_path"
        )
    return None


def held_out_leaves_too_few(run: RunConfig, training_images: int, held_out_images: int) -> str | None:
    """The one rule that needs the dataset (check.py calls it with the training set's counts): a held-out set must
    leave at least two images to train, or the LoRA learns one photo and the validation loss measures nothing."""
    if not held_out_images or training_images >= MIN_TRAINING_IMAGES_AFTER_HOLD_OUT:
        return None
    d = run.dataset
    if d.validation_path:
        source = f"dataset.validation_path={d.validation_path}"
    else:
        source = "dataset.validation_split=" + (
            "null (the automatic share)" if d.validation_split is None else f"{d.validation_split:g}"
        )
    return (
        f"{source}: holds out {held_out_images} image(s) and leaves {training_images} to train (at least "
        f"{MIN_TRAINING_IMAGES_AFTER_HOLD_OUT} needed); lower dataset.validation_split or add images to dataset.path"
    )


# A file stem and nothing more: no separator, no "..", no leading dot (hidden files), no spaces or shell characters.
PLAIN_STEM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def plain_stem_problem(key: str, value: str) -> str | None:
    """Names that become file or folder names must stay inside the folder they are put in."""
    # A trailing dot is dropped by Windows file systems and reads as an extension cut short.
    if PLAIN_STEM.fullmatch(value) and not value.endswith("."):
        return None
    return (
        f"{key}={value!r}: must be a plain file name stem (letters, digits, '.', '_', '-'; no path separators "
        f"or '..', at most 128 characters); set {key}=flux-lora or a similar name"
    )


def _output_name_is_plain_stem(run: RunConfig) -> str | None:
    return plain_stem_problem("launch.output_name", run.launch.output_name)


def _run_name_is_plain_stem(run: RunConfig) -> str | None:
    return plain_stem_problem("name", run.name)


RULES: tuple[Rule, ...] = (
    Rule(
        "resolution_multiple_of_16",
        Severity.error,
        "FLUX packs 2x2 patches of 8x-downsampled latents: other sizes crash at step 1",
        _resolution_multiple_of_16,
    ),
    Rule(
        "bucket_steps_fit_engine",
        Severity.error,
        "sd-scripts asserts a multiple of 64 for FLUX before loading weights",
        _bucket_steps_fit_engine,
    ),
    Rule(
        "resolution_within_buckets",
        Severity.error,
        "sd-scripts asserts min_bucket_reso <= resolution <= max_bucket_reso",
        _resolution_within_buckets,
    ),
    Rule(
        "tier_holds_resolution",
        Severity.error,
        "a tier's memory bounds the resolution it can train",
        _tier_holds_resolution,
    ),
    Rule("blocks_to_swap_max", Severity.error, "FLUX has 35 swappable blocks; more crashes", _blocks_to_swap_max),
    Rule(
        "blocks_to_swap_vs_cpu_offload",
        Severity.error,
        "sd-scripts asserts they exclude each other",
        _blocks_to_swap_vs_cpu_offload,
    ),
    Rule(
        "blocks_to_swap_single_gpu",
        Severity.error,
        "block swapping is not supported with several GPUs (sd-scripts #1480)",
        _blocks_to_swap_single_gpu,
    ),
    Rule(
        "cpu_tier_single_process",
        Severity.error,
        "without GPUs accelerate runs one process here",
        _cpu_tier_single_process,
    ),
    Rule(
        "fp8_needs_mixed_precision",
        Severity.error,
        "fp8 base weights compute in bf16/fp16; mixed_precision=no fails",
        _fp8_needs_mixed_precision,
    ),
    Rule(
        "cached_text_excludes_caption_augmentation",
        Severity.error,
        "cached text embeddings cannot change per step",
        _cached_text_excludes_caption_augmentation,
    ),
    Rule(
        "huber_needs_non_snr_schedule",
        Severity.error,
        "huber_schedule=snr raises NotImplementedError on FLUX",
        _huber_needs_non_snr_schedule,
    ),
    Rule(
        "sd_scripts_needs_flux_dev",
        Severity.error,
        "sd-scripts loads real FLUX weight files only",
        _sd_scripts_needs_flux_dev,
    ),
    Rule(
        "dropout_is_a_probability", Severity.error, "dropout outside [0, 1) is meaningless", _dropout_is_a_probability
    ),
    Rule(
        "sigma_scaled_is_wrong_for_flux",
        Severity.error,
        "sd-scripts' sigma_scaled loss compares x0 with a velocity for FLUX",
        _sigma_scaled_is_wrong_for_flux,
    ),
    Rule(
        "min_snr_variant_needs_gamma",
        Severity.warning,
        "a min-SNR variant without a gamma weights nothing",
        _min_snr_variant_needs_gamma,
    ),
    Rule(
        "keep_last_states_not_negative",
        Severity.error,
        "a negative count of states to keep means nothing",
        _keep_last_states_not_negative,
    ),
    Rule(
        "warmup_shorter_than_training",
        Severity.error,
        "a run that never leaves warmup never reaches its learning rate",
        _warmup_shorter_than_training,
    ),
    Rule(
        "alpha_shrinks_updates",
        Severity.warning,
        "alpha=1 at rank 32 silently shrank every update 32x in the old scripts",
        _alpha_shrinks_updates,
    ),
    Rule(
        "cpu_offload_needs_checkpointing",
        Severity.warning,
        "sd-scripts reads it only inside the checkpointing branch",
        _cpu_offload_needs_checkpointing,
    ),
    Rule(
        "output_name_is_plain_stem",
        Severity.error,
        "the LoRA files are <run dir>/output/<output_name>*: a path there writes outside the run",
        _output_name_is_plain_stem,
    ),
    Rule(
        "validation_split_in_range",
        Severity.error,
        "a share outside [0, 0.5] holds out nothing sensible or most of the photos",
        _validation_split_in_range,
    ),
    Rule(
        "one_validation_source",
        Severity.error,
        "a held-out share and a held-out folder at once would mix two validation sets",
        _one_validation_source,
    ),
    Rule(
        "reg_keys_need_reg_path",
        Severity.warning,
        "a recorded class-image setting without class images is a setting never applied",
        _reg_keys_need_reg_path,
    ),
    Rule(
        "reg_path_apart_from_dataset",
        Severity.error,
        "the same photos as subject and as class prior teach both nothing",
        _reg_path_apart_from_dataset,
    ),
    Rule(
        "prior_weight_trains_nothing",
        Severity.warning,
        "kohya multiplies a class image's loss by it: 0 spends the steps for nothing",
        _prior_weight_trains_nothing,
    ),
    Rule(
        "run_name_is_plain_stem",
        Severity.error,
        "the run directory is named after it: a path there lands outside paths.outputs",
        _run_name_is_plain_stem,
    ),
)


@dataclass(frozen=True)
class RuleFindings:
    errors: list[str]
    warnings: list[str]


def apply_rules(run: RunConfig, rules: tuple[Rule, ...] = RULES) -> RuleFindings:
    """Values out of range first, and alone: the other rules compute with them."""
    out_of_range = range_problems(run)
    if out_of_range:
        return RuleFindings(errors=out_of_range, warnings=[])
    errors: list[str] = []
    warnings: list[str] = []
    for rule in rules:
        message = rule.check(run)
        if message is not None:
            (errors if rule.severity == Severity.error else warnings).append(message)
    return RuleFindings(errors=errors, warnings=warnings)


def lora_scale_line(run: RunConfig) -> str:
    p = run.profile
    alpha = effective_alpha(run)
    line = f"LoRA update scale alpha/rank = {alpha:g}/{p.network_dim} = {alpha / p.network_dim:.4g}"
    return line + (" (network_alpha=0 means alpha = rank, as in kohya)" if not p.network_alpha else "")


SIGMA_DRAWS = 20_000  # two stable decimals for a mean or a median; about a millisecond in numpy


def noise_offset_line(run: RunConfig) -> str | None:
    """How far the offset moves each latent channel's mean, against the spread that sampling noise has."""
    p = run.profile
    if not p.noise_offset:
        return None
    values_per_channel = (p.resolution // 8) ** 2  # FLUX's VAE: 16 channels at 1/8 of the image size
    sampling = 1.0 / math.sqrt(values_per_channel)
    training = math.sqrt(p.noise_offset**2 + 1.0 / values_per_channel)
    ratio = training / sampling
    effect = f"{ratio:.0f}x the sampler's: teaches a train/sample mismatch" if ratio >= 2 else "close to the sampler's"
    return (
        f"profile.noise_offset={p.noise_offset:g}: per-channel mean std about {training:.2f} in training vs about "
        f"{sampling:.2f} in sampling noise at {p.resolution} px ({effect})"
    )


MIN_SNR_FORMULAS = {
    MinSnrVariant.flow_min_snr: "min((1-sigma)^2, gamma*sigma^2)",
    MinSnrVariant.clamp: "min(1, gamma*sigma^2)",
}


def min_snr_line(run: RunConfig) -> str | None:
    """Mean min-SNR weight and where the weighted loss sits, under the run's own timestep sampling."""
    p = run.profile
    if not p.min_snr_gamma:
        return None
    # numpy only when there is something to sample: a launch without min-SNR does not pay for the import.
    import numpy as np

    from flux_lora.noise_levels import min_snr_weight_np, sample_sigmas_np, weighted_median

    latent = p.resolution // 8
    sigmas = sample_sigmas_np(
        p.timestep_sampling.value,
        SIGMA_DRAWS,
        latent,
        latent,
        sigmoid_scale=p.sigmoid_scale,
        discrete_flow_shift=p.discrete_flow_shift,
        rng=np.random.default_rng(0),
    )
    weights = min_snr_weight_np(sigmas, p.min_snr_gamma, p.min_snr_variant.value)
    return (
        f"profile.min_snr_gamma={p.min_snr_gamma:g} ({p.min_snr_variant.value}: w = {MIN_SNR_FORMULAS[p.min_snr_variant]}): "
        f"mean loss weight {weights.mean():.2f} under timestep_sampling={p.timestep_sampling.value} at {p.resolution} px; "
        f"half the weighted loss comes from sigma <= {weighted_median(sigmas, weights):.2f} "
        f"(unweighted median sigma {float(np.median(sigmas)):.2f})"
    )


def recipe_effect_lines(run: RunConfig, skip: Collection[str] = ()) -> list[str]:
    """Info lines saying what noise offset and min-SNR do to this run; keys in `skip` (not applied) are left out."""
    lines = []
    if "profile.noise_offset" not in skip:
        lines.append(noise_offset_line(run))
    if "profile.min_snr_gamma" not in skip:
        lines.append(min_snr_line(run))
    return [line for line in lines if line]


def memory_advice(run: RunConfig) -> str:
    """The settings of this run that would use less GPU memory, for an out-of-memory report."""
    g, p = run.gpu, run.profile
    advice = []
    if g.batch_size > 1:
        advice.append(
            f"gpu.batch_size={g.batch_size // 2} (raise gpu.gradient_accumulation_steps to keep the effective batch)"
        )
    if not p.gradient_checkpointing:
        advice.append("profile.gradient_checkpointing=true")
    if not g.fp8_base:
        advice.append("gpu.fp8_base=true")
    if g.blocks_to_swap < MAX_BLOCKS_TO_SWAP and g.num_gpus == 1:
        advice.append(f"gpu.blocks_to_swap={min(MAX_BLOCKS_TO_SWAP, g.blocks_to_swap + 10)}")
    if p.resolution > 512:
        advice.append(f"profile.resolution={p.resolution - 256}")
    advice.append("or a smaller gpu tier preset (gpu=rtx4090 is the leanest)")
    return ", ".join(advice)
