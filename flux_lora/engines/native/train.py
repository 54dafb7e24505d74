"""The native FLUX LoRA training job: `accelerate launch -m flux_lora.engines.native.train <run dir>`.

Reads only the frozen config file (and the dataset, model files and caches it names). Top to bottom:
load the model parts -> fill/read the latent and text caches -> free the text encoders -> LoRA (+ fp8
base, block swap) -> optimizer and scheduler under accelerate -> the loop (flow-matching loss from
flow.py, logging, samples, checkpoints, state) -> final LoRA and train_summary.json.

Every LoRA file and state folder is written under a temporary name and renamed when complete; each state
gets a manifest (checkpoint_files.py). The job stops early, with a train_summary.json saying why, on
SIGTERM/SIGINT and SLURM's SIGUSR2 warning before the time limit (after the current optimizer step, with a
state to resume from; exit 128 + signal number)
and on a non-finite loss (nothing saved from the broken weights; exit 3). Before every write into the run
folder it checks that the run's lease (named by the launcher in FLUX_LORA_LEASE_FILE / _TOKEN) still
carries its token: a run taken over by another launch stops at once, writing nothing more (exit 75).
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import resource
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from flux_lora.checkpoint_files import (
    WriteFailed,
    atomic_write_file,
    atomic_write_text,
    begin_dir,
    commit_dir,
    staging_path,
    state_problem,
)
from flux_lora.engines.native import flow
from flux_lora.engines.native.config import CONFIG_FILE, NativeTrainConfig
from flux_lora.engines.native.data import (
    TensorCache,
    TrainItem,
    build_train_items,
    cached_text_embeddings,
    class_images_with_repeats,
    collate,
    epoch_batches,
)
from flux_lora.lifecycle.job_guard import LEASE_LOST_EXIT_CODE
from flux_lora.lifecycle.lease import LEASE_FILE_ENV, LEASE_TOKEN_ENV, still_holds
from flux_lora.redaction import redact
from flux_lora.provenance import METADATA_KEY, RECORD_FILE, EmbedRecord, embedded_record_text, shareable_metadata

SAMPLE_GUIDANCE = 3.5  # sd-scripts' default embedded guidance for sample prompts (--g)
LORA_STATE_FILE = "lora_weights.safetensors"
TRAIN_STATE_FILE = "train_state.json"
SAVE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "float": torch.float32, "fp32": torch.float32}
SUMMARY_FILE = "train_summary.json"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)
# SLURM signals every process of a job at once and the launcher forwards the same stop: copies that arrive
# within this window are one stop. A second stop after it (a second Ctrl-C) ends the process at once.
SAME_STOP_S = 5.0
EXIT_NONFINITE = 3
EXIT_WRITE_FAILED = 4  # a file of the run could not be written (full disk, quota): the states saved before it stay


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
    lora_path: Optional[str]  # None when the run stopped without a LoRA to show (non-finite loss, stop before a step)
    output_dir: str
    sample_paths: list[str] = field(default_factory=list)
    cache: dict = field(default_factory=dict)
    stop_reason: Optional[str] = None  # None: reached max_train_steps; "signal"; "nonfinite_loss"
    stop_signal: Optional[int] = None
    nonfinite_step: Optional[int] = None
    last_state: Optional[str] = None  # the newest good state folder: saved by this run, else the one it resumed from
    # The longest save and sample image: with the longest step, the lead a stop needs (SLURM's signal_delay_s).
    save_seconds: list[float] = field(default_factory=list)
    sample_image_seconds: list[float] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.stop_reason == "signal":
            return 128 + (self.stop_signal or signal.SIGTERM)  # the shell's convention: 143 SIGTERM, 130 SIGINT
        return EXIT_NONFINITE if self.stop_reason == "nonfinite_loss" else 0


# ------------------------------------------------------------------------------------------ model setup


def load_parts(config: NativeTrainConfig):
    from flux_lora.engines.native import models

    if config.model_kind == "tiny":
        return models.build_tiny_flux(init_seed=config.init_seed, t5_max_length=config.t5_max_length)
    return models.load_flux_dev(
        transformer=config.transformer_path, vae=config.vae_path, clip_l=config.clip_l_path,
        t5xxl=config.t5xxl_path, diffusers_dir=config.diffusers_dir, tokenizer_dir=config.tokenizer_dir,
        t5_max_length=config.t5_max_length,
    )


class Fp8WeightLinear(nn.Linear):
    """A frozen Linear whose weight is stored in float8_e4m3fn and upcast to the compute dtype per call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.weight.to(dtype), bias)


def store_base_in_fp8(transformer: nn.Module) -> int:
    """Weight-only fp8 for every frozen Linear (the LoRA's own Linears stay trainable in fp32); returns the count."""
    count = 0
    for module in transformer.modules():
        if type(module) is nn.Linear and not module.weight.requires_grad:
            module.weight.data = module.weight.data.to(torch.float8_e4m3fn)
            module.__class__ = Fp8WeightLinear
            count += 1
    return count


def enable_block_swap(transformer: nn.Module, blocks_to_swap: int, device: torch.device) -> int:
    """sd-scripts' split (n//2 double blocks, 2*(n - n//2) single blocks, from the end) via diffusers group offloading.

    Only the frozen base layers are offloaded: group offloading restores a module's weights from the CPU copy it
    made when offloading was set up, so a trainable LoRA weight offloaded that way would lose its updates.
    Returns the number of layers offloaded.
    """
    from diffusers.hooks import apply_group_offloading

    doubles, singles = transformer.transformer_blocks, transformer.single_transformer_blocks
    n_double = min(blocks_to_swap // 2, len(doubles))
    n_single = min((blocks_to_swap - blocks_to_swap // 2) * 2, len(singles))
    swapped = list(doubles)[len(doubles) - n_double :] + list(singles)[len(singles) - n_single :]
    frozen_leaves = [
        module
        for block in swapped
        for module in block.modules()
        if next(module.children(), None) is None
        and any(True for _ in module.parameters(recurse=False))
        and not any(p.requires_grad for p in module.parameters(recurse=False))
    ]
    for leaf in frozen_leaves:
        apply_group_offloading(leaf, onload_device=device, offload_device=torch.device("cpu"),
                               offload_type="leaf_level", use_stream=device.type == "cuda")
    return len(frozen_leaves)


def build_optimizer(config: NativeTrainConfig, params: list[nn.Parameter]):
    args = dict(config.optimizer_args)
    if "betas" in args:
        args["betas"] = tuple(args["betas"])
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.learning_rate, **args)
    if config.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=config.learning_rate, **args)
    if config.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        lr = None if args.get("relative_step") else config.learning_rate  # relative_step computes its own lr
        return Adafactor(params, lr=lr, **args)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")


def build_scheduler(config: NativeTrainConfig, optimizer, num_processes: int):
    if config.optimizer == "adafactor" and config.optimizer_args.get("relative_step"):
        from transformers.optimization import AdafactorSchedule

        return AdafactorSchedule(optimizer)
    from diffusers.optimization import get_scheduler

    # accelerate steps a prepared scheduler once per process per optimizer step.
    return get_scheduler(
        config.lr_scheduler, optimizer,
        num_warmup_steps=config.lr_warmup_steps * num_processes,
        num_training_steps=config.max_train_steps * num_processes,
        num_cycles=config.lr_scheduler_num_cycles,
    )


# ------------------------------------------------------------------------------------------ the math


def step_generator(seed: int, micro_step: int) -> torch.Generator:
    """Noise and timesteps of micro-step k depend only on (seed, k), so a resumed run draws what an uninterrupted one does."""
    return torch.Generator().manual_seed((seed * 1_000_003 + micro_step) % (2**63))


def draw_noise_and_sigmas(config: NativeTrainConfig, latents: torch.Tensor, generator: torch.Generator):
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    noise = flow.offset_noise(noise, config.noise_offset, generator)
    sigmas = flow.sample_sigmas(
        config.timestep_sampling, latents.shape[0], latents.shape[2], latents.shape[3],
        sigmoid_scale=config.sigmoid_scale, discrete_flow_shift=config.discrete_flow_shift, generator=generator,
    )
    return noise.to(latents.device), sigmas.to(latents.device)


def flow_matching_loss(transformer, config: NativeTrainConfig, latents, noise, sigmas, pooled, t5, dtype,
                       loss_weights: Optional[torch.Tensor] = None) -> torch.Tensor:  # fmt: skip
    """Scalar loss of one batch: noisy input, packed tokens, transformer, unpack, prediction type, weighted loss.
    `loss_weights` scale each sample's loss before the batch mean (class images: dataset.prior_loss_weight), as
    sd-scripts' train_network.py does: the mean over the batch, not over the weights."""
    b, _, h, w = latents.shape
    noisy = flow.noisy_latents(latents, noise, sigmas)
    target = flow.velocity_target(latents, noise)
    prediction = transformer(
        hidden_states=flow.pack_latents(noisy).to(dtype),
        encoder_hidden_states=t5.to(dtype),
        pooled_projections=pooled.to(dtype),
        timestep=sigmas.to(dtype),
        img_ids=flow.image_ids(h, w, latents.device, dtype),
        txt_ids=flow.text_ids(t5.shape[1], latents.device, dtype),
        guidance=torch.full((b,), config.guidance_scale, device=latents.device, dtype=dtype),
        return_dict=False,
    )[0]
    prediction = flow.unpack_latents(prediction.float(), h, w)
    prediction = flow.apply_prediction_type(config.model_prediction_type, prediction, noisy, sigmas)
    loss = flow.per_sample_loss(
        prediction, target, sigmas, loss_type=config.loss_type, huber_schedule=config.huber_schedule,
        huber_c=config.huber_c, min_snr_gamma=config.min_snr_gamma, min_snr_variant=config.min_snr_variant,
    )
    if loss_weights is not None:
        loss = loss * loss_weights.to(loss.device, loss.dtype)
    return loss.mean()


@torch.no_grad()
def sample_latents(transformer, pooled, t5, *, seed: int, width: int, height: int, steps: int, device, dtype) -> torch.Tensor:
    """Euler sampler over FLUX's shifted schedule; the start noise comes from a CPU generator seeded per prompt."""
    h, w = height // 8, width // 8
    noise = torch.randn(1, 16, h, w, generator=torch.Generator().manual_seed(seed))
    x = flow.pack_latents(noise).to(device)
    img_ids, txt_ids = flow.image_ids(h, w, device, dtype), flow.text_ids(t5.shape[0], device, dtype)
    sigmas = flow.euler_sigmas(steps, (h // 2) * (w // 2))
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        velocity = transformer(
            hidden_states=x.to(dtype), encoder_hidden_states=t5[None].to(device, dtype),
            pooled_projections=pooled[None].to(device, dtype), timestep=torch.tensor([sigma], device=device, dtype=dtype),
            img_ids=img_ids, txt_ids=txt_ids, guidance=torch.tensor([SAMPLE_GUIDANCE], device=device, dtype=dtype),
            return_dict=False,
        )[0]
        x = x + (sigma_next - sigma) * velocity.float()
    return flow.unpack_latents(x, h, w)


# ------------------------------------------------------------------------------------------ records


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


def lora_metadata(config: NativeTrainConfig, *, items: list[TrainItem], batches_per_epoch: int, started_at: float,
                  fp8_linears: int, block_swap_applied: bool, num_processes: int) -> dict[str, str]:
    """ss_* and modelspec.* keys, each only when it describes something this run applied."""
    buckets = sorted({item.bucket for item in items})
    epochs = math.ceil(config.max_train_steps * config.gradient_accumulation_steps * num_processes / max(1, batches_per_epoch))
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
        "ss_optimizer": config.optimizer + (f"({json.dumps(config.optimizer_args, sort_keys=True)})" if config.optimizer_args else ""),
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
        "modelspec.date": datetime.fromtimestamp(started_at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
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
    """rich progress bar on a terminal; otherwise one plain line about every 5% of the steps."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.total, self.start, self.enabled = total, start, enabled
        self.began = time.perf_counter()
        self.every = max(1, total // 20)
        self.bar = None
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

            self.bar = RichProgress(TextColumn("steps"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.fields[status]}"), TimeRemainingColumn())
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
            print(f"step {step}/{self.total} loss {loss:.4f} avg {average:.4f} {rate:.2f} it/s "
                  f"ETA {int(eta // 60):d}:{int(eta % 60):02d}" if eta == eta else f"step {step}/{self.total}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ------------------------------------------------------------------------------------------ stopping and states


class StopRequest:
    """SIGTERM/SIGINT/SIGUSR2 ask the loop to stop after the current optimizer step; a second stop, later than
    SAME_STOP_S, ends the process at once (SIGUSR2, a warning, never does)."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.first_at = 0.0
        self.previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only (tests may run the job elsewhere)
        for signum in STOP_SIGNALS:
            self.previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        if self.signum is not None and (signum == signal.SIGUSR2 or time.monotonic() - self.first_at < SAME_STOP_S):
            return  # the same stop, delivered by SLURM and by the launcher
        if self.signum is not None:
            self.restore()
            os.kill(os.getpid(), signum)  # the default action now: whoever sends it twice means it
            return
        self.signum, self.first_at = signum, time.monotonic()  # only this: the handler may run in the middle of a print

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}


class RunOwnership:
    """The run's lease as the launcher passed it: this job writes into the run folder only while the lease file
    carries its token (without a lease, as in tests that call the trainer directly, it always does)."""

    def __init__(self) -> None:
        self.path = os.environ.get(LEASE_FILE_ENV)
        self.token = os.environ.get(LEASE_TOKEN_ENV, "")

    def lost(self) -> bool:
        return bool(self.path) and not still_holds(Path(self.path), self.token)

    def check(self) -> None:
        """Exit at once, writing nothing (no summary, no buffered TensorBoard events), when the run was taken over."""
        if self.lost():
            self.leave()

    def leave(self) -> None:
        print(f"the run's lease ({self.path}) carries another token: the run was taken over; stopped without writing", flush=True)
        os._exit(LEASE_LOST_EXIT_CODE)


@contextmanager
def writing(path: Path, cleanup: Optional[Path] = None):
    """A write into the run folder: a failure (a full disk, a quota) becomes WriteFailed naming the path and the room
    left, after removing what this write began (`cleanup`, our own temporary); what was saved before stays."""
    try:
        yield
    except (OSError, RuntimeError) as exc:  # torch.save on a full disk raises RuntimeError ("unexpected pos ...")
        if isinstance(exc, WriteFailed):
            raise
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True) if cleanup.is_dir() else cleanup.unlink(missing_ok=True)
        raise WriteFailed(path, exc) from exc


def agreed_stop(accelerator, signum: int, nonfinite: bool, lost: bool = False) -> tuple[int, bool, bool]:
    """What every process saw (max over processes): saving a state is collective, so all stop at the same step."""
    if accelerator.num_processes == 1:
        return signum, nonfinite, lost
    import torch.distributed as dist

    flags = torch.tensor([signum, int(nonfinite), int(lost)], device=accelerator.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return int(flags[0]), bool(flags[1]), bool(flags[2])


def lora_is_finite(params: list[nn.Parameter]) -> bool:
    # One device sync for all parameters.
    return bool(torch.stack([p.detach().isfinite().all() for p in params]).all())


def prune_step_states(output_dir: Path, output_name: str, newest_step: int, keep: int) -> list[Path]:
    """Delete `{output_name}-stepNNNNNNNN-state` folders beyond the newest `keep` (0 keeps all); returns them.

    Called right after the state of newest_step was written complete, so that good state is always among those kept.
    """
    if keep <= 0:
        return []
    pattern = re.compile(re.escape(output_name) + r"-step(\d{8})-state")
    states = sorted(
        (int(match.group(1)), path)
        for path in output_dir.iterdir()
        if path.is_dir() and (match := pattern.fullmatch(path.name)) and int(match.group(1)) <= newest_step
    )
    removed = [path for _, path in states[:-keep]]
    for path in removed:
        shutil.rmtree(path)
    return removed


def _finite_or_none(value: float) -> Optional[float]:
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
        "stop_lead_s": {"step": round(max(result.step_seconds, default=0.0), 3), "save": round(max(result.save_seconds, default=0.0), 3),
                        "sample_image": round(max(result.sample_image_seconds, default=0.0), 3)},
    }
    if result.stop_reason == "signal":
        summary["signal"] = signal.Signals(result.stop_signal).name
        summary["resume_state"] = result.last_state
    if result.stop_reason == "nonfinite_loss":
        summary["nonfinite_step"] = result.nonfinite_step
        summary["last_good_checkpoint"] = result.last_state
    return summary


# ------------------------------------------------------------------------------------------ the job


@dataclass
class LoraTraining:
    """The transformer with its LoRA, ready to step: what the loop and the GPU benchmark both run."""

    transformer: nn.Module  # wrapped by accelerate
    optimizer: torch.optim.Optimizer
    scheduler: object
    params: list[nn.Parameter]
    fp8_linears: int
    block_swap: bool


def prepare_lora_training(transformer: nn.Module, config: NativeTrainConfig, accelerator, weight_dtype: torch.dtype) -> LoraTraining:
    """Base frozen in the compute dtype (or fp8), LoRA parameters in fp32, checkpointing, optimizer, block swap."""
    from diffusers.training_utils import cast_training_params

    from flux_lora.engines.native.lora import add_flux_lora

    from accelerate.utils import set_seed

    transformer.requires_grad_(False)
    transformer.to(dtype=weight_dtype)
    params = add_flux_lora(transformer, config.network_dim, config.network_alpha, config.network_dropout)
    # The LoRA's initial weights are the same on every process; from here on each process draws its own dropout masks.
    set_seed(config.seed + accelerator.process_index)
    cast_training_params(transformer, dtype=torch.float32)
    fp8_linears = store_base_in_fp8(transformer) if config.fp8_base else 0
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    optimizer = build_optimizer(config, params)
    scheduler = build_scheduler(config, optimizer, accelerator.num_processes)
    transformer, optimizer, scheduler = accelerator.prepare(transformer, optimizer, scheduler)
    block_swap = bool(config.blocks_to_swap) and accelerator.device.type == "cuda"
    if block_swap:
        enable_block_swap(accelerator.unwrap_model(transformer), config.blocks_to_swap, accelerator.device)
    return LoraTraining(transformer, optimizer, scheduler, params, fp8_linears, block_swap)


def optimizer_recipe(training: LoraTraining) -> dict:
    """The hyperparameters this run's config gives the optimizer and scheduler (before a state overwrites them)."""
    groups = [{k: v for k, v in group.items() if k != "params"} for group in training.optimizer.param_groups]
    scheduler = getattr(training.scheduler, "scheduler", training.scheduler)
    return {"groups": groups, "base_lrs": list(getattr(scheduler, "base_lrs", []))}


def reapply_recipe(training: LoraTraining, recipe: dict) -> list[str]:
    """After load_state: keep the restored moments, step count and schedule position, but use this run's
    hyperparameters (a resume with an allowed recipe change must train with the new values from this step on;
    the restored optimizer and scheduler would bring back the old ones). Returns what changed."""
    from torch.optim.lr_scheduler import LambdaLR

    changed: list[str] = []
    scheduler = getattr(training.scheduler, "scheduler", training.scheduler)
    if isinstance(scheduler, LambdaLR) and recipe["base_lrs"] and list(scheduler.base_lrs) != recipe["base_lrs"]:
        changed.append(f"base lr {scheduler.base_lrs[0]:g} -> {recipe['base_lrs'][0]:g}")
        scheduler.base_lrs = list(recipe["base_lrs"])
    for group, fresh in zip(training.optimizer.param_groups, recipe["groups"]):
        for key, value in fresh.items():
            if key in ("lr", "initial_lr"):
                continue  # set from the schedule below
            if group.get(key) != value:
                changed.append(f"{key} {group.get(key)} -> {value}")
                group[key] = value
    if isinstance(scheduler, LambdaLR):
        # The lr at the restored position of the schedule, from this run's base lr and schedule.
        lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, base, lr in zip(training.optimizer.param_groups, scheduler.base_lrs, lrs):
            group["initial_lr"], group["lr"] = base, lr
        scheduler._last_lr = lrs
    return changed


def train_micro_step(training: LoraTraining, config: NativeTrainConfig, accelerator, batch: dict[str, torch.Tensor],
                     batch_index: int, weight_dtype: torch.dtype) -> float:
    """One micro-batch under gradient accumulation; the optimizer steps when accelerate syncs gradients."""
    with accelerator.accumulate(training.transformer):
        noise, sigmas = draw_noise_and_sigmas(config, batch["latents"], step_generator(config.seed, batch_index))
        with accelerator.autocast():
            loss = flow_matching_loss(training.transformer, config, batch["latents"], noise, sigmas,
                                      batch["pooled"], batch["t5"], weight_dtype, batch.get("loss_weights"))
        accelerator.backward(loss)
        if accelerator.sync_gradients and config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(training.params, config.max_grad_norm)
        training.optimizer.step()
        training.scheduler.step()
        training.optimizer.zero_grad(set_to_none=True)
    return loss.detach().item()


DEVICE_FILE = "device.json"


def write_device_record(path: Path, accelerator) -> None:
    """What this job trained on, as torch sees it (the launcher records only what NVML/nvidia-smi say)."""
    cuda = torch.cuda.is_available()
    record = {
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": cuda,
        "device": str(accelerator.device),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "cpu_threads": torch.get_num_threads(),
    }
    path.write_text(json.dumps(record, indent=2) + "\n")


def run_training(config: NativeTrainConfig) -> TrainResult:
    """Train as configured; SIGTERM/SIGINT during the run stop it after the current optimizer step (TrainResult says so)."""
    stop = StopRequest()
    stop.install()
    try:
        return train_lora(config, stop)
    finally:
        stop.restore()


def train_lora(config: NativeTrainConfig, stop: StopRequest) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import set_seed
    from torch.utils.tensorboard import SummaryWriter

    from flux_lora.engines.native.lora import save_kohya_lora
    from flux_lora.engines.native.models import decode_latents

    began = time.time()
    ownership = RunOwnership()
    if config.save_precision not in SAVE_DTYPES:
        raise ValueError(f"save_precision={config.save_precision!r}: expected one of {sorted(SAVE_DTYPES)}")
    save_dtype = SAVE_DTYPES[config.save_precision]
    if config.resume_from:
        problem = state_problem(Path(config.resume_from))
        if problem:
            raise SystemExit(f"resume_from: {problem}")
    # The job is one run per process; tests and benchmarks call this repeatedly in one process.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        cpu=config.use_cpu,
    )
    device = accelerator.device
    set_seed(config.seed)
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision, torch.float32)
    output_dir, logging_dir = Path(config.output_dir), Path(config.logging_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        write_device_record(output_dir / DEVICE_FILE, accelerator)

    # Encode the dataset and the sample prompts (from the caches when possible), then free the text encoders.
    parts = load_parts(config)
    for module in (parts.vae, parts.clip_encoder, parts.t5_encoder):
        module.to(device)
    items, stats = build_train_items(config, parts)
    classes = [item for item in items if item.is_class]
    if classes and accelerator.is_main_process:  # the plan as it trains: a test reads it back
        print(f"class images: {len(classes)} of them, {sum(i.repeats for i in classes)} places per epoch beside "
              f"{sum(i.repeats or config.num_repeats for i in items if not i.is_class)} subject places, "
              f"loss weight {config.prior_loss_weight:g}", flush=True)
    prompts = [p["text"] for p in config.sample_prompts]
    prompt_embeddings = cached_text_embeddings(parts, prompts, TensorCache(config.cache_dir, "text"), stats) if prompts else {}
    parts.clip_encoder = parts.t5_encoder = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    training = prepare_lora_training(parts.transformer, config, accelerator, weight_dtype)
    transformer, scheduler = training.transformer, training.scheduler

    # Accelerate state holds only the LoRA (not the frozen base) plus optimizer, scheduler and RNG.
    def save_lora_state(models, weights, state_dir):
        weights.clear()
        if accelerator.is_main_process:
            from safetensors.torch import save_file

            trainable = {n: p.detach().cpu().contiguous() for n, p in accelerator.unwrap_model(transformer).named_parameters() if p.requires_grad}
            save_file(trainable, str(Path(state_dir) / LORA_STATE_FILE))

    def load_lora_state(models, state_dir):
        from safetensors.torch import load_file

        models.clear()
        saved = load_file(str(Path(state_dir) / LORA_STATE_FILE))
        with torch.no_grad():
            for name, param in accelerator.unwrap_model(transformer).named_parameters():
                if param.requires_grad:
                    param.copy_(saved[name])

    accelerator.register_save_state_pre_hook(save_lora_state)
    accelerator.register_load_state_pre_hook(load_lora_state)

    batches_per_epoch = len(epoch_batches(items, config.num_repeats, config.batch_size, torch.Generator().manual_seed(0)))
    global_step = 0
    last_state: Optional[str] = None
    if config.init_lora and not config.resume_from:  # a resumed state already holds the weights it started from
        from flux_lora.engines.native.lora import load_kohya_lora

        load_kohya_lora(accelerator.unwrap_model(transformer), Path(config.init_lora))
        if accelerator.is_main_process:
            print(f"starting from the LoRA in {config.init_lora}", flush=True)
    if config.resume_from:
        recipe = optimizer_recipe(training)
        accelerator.load_state(config.resume_from)
        global_step = json.loads((Path(config.resume_from) / TRAIN_STATE_FILE).read_text())["current_step"]
        last_state = str(config.resume_from)
        reapplied = reapply_recipe(training, recipe)
        if reapplied and accelerator.is_main_process:
            print(f"resumed at step {global_step} with this run's recipe: {'; '.join(reapplied)}", flush=True)
    first_step = global_step + 1

    started_at = time.time()
    metadata = lora_metadata(config, items=items, batches_per_epoch=batches_per_epoch, started_at=started_at,
                             fp8_linears=training.fp8_linears, block_swap_applied=training.block_swap, num_processes=accelerator.num_processes)
    record = Path(config.run_dir) / RECORD_FILE if config.run_dir else None
    if record is not None and record.is_file():  # the run's record travels with every LoRA it saves (launch.embed_record)
        full = json.loads(record.read_text())
        if ((full.get("config") or {}).get("launch") or {}).get("embed_record", "full") != EmbedRecord.full.value:
            metadata = shareable_metadata(metadata)
        text = embedded_record_text(full)
        if text is not None:
            metadata[METADATA_KEY] = text
    writer = SummaryWriter(str(logging_dir)) if accelerator.is_main_process else None
    sample_paths: list[str] = []
    save_seconds: list[float] = []
    sample_image_seconds: list[float] = []

    def save_checkpoint(step: int, final: bool) -> tuple[Path, Path]:
        """The LoRA file and the state folder of `step`, each complete under its name or not there at all."""
        stem = config.output_name if final else f"{config.output_name}-step{step:08d}"
        path = output_dir / f"{stem}.safetensors"
        ownership.check()
        save_began = time.perf_counter()
        state_dir = output_dir / f"{stem}-state"
        staging = staging_path(state_dir)
        with writing(state_dir, cleanup=staging):
            if accelerator.is_main_process:
                begin_dir(state_dir)
            accelerator.wait_for_everyone()
            accelerator.save_state(str(staging))  # every process writes its own RNG file
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                epoch = step * config.gradient_accumulation_steps * accelerator.num_processes // max(1, batches_per_epoch)
                (staging / TRAIN_STATE_FILE).write_text(json.dumps({"current_epoch": epoch, "current_step": step}))
                commit_dir(staging, state_dir, step)
                step_meta = dict(metadata, ss_steps=str(step), ss_epoch=str(epoch), ss_training_finished_at=str(time.time()))
                model = accelerator.unwrap_model(transformer)
                atomic_write_file(path, lambda partial: save_kohya_lora(model, partial, step_meta, dtype=save_dtype))
                if not final:
                    prune_step_states(output_dir, config.output_name, step, config.keep_last_states)
            accelerator.wait_for_everyone()
        save_seconds.append(time.perf_counter() - save_began)
        return path, state_dir

    @torch.no_grad()
    def write_samples(step: int) -> None:
        if not accelerator.is_main_process or not prompts:
            return
        model = accelerator.unwrap_model(transformer)
        model.eval()
        stamp = time.strftime("%Y%m%d%H%M%S")
        (output_dir / "sample").mkdir(exist_ok=True)
        for index, prompt in enumerate(config.sample_prompts):
            if stop.signum and index:  # a sample pass can outlast SLURM's warning: a stop comes first
                print(f"{signal.Signals(stop.signum).name}: {index} of {len(config.sample_prompts)} samples written at step {step}", flush=True)
                break
            ownership.check()
            image_began = time.perf_counter()
            pooled, t5 = prompt_embeddings[prompt["text"]]
            with accelerator.autocast():
                latents = sample_latents(model, pooled, t5, seed=prompt["seed"], width=config.resolution,
                                         height=config.resolution, steps=config.sample_steps, device=device, dtype=weight_dtype)
            # The VAE decodes in its own dtype, outside autocast: bf16 convolutions on a CPU take 20x longer than fp32.
            pixels = decode_latents(parts, latents)[0].float().cpu()
            array = ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
            from PIL import Image

            path = output_dir / "sample" / f"{config.output_name}_{step:06d}_{index:02d}_{stamp}_{prompt['seed']}.png"
            with writing(path, cleanup=path):
                Image.fromarray(array).save(path)
            sample_paths.append(str(path))
            sample_image_seconds.append(time.perf_counter() - image_began)
        model.train()

    # A signal during setup stops before the first step: nothing new to save.
    stop_signal, _, _ = agreed_stop(accelerator, stop.signum or 0, False)
    stop_reason: Optional[str] = "signal" if stop_signal else None
    nonfinite_step: Optional[int] = None
    lora_path: Optional[Path] = None

    if config.sample_at_first and global_step == 0 and stop_reason is None:
        write_samples(0)

    recorder = LossRecorder()
    losses: list[float] = []
    step_seconds: list[float] = []
    progress = Progress(config.max_train_steps, global_step, accelerator.is_main_process)
    micro_step = global_step * config.gradient_accumulation_steps
    micro_losses: list[float] = []
    class_samples = 0  # class images in this optimizer step's micro-batches (logged when the run has any)
    step_began = time.perf_counter()
    while global_step < config.max_train_steps and stop_reason is None:
        # With several GPUs each process takes its own batch: process k reads the k-th of every
        # num_processes consecutive batches (and draws that batch's noise), so no two train on the same data.
        batch_index = micro_step * accelerator.num_processes + accelerator.process_index
        epoch, position = divmod(batch_index, batches_per_epoch)
        batches = epoch_batches(items, config.num_repeats, config.batch_size,
                                torch.Generator().manual_seed(config.seed + epoch))
        indices = batches[position]
        batch = {k: v.to(device) for k, v in collate(items, indices).items()}
        micro_loss = train_micro_step(training, config, accelerator, batch, batch_index, weight_dtype)
        micro_losses.append(micro_loss)
        class_samples += sum(items[i].is_class for i in indices)
        recorder.add(position, micro_loss)
        micro_step += 1
        if not accelerator.sync_gradients:
            continue

        global_step += 1
        current = sum(micro_losses) / len(micro_losses)
        micro_losses.clear()
        losses.append(current)
        seconds = time.perf_counter() - step_began
        step_seconds.append(seconds)
        # Asked before this step writes a byte: every process leaves together when the run was taken over.
        stop_signal, nonfinite, lost = agreed_stop(accelerator, stop.signum or 0, not math.isfinite(current),
                                                   accelerator.is_main_process and ownership.lost())  # fmt: skip
        if lost:
            ownership.leave()
        if writer is not None:
            writer.add_scalar("loss/current", current, global_step)
            writer.add_scalar("loss/average", recorder.average, global_step)
            writer.add_scalar("lr/unet", scheduler.get_last_lr()[0], global_step)
            writer.add_scalar("perf/seconds_per_step", seconds, global_step)
            writer.add_scalar("perf/peak_memory_gb", peak_memory_gb(device), global_step)
            if classes:
                writer.add_scalar("data/class_images", class_samples, global_step)
            with writing(logging_dir):
                writer.flush()  # nothing buffered: a job that loses the run later has no events left to write
        class_samples = 0
        progress.update(global_step, current, recorder.average)

        last = global_step == config.max_train_steps
        periodic = bool(config.save_every_n_steps) and global_step % config.save_every_n_steps == 0
        # A finite loss can still leave broken weights behind (the update after it); never save those.
        if nonfinite or ((stop_signal or periodic or last) and not lora_is_finite(training.params)):
            stop_reason, nonfinite_step = "nonfinite_loss", global_step
            break
        if last:
            break  # the final save below (a stop asked for now changes nothing)
        if stop_signal and accelerator.is_main_process:
            print(f"{signal.Signals(stop_signal).name}: stopping at step {global_step}, saving a state to resume from", flush=True)
        if stop_signal or periodic:
            lora_path, state = save_checkpoint(global_step, final=False)
            last_state = str(state)
        if stop_signal:
            stop_reason = "signal"
            break
        if config.sample_every_n_steps and global_step % config.sample_every_n_steps == 0:
            write_samples(global_step)
        step_began = time.perf_counter()
    progress.close()

    if stop_reason is None:
        lora_path, state = save_checkpoint(global_step, final=True)
        last_state = str(state)
        write_samples(global_step)
    if writer is not None:
        writer.close()
    result = TrainResult(
        losses=losses, first_step=first_step, steps=global_step,
        final_loss=losses[-1] if losses else float("nan"), average_loss=recorder.average,
        seconds=time.time() - began, step_seconds=step_seconds, peak_memory_gb=peak_memory_gb(device),
        lora_path=None if lora_path is None or stop_reason == "nonfinite_loss" else str(lora_path),
        output_dir=str(output_dir), sample_paths=sample_paths, cache=asdict(stats),
        save_seconds=save_seconds, sample_image_seconds=sample_image_seconds,
        stop_reason=stop_reason, stop_signal=stop_signal if stop_reason == "signal" else None, nonfinite_step=nonfinite_step, last_state=last_state,
    )
    if accelerator.is_main_process:
        ownership.check()
        with writing(output_dir / SUMMARY_FILE):
            atomic_write_text(output_dir / SUMMARY_FILE, redact(json.dumps(train_summary(result, config), indent=2)) + "\n")
        if stop_reason == "signal":
            print(f"stopped by {signal.Signals(stop_signal).name} at step {global_step}; resume from {last_state}", flush=True)
        elif stop_reason == "nonfinite_loss":
            print(f"non-finite loss at step {nonfinite_step}: stopped, nothing saved from these weights; "
                  f"last good state: {last_state}", flush=True)
    accelerator.end_training()
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 3) or (len(args) == 3 and args[1] != "--resume"):
        print("usage: accelerate launch -m flux_lora.engines.native.train <run dir | native_config.json> [--resume STATE_DIR]",
              file=sys.stderr)  # fmt: skip
        return 2
    frozen = Path(args[0])
    # The launcher passes the run directory; the job reads only the config frozen in it. A resumed attempt
    # names its state on the command line, so the frozen config stays as it was.
    config = NativeTrainConfig.from_json(frozen / CONFIG_FILE if frozen.is_dir() else frozen)
    if len(args) == 3:
        config.resume_from = args[2]
    try:
        result = run_training(config)
    except WriteFailed as failed:  # one line, and the exit code the launcher reads as failed; earlier states stay
        print(f"error: {failed}; the states saved before it are kept: free some space and launch again to resume", flush=True)
        return EXIT_WRITE_FAILED
    if result.stop_reason is None:
        print(f"done: {result.steps} steps, final loss {result.final_loss:.4f}, LoRA {result.lora_path}", flush=True)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
