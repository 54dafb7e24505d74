"""What a native run records as it trains: the loss log, the LoRA metadata (kohya's ss_* keys), progress lines,
the result and train_summary.json."""

from __future__ import annotations

import json
import math
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch

from flux_lora.checkpoint_files import atomic_write_text
from flux_lora.engines.native.config import NativeTrainConfig
from flux_lora.engines.native.data import (
    TrainItem,
    class_images_with_repeats,
)
from flux_lora.engines.native.stopping import EXIT_NONFINITE, writing
from flux_lora.redaction import redact

SUMMARY_FILE = "train_summary.json"


@dataclass
class TrainResult:
    losses: list[float]  # one per optimizer step run in this call (mean over its micro-batches)
    first_step: int  # global step of losses[0]
    steps: int  # global step at the end
    final_loss: float
    average_loss: float
    seconds: float
    step_seconds: list[float]
    peak_memory_gb: float
    lora_path: str | None  # None when the run stopped without a LoRA to show (non-finite loss, stop before a step)
    output_dir: str
    sample_paths: list[str] = field(default_factory=list)
    cache: dict = field(default_factory=dict)
    stop_reason: str | None = None  # None: reached max_train_steps; "signal"; "nonfinite_loss"
    stop_signal: int | None = None
    nonfinite_step: int | None = None
    last_state: str | None = None  # the newest good state folder: saved by this run, else the one it resumed from
    # The longest save and sample image: with the longest step, the lead a stop needs (SLURM's signal_delay_s).
    save_seconds: list[float] = field(default_factory=list)
    sample_image_seconds: list[float] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.stop_reason == "signal":
            return 128 + (self.stop_signal or signal.SIGTERM)  # the shell's convention: 143 SIGTERM, 130 SIGINT
        return EXIT_NONFINITE if self.stop_reason == "nonfinite_loss" else 0


class LossRecorder:
    """sd-scripts' loss/average: mean of the latest loss at each micro-batch position of an epoch
    (the positions this process trains on, which are all of them with one process)."""

    def __init__(self) -> None:
        self.latest: dict[int, float] = {}
        self.total = 0.0

    def add(self, position: int, loss: float) -> None:
        self.total += loss - self.latest.get(position, 0.0)
        self.latest[position] = loss

    @property
    def average(self) -> float:
        return self.total / len(self.latest) if self.latest else 0.0


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


MIN_SNR_WEIGHTS = {"flow_min_snr": "min((1-sigma)^2, gamma*sigma^2)", "clamp": "min(1, gamma*sigma^2)"}


def lora_metadata(
    config: NativeTrainConfig,
    *,
    items: list[TrainItem],
    batches_per_epoch: int,
    started_at: float,
    fp8_linears: int,
    block_swap_applied: bool,
    num_processes: int,
) -> dict[str, str]:
    """ss_* and modelspec.* keys, each only when it describes something this run applied."""
    buckets = sorted({item.bucket for item in items})
    epochs = math.ceil(
        config.max_train_steps * config.gradient_accumulation_steps * num_processes / max(1, batches_per_epoch)
    )
    meta: dict[str, object] = {
        "ss_training_engine": "flux-lora native (diffusers FluxTransformer2DModel + peft, kohya lora_flux key format)",
        "ss_network_module": "networks.lora_flux",
        "ss_network_train_unet_only": True,
        "ss_base_model_version": "flux1" if config.model_kind == "flux_dev" else "flux1-tiny-random",
        "ss_output_name": config.output_name,
        "ss_training_started_at": started_at,
        "ss_network_dim": config.network_dim,
        "ss_network_alpha": config.network_alpha,
        "ss_learning_rate": config.learning_rate,
        "ss_unet_lr": config.learning_rate,
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": config.lr_warmup_steps,
        "ss_max_train_steps": config.max_train_steps,
        "ss_optimizer": config.optimizer
        + (f"({json.dumps(config.optimizer_args, sort_keys=True)})" if config.optimizer_args else ""),
        "ss_max_grad_norm": config.max_grad_norm,
        "ss_seed": config.seed,
        "ss_mixed_precision": config.mixed_precision,
        "ss_gradient_checkpointing": config.gradient_checkpointing,
        "ss_gradient_accumulation_steps": config.gradient_accumulation_steps,
        "ss_batch_size_per_device": config.batch_size,
        "ss_total_batch_size": config.batch_size * config.gradient_accumulation_steps * num_processes,
        "ss_num_train_images": sum(i.repeats or config.num_repeats for i in items if not i.is_class),
        "ss_num_reg_images": class_images_with_repeats(config),
        "ss_prior_loss_weight": config.prior_loss_weight,
        "ss_num_batches_per_epoch": batches_per_epoch,
        "ss_num_epochs": epochs,
        "ss_resolution": f"({config.resolution}, {config.resolution})",
        "ss_enable_bucket": config.enable_bucket,
        "ss_min_bucket_reso": config.min_bucket_reso,
        "ss_max_bucket_reso": config.max_bucket_reso,
        "ss_bucket_info": json.dumps({"buckets": [f"{w}x{h}" for w, h in buckets]}),
        "ss_cache_latents": True,
        "ss_fp8_base": fp8_linears > 0,
        "ss_guidance_scale": config.guidance_scale,
        "ss_timestep_sampling": config.timestep_sampling,
        "ss_sigmoid_scale": config.sigmoid_scale,
        "ss_discrete_flow_shift": config.discrete_flow_shift,
        "ss_model_prediction_type": config.model_prediction_type,
        "ss_loss_type": config.loss_type,
        "ss_t5xxl_max_token_length": config.t5_max_length,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "flux-1-dev/lora" if config.model_kind == "flux_dev" else "flux-1/lora",
        "modelspec.implementation": "https://github.com/black-forest-labs/flux",
        "modelspec.title": config.output_name,
        "modelspec.resolution": f"{config.resolution}x{config.resolution}",
        "modelspec.date": datetime.fromtimestamp(started_at, UTC).strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if config.network_dropout:
        meta["ss_network_dropout"] = config.network_dropout
    if config.noise_offset:
        meta["ss_noise_offset"] = config.noise_offset
        meta["ss_noise_offset_kind"] = "flow: eps + offset * N(0,1)[B,C,1,1] in noisy input and target"
    if config.min_snr_gamma:
        meta["ss_min_snr_gamma"] = config.min_snr_gamma
        meta["ss_min_snr_variant"] = config.min_snr_variant
        meta["ss_min_snr_kind"] = "flow: loss * " + MIN_SNR_WEIGHTS[config.min_snr_variant]
    if config.loss_type in ("huber", "smooth_l1"):
        meta["ss_huber_schedule"] = config.huber_schedule
        meta["ss_huber_c"] = config.huber_c
    if block_swap_applied:
        meta["ss_blocks_to_swap"] = config.blocks_to_swap
    if config.trigger:
        meta["modelspec.trigger_phrase"] = config.trigger
    for key, value in config.record.items():
        meta[f"ss_flux_lora_{key}"] = value
    return {key: str(value) for key, value in meta.items()}


class Progress:
    """rich progress bar on a terminal; otherwise one plain line about every 5% of the steps. A run of a packed job
    prefixes its lines with its label (and has no bar: one terminal cannot hold several live bars)."""

    def __init__(self, total: int, start: int, enabled: bool, label: str) -> None:
        self.total, self.start, self.enabled, self.label = total, start, enabled, label
        self.began = time.perf_counter()
        self.every = max(1, total // 20)
        self.bar = None
        if enabled and sys.stdout.isatty() and not label:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(
                TextColumn("steps"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeRemainingColumn(),
            )
            self.task = self.bar.add_task("train", total=total, completed=start, status="")
            self.bar.start()

    def update(self, step: int, loss: float, average: float) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.began
        rate = (step - self.start) / elapsed if elapsed > 0 else 0.0
        if self.bar is not None:
            self.bar.update(self.task, completed=step, status=f"loss {loss:.4f} avg {average:.4f} {rate:.2f} it/s")
        elif step % self.every == 0 or step == self.total:
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            print(
                self.label + f"step {step}/{self.total} loss {loss:.4f} avg {average:.4f} {rate:.2f} it/s "
                f"ETA {int(eta // 60):d}:{int(eta % 60):02d}"
                if eta == eta
                else self.label + f"step {step}/{self.total}",
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None  # NaN/inf are not JSON


def train_summary(result: TrainResult, config: NativeTrainConfig) -> dict[str, object]:
    """train_summary.json: the run's numbers, and why and where it stopped."""
    summary: dict[str, object] = {
        "final_loss": _finite_or_none(result.final_loss),
        "average_loss": _finite_or_none(result.average_loss),
        "steps": result.steps,
        "seconds": result.seconds,
        "peak_memory_gb": result.peak_memory_gb,
        "max_train_steps": config.max_train_steps,
        "first_step": result.first_step,
        "stop_reason": result.stop_reason,
        # What a stop may have to wait for: the longest step, state save and sample image of this attempt.
        "stop_lead_s": {
            "step": round(max(result.step_seconds, default=0.0), 3),
            "save": round(max(result.save_seconds, default=0.0), 3),
            "sample_image": round(max(result.sample_image_seconds, default=0.0), 3),
        },
    }
    if result.stop_reason == "signal":
        summary["signal"] = signal.Signals(result.stop_signal).name
        summary["resume_state"] = result.last_state
    if result.stop_reason == "nonfinite_loss":
        summary["nonfinite_step"] = result.nonfinite_step
        summary["last_good_checkpoint"] = result.last_state
    return summary


def class_plan_line(items: list[TrainItem], config: NativeTrainConfig) -> str:
    """The class images' plan as it trains (kohya's places per epoch), beside the subject's."""
    classes = [item for item in items if item.is_class]
    return (
        f"class images: {len(classes)} of them, {sum(i.repeats for i in classes)} places per epoch beside "
        f"{sum(i.repeats or config.num_repeats for i in items if not i.is_class)} subject places, "
        f"loss weight {config.prior_loss_weight:g}"
    )


def write_train_summary(path: Path, result: TrainResult, config: NativeTrainConfig) -> None:
    with writing(path):
        atomic_write_text(path, redact(json.dumps(train_summary(result, config), indent=2)) + "\n")


def stopping_line(signum: int, step: int) -> str:
    return f"{signal.Signals(signum).name}: stopping at step {step}, saving a state to resume from"


def ending_line(result: TrainResult) -> str | None:
    """How a run that did not reach its last step ended, and where it goes on from."""
    if result.stop_reason == "signal":
        return f"stopped by {signal.Signals(result.stop_signal).name} at step {result.steps}; resume from {result.last_state}"
    if result.stop_reason == "nonfinite_loss":
        return (
            f"non-finite loss at step {result.nonfinite_step}: stopped, nothing saved from these weights; "
            f"last good state: {result.last_state}"
        )
    return None
