"""The native FLUX LoRA training job: `accelerate launch -m flux_lora.engines.native.train <run dir>`.

Reads only the frozen config file (and the dataset, model files and caches it names). Top to bottom:
load the model parts -> fill/read the latent and text caches -> free the text encoders -> LoRA (+ fp8
base, block swap) -> optimizer and scheduler under accelerate -> the loop (flow-matching loss from
flow.py, logging, samples, checkpoints, state) -> final LoRA and train_summary.json.
"""

from __future__ import annotations

import gc
import json
import math
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flux_lora.engines.native import flow
from flux_lora.engines.native.config import CONFIG_FILE, NativeTrainConfig
from flux_lora.engines.native.data import (
    TensorCache,
    TrainItem,
    build_train_items,
    cached_text_embeddings,
    collate,
    epoch_batches,
)

SAMPLE_GUIDANCE = 3.5  # sd-scripts' default embedded guidance for sample prompts (--g)
LORA_STATE_FILE = "lora_weights.safetensors"
TRAIN_STATE_FILE = "train_state.json"
SAVE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "float": torch.float32, "fp32": torch.float32}


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
    lora_path: str
    output_dir: str
    sample_paths: list[str] = field(default_factory=list)
    cache: dict = field(default_factory=dict)


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


def flow_matching_loss(transformer, config: NativeTrainConfig, latents, noise, sigmas, pooled, t5, dtype) -> torch.Tensor:
    """Scalar loss of one batch: noisy input, packed tokens, transformer, unpack, prediction type, weighted loss."""
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
        huber_c=config.huber_c, min_snr_gamma=config.min_snr_gamma,
    )
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

    def add(self, epoch: int, position: int, loss: float) -> None:
        self.total += loss - self.latest.get(position, 0.0)
        self.latest[position] = loss

    @property
    def average(self) -> float:
        return self.total / len(self.latest) if self.latest else 0.0


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


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
        "ss_num_train_images": len(items) * config.num_repeats,
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
        meta["ss_min_snr_kind"] = "flow: loss * min((1-sigma)^2, gamma*sigma^2)"
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

    transformer.requires_grad_(False)
    transformer.to(dtype=weight_dtype)
    params = add_flux_lora(transformer, config.network_dim, config.network_alpha, config.network_dropout)
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


def train_micro_step(training: LoraTraining, config: NativeTrainConfig, accelerator, batch: dict[str, torch.Tensor],
                     batch_index: int, weight_dtype: torch.dtype) -> float:
    """One micro-batch under gradient accumulation; the optimizer steps when accelerate syncs gradients."""
    with accelerator.accumulate(training.transformer):
        noise, sigmas = draw_noise_and_sigmas(config, batch["latents"], step_generator(config.seed, batch_index))
        with accelerator.autocast():
            loss = flow_matching_loss(training.transformer, config, batch["latents"], noise, sigmas,
                                      batch["pooled"], batch["t5"], weight_dtype)
        accelerator.backward(loss)
        if accelerator.sync_gradients and config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(training.params, config.max_grad_norm)
        training.optimizer.step()
        training.scheduler.step()
        training.optimizer.zero_grad(set_to_none=True)
    return loss.detach().item()


def run_training(config: NativeTrainConfig) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import set_seed
    from torch.utils.tensorboard import SummaryWriter

    from flux_lora.engines.native.lora import save_kohya_lora
    from flux_lora.engines.native.models import decode_latents

    began = time.time()
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

    # Encode the dataset and the sample prompts (from the caches when possible), then free the text encoders.
    parts = load_parts(config)
    for module in (parts.vae, parts.clip_encoder, parts.t5_encoder):
        module.to(device)
    items, stats = build_train_items(config, parts)
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
    if config.resume_from:
        accelerator.load_state(config.resume_from)
        global_step = json.loads((Path(config.resume_from) / TRAIN_STATE_FILE).read_text())["current_step"]
    first_step = global_step + 1

    started_at = time.time()
    metadata = lora_metadata(config, items=items, batches_per_epoch=batches_per_epoch, started_at=started_at,
                             fp8_linears=training.fp8_linears, block_swap_applied=training.block_swap, num_processes=accelerator.num_processes)
    save_dtype = SAVE_DTYPES.get(config.save_precision, torch.bfloat16)
    writer = SummaryWriter(str(logging_dir)) if accelerator.is_main_process else None
    sample_paths: list[str] = []

    def save_checkpoint(step: int, final: bool) -> Path:
        stem = config.output_name if final else f"{config.output_name}-step{step:08d}"
        path = output_dir / f"{stem}.safetensors"
        state_dir = output_dir / f"{stem}-state"
        accelerator.wait_for_everyone()
        accelerator.save_state(str(state_dir))
        if accelerator.is_main_process:
            epoch = step * config.gradient_accumulation_steps * accelerator.num_processes // max(1, batches_per_epoch)
            (state_dir / TRAIN_STATE_FILE).write_text(json.dumps({"current_epoch": epoch, "current_step": step}))
            step_meta = dict(metadata, ss_steps=str(step), ss_epoch=str(epoch), ss_training_finished_at=str(time.time()))
            save_kohya_lora(accelerator.unwrap_model(transformer), path, step_meta, dtype=save_dtype)
        return path

    def write_samples(step: int) -> None:
        if not accelerator.is_main_process or not prompts:
            return
        model = accelerator.unwrap_model(transformer)
        model.eval()
        stamp = time.strftime("%Y%m%d%H%M%S")
        (output_dir / "sample").mkdir(exist_ok=True)
        with accelerator.autocast():
            for index, prompt in enumerate(config.sample_prompts):
                pooled, t5 = prompt_embeddings[prompt["text"]]
                latents = sample_latents(model, pooled, t5, seed=prompt["seed"], width=config.resolution,
                                         height=config.resolution, steps=config.sample_steps, device=device, dtype=weight_dtype)
                pixels = decode_latents(parts, latents)[0].float().cpu()
                array = ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
                from PIL import Image

                path = output_dir / "sample" / f"{config.output_name}_{step:06d}_{index:02d}_{stamp}_{prompt['seed']}.png"
                Image.fromarray(array).save(path)
                sample_paths.append(str(path))
        model.train()

    if config.sample_at_first and global_step == 0:
        write_samples(0)

    recorder = LossRecorder()
    losses: list[float] = []
    step_seconds: list[float] = []
    progress = Progress(config.max_train_steps, global_step, accelerator.is_main_process)
    micro_step = global_step * config.gradient_accumulation_steps
    micro_losses: list[float] = []
    step_began = time.perf_counter()
    while global_step < config.max_train_steps:
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
        recorder.add(epoch, position, micro_loss)
        micro_step += 1
        if not accelerator.sync_gradients:
            continue

        global_step += 1
        current = sum(micro_losses) / len(micro_losses)
        micro_losses.clear()
        losses.append(current)
        seconds = time.perf_counter() - step_began
        step_seconds.append(seconds)
        if writer is not None:
            writer.add_scalar("loss/current", current, global_step)
            writer.add_scalar("loss/average", recorder.average, global_step)
            writer.add_scalar("lr/unet", scheduler.get_last_lr()[0], global_step)
            writer.add_scalar("perf/seconds_per_step", seconds, global_step)
            writer.add_scalar("perf/peak_memory_gb", peak_memory_gb(device), global_step)
        progress.update(global_step, current, recorder.average)
        if global_step < config.max_train_steps:
            if config.save_every_n_steps and global_step % config.save_every_n_steps == 0:
                save_checkpoint(global_step, final=False)
            if config.sample_every_n_steps and global_step % config.sample_every_n_steps == 0:
                write_samples(global_step)
        step_began = time.perf_counter()
    progress.close()

    lora_path = save_checkpoint(global_step, final=True)
    write_samples(global_step)
    if writer is not None:
        writer.close()
    result = TrainResult(
        losses=losses, first_step=first_step, steps=global_step,
        final_loss=losses[-1] if losses else float("nan"), average_loss=recorder.average,
        seconds=time.time() - began, step_seconds=step_seconds, peak_memory_gb=peak_memory_gb(device),
        lora_path=str(lora_path), output_dir=str(output_dir), sample_paths=sample_paths, cache=asdict(stats),
    )
    if accelerator.is_main_process:
        summary = {k: getattr(result, k) for k in ("final_loss", "average_loss", "steps", "seconds", "peak_memory_gb")}
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    accelerator.end_training()
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: accelerate launch -m flux_lora.engines.native.train <run dir | native_config.json>", file=sys.stderr)
        return 2
    frozen = Path(args[0])
    # The launcher passes the run directory; the job reads only the config frozen in it.
    result = run_training(NativeTrainConfig.from_json(frozen / CONFIG_FILE if frozen.is_dir() else frozen))
    print(f"done: {result.steps} steps, final loss {result.final_loss:.4f}, LoRA {result.lora_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
