"""The native FLUX LoRA training job: `accelerate launch -m flux_lora.engines.native.train <run dir>`.

Reads only the frozen config file (and the dataset, model files and caches it names). `train_lora` is the recipe,
in the sections its comments number:
  1. set up    accelerate, the model parts, the latent and text caches (then the text encoders freed), the LoRA
               with fp8 base and block swap, optimizer and scheduler (setup.py);
  2. resume    from a saved state, or start from a LoRA file's weights;
  3. the loop  micro-batches (BatchPlan) through the flow-matching loss (flow.py); after each optimizer step the
               loss log (StepLog, records.py), then what every process saw decides: stop, save, sample (stopping.py);
  4. save      the final state and LoRA (Checkpointer) and samples (Sampler);
  5. finish    the result and train_summary.json.

Every LoRA file and state folder is written under a temporary name and renamed when complete; each state
gets a manifest (checkpoint_files.py). The job stops early, with a train_summary.json saying why, on
SIGTERM/SIGINT and SLURM's SIGUSR2 warning before the time limit (after the current optimizer step, with a
state to resume from; exit 128 + signal number) and on a non-finite loss (nothing saved from the broken
weights; exit 3). Before every write into the run folder it checks that the run's lease (named by the launcher
in FLUX_LORA_LEASE_FILE / _TOKEN) still carries its token: a run taken over by another launch stops at once,
writing nothing more (exit 75). A write that fails (a full disk) ends it with one line naming the file (exit 4).
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from flux_lora.checkpoint_files import (
    WriteFailed,
    atomic_write_file,
    begin_dir,
    commit_dir,
    staging_path,
    state_problem,
)
from flux_lora.engines.native import flow
from flux_lora.engines.native.config import CONFIG_FILE, NativeTrainConfig
from flux_lora.engines.native.data import (
    TensorCache,
    build_train_items,
    cached_text_embeddings,
    collate,
    epoch_batches,
)
from flux_lora.engines.native.records import (
    SUMMARY_FILE,
    LossRecorder,
    Progress,
    TrainResult,
    class_plan_line,
    ending_line,
    lora_metadata,
    peak_memory_gb,
    stopping_line,
    write_train_summary,
)
from flux_lora.engines.native.setup import (
    DEVICE_FILE,
    LoraTraining,
    free_text_encoders,
    load_parts,
    optimizer_recipe,
    prepare_lora_training,
    reapply_recipe,
    write_device_record,
)
from flux_lora.engines.native.stopping import (
    EXIT_WRITE_FAILED,
    RunOwnership,
    StopRequest,
    agreed_stop,
    lora_is_finite,
    prune_step_states,
    writing,
)
from flux_lora.provenance import METADATA_KEY, RECORD_FILE, EmbedRecord, embedded_record_text, shareable_metadata

SAMPLE_GUIDANCE = 3.5  # sd-scripts' default embedded guidance for sample prompts (--g)
LORA_STATE_FILE = "lora_weights.safetensors"
TRAIN_STATE_FILE = "train_state.json"
SAVE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "float": torch.float32, "fp32": torch.float32}


# ------------------------------------------------------------------------------------------ the math


def step_generator(seed: int, micro_step: int) -> torch.Generator:
    """Noise and timesteps of micro-step k depend only on (seed, k), so a resumed run draws what an uninterrupted one does."""
    return torch.Generator().manual_seed((seed * 1_000_003 + micro_step) % (2**63))


def draw_noise_and_sigmas(config: NativeTrainConfig, latents: torch.Tensor, generator: torch.Generator):
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    noise = flow.offset_noise(noise, config.noise_offset, generator)
    sigmas = flow.sample_sigmas(
        config.timestep_sampling,
        latents.shape[0],
        latents.shape[2],
        latents.shape[3],
        sigmoid_scale=config.sigmoid_scale,
        discrete_flow_shift=config.discrete_flow_shift,
        generator=generator,
    )
    return noise.to(latents.device), sigmas.to(latents.device)


def flow_matching_loss(
    transformer,
    config: NativeTrainConfig,
    latents,
    noise,
    sigmas,
    pooled,
    t5,
    dtype,
    loss_weights: torch.Tensor | None = None,
) -> torch.Tensor:
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
        prediction,
        target,
        sigmas,
        loss_type=config.loss_type,
        huber_schedule=config.huber_schedule,
        huber_c=config.huber_c,
        min_snr_gamma=config.min_snr_gamma,
        min_snr_variant=config.min_snr_variant,
    )
    if loss_weights is not None:
        loss = loss * loss_weights.to(loss.device, loss.dtype)
    return loss.mean()


@torch.no_grad()
def sample_latents(
    transformer, pooled, t5, *, seed: int, width: int, height: int, steps: int, device, dtype
) -> torch.Tensor:
    """Euler sampler over FLUX's shifted schedule; the start noise comes from a CPU generator seeded per prompt."""
    h, w = height // 8, width // 8
    noise = torch.randn(1, 16, h, w, generator=torch.Generator().manual_seed(seed))
    x = flow.pack_latents(noise).to(device)
    img_ids, txt_ids = flow.image_ids(h, w, device, dtype), flow.text_ids(t5.shape[0], device, dtype)
    sigmas = flow.euler_sigmas(steps, (h // 2) * (w // 2))
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        velocity = transformer(
            hidden_states=x.to(dtype),
            encoder_hidden_states=t5[None].to(device, dtype),
            pooled_projections=pooled[None].to(device, dtype),
            timestep=torch.tensor([sigma], device=device, dtype=dtype),
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=torch.tensor([SAMPLE_GUIDANCE], device=device, dtype=dtype),
            return_dict=False,
        )[0]
        x = x + (sigma_next - sigma) * velocity.float()
    return flow.unpack_latents(x, h, w)


# ------------------------------------------------------------------------------------------ the job's parts


def train_micro_step(
    training: LoraTraining,
    config: NativeTrainConfig,
    accelerator,
    batch: dict[str, torch.Tensor],
    batch_index: int,
    weight_dtype: torch.dtype,
) -> float:
    """One micro-batch under gradient accumulation; the optimizer steps when accelerate syncs gradients."""
    with accelerator.accumulate(training.transformer):
        noise, sigmas = draw_noise_and_sigmas(config, batch["latents"], step_generator(config.seed, batch_index))
        with accelerator.autocast():
            loss = flow_matching_loss(
                training.transformer,
                config,
                batch["latents"],
                noise,
                sigmas,
                batch["pooled"],
                batch["t5"],
                weight_dtype,
                batch.get("loss_weights"),
            )
        accelerator.backward(loss)
        if accelerator.sync_gradients and config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(training.params, config.max_grad_norm)
        training.optimizer.step()
        training.scheduler.step()
        training.optimizer.zero_grad(set_to_none=True)
    return loss.detach().item()


def register_state_hooks(accelerator, transformer) -> None:
    """Accelerate's state holds only the LoRA (not the frozen base) plus optimizer, scheduler and RNG."""

    def save_lora_state(models, weights, state_dir):
        weights.clear()
        if accelerator.is_main_process:
            from safetensors.torch import save_file

            trainable = {
                n: p.detach().cpu().contiguous()
                for n, p in accelerator.unwrap_model(transformer).named_parameters()
                if p.requires_grad
            }
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


def resume_state(accelerator, training: LoraTraining, state_dir: str) -> int:
    """Load a saved state (LoRA, optimizer, scheduler, RNG) with this run's recipe over it; the step it was saved at."""
    recipe = optimizer_recipe(training)
    accelerator.load_state(state_dir)
    step = json.loads((Path(state_dir) / TRAIN_STATE_FILE).read_text())["current_step"]
    reapplied = reapply_recipe(training, recipe)
    if reapplied and accelerator.is_main_process:
        print(f"resumed at step {step} with this run's recipe: {'; '.join(reapplied)}", flush=True)
    return step


def run_metadata(
    config: NativeTrainConfig,
    accelerator,
    training: LoraTraining,
    items: list,
    batches_per_epoch: int,
    started_at: float,
) -> dict[str, str]:
    """kohya's ss_* keys, and the run's record as launch.embed_record says (every LoRA the run saves carries them)."""
    metadata = lora_metadata(
        config,
        items=items,
        batches_per_epoch=batches_per_epoch,
        started_at=started_at,
        fp8_linears=training.fp8_linears,
        block_swap_applied=training.block_swap,
        num_processes=accelerator.num_processes,
    )
    record = Path(config.run_dir) / RECORD_FILE if config.run_dir else None
    if record is not None and record.is_file():
        full = json.loads(record.read_text())
        if ((full.get("config") or {}).get("launch") or {}).get("embed_record", "full") != EmbedRecord.full.value:
            metadata = shareable_metadata(metadata)
        text = embedded_record_text(full)
        if text is not None:
            metadata[METADATA_KEY] = text
    return metadata


class BatchPlan:
    """Which micro-batch a process trains at each micro step: kohya's per-epoch shuffle of the (repeated) items. With
    several processes each takes its own batch: process k the k-th of every num_processes consecutive batches."""

    def __init__(self, config: NativeTrainConfig, items: list, accelerator) -> None:
        self.config, self.items, self.accelerator = config, items, accelerator
        self.per_epoch = len(
            epoch_batches(items, config.num_repeats, config.batch_size, torch.Generator().manual_seed(0))
        )

    def micro_batch(self, micro_step: int) -> tuple[int, int, list[int]]:
        """(batch index, position in its epoch, item indices)."""
        batch_index = micro_step * self.accelerator.num_processes + self.accelerator.process_index
        epoch, position = divmod(batch_index, self.per_epoch)
        batches = epoch_batches(
            self.items,
            self.config.num_repeats,
            self.config.batch_size,
            torch.Generator().manual_seed(self.config.seed + epoch),
        )
        return batch_index, position, batches[position]

    def epoch_of(self, step: int) -> int:
        return step * self.config.gradient_accumulation_steps * self.accelerator.num_processes // max(1, self.per_epoch)


class StepLog:
    """The loss log: micro-batch losses into each optimizer step's loss, TensorBoard scalars (flushed every step, so a
    job that loses its run has nothing buffered to write), progress lines."""

    def __init__(self, config: NativeTrainConfig, accelerator, logging_dir: Path, has_classes: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.config, self.accelerator, self.logging_dir, self.has_classes = (
            config,
            accelerator,
            logging_dir,
            has_classes,
        )
        self.writer = SummaryWriter(str(logging_dir)) if accelerator.is_main_process else None
        self.recorder = LossRecorder()
        self.losses: list[float] = []
        self.step_seconds: list[float] = []
        self.micro_losses: list[float] = []
        self.class_samples = 0  # class images in this optimizer step's micro-batches (logged when the run has any)
        self.progress: Progress | None = None
        self.step_began = 0.0

    def start(self, global_step: int) -> None:
        self.progress = Progress(self.config.max_train_steps, global_step, self.accelerator.is_main_process)
        self.restart_clock()

    def restart_clock(self) -> None:
        self.step_began = time.perf_counter()

    def micro(self, position: int, loss: float, class_samples: int) -> None:
        self.micro_losses.append(loss)
        self.class_samples += class_samples
        self.recorder.add(position, loss)

    def close_step(self) -> float:
        """The optimizer step's loss (the mean of its micro-batches), its time recorded."""
        current = sum(self.micro_losses) / len(self.micro_losses)
        self.micro_losses.clear()
        self.losses.append(current)
        self.step_seconds.append(time.perf_counter() - self.step_began)
        return current

    def write(self, step: int, lr: float, device: torch.device) -> None:
        if self.writer is not None:
            self.writer.add_scalar("loss/current", self.losses[-1], step)
            self.writer.add_scalar("loss/average", self.recorder.average, step)
            self.writer.add_scalar("lr/unet", lr, step)
            self.writer.add_scalar("perf/seconds_per_step", self.step_seconds[-1], step)
            self.writer.add_scalar("perf/peak_memory_gb", peak_memory_gb(device), step)
            if self.has_classes:
                self.writer.add_scalar("data/class_images", self.class_samples, step)
            with writing(self.logging_dir):
                self.writer.flush()
        self.class_samples = 0
        assert self.progress is not None
        self.progress.update(step, self.losses[-1], self.recorder.average)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()


class Checkpointer:
    """A step's state folder and LoRA file, each complete under its name or not there at all; old states pruned."""

    def __init__(
        self,
        config: NativeTrainConfig,
        accelerator,
        transformer,
        output_dir: Path,
        metadata: dict[str, str],
        plan: BatchPlan,
        ownership: RunOwnership,
    ) -> None:
        self.config, self.accelerator, self.transformer, self.output_dir = config, accelerator, transformer, output_dir
        self.metadata, self.plan, self.ownership = metadata, plan, ownership
        self.save_dtype = SAVE_DTYPES[config.save_precision]
        self.save_seconds: list[float] = []

    def save(self, step: int, final: bool) -> tuple[Path, Path]:
        stem = self.config.output_name if final else f"{self.config.output_name}-step{step:08d}"
        path = self.output_dir / f"{stem}.safetensors"
        self.ownership.check()
        began = time.perf_counter()
        state_dir = self.output_dir / f"{stem}-state"
        staging = staging_path(state_dir)
        with writing(state_dir, cleanup=staging):
            self._write(step, final, path, state_dir, staging)
        self.save_seconds.append(time.perf_counter() - began)
        return path, state_dir

    def _write(self, step: int, final: bool, path: Path, state_dir: Path, staging: Path) -> None:
        from flux_lora.engines.native.lora import save_kohya_lora

        accelerator, config = self.accelerator, self.config
        if accelerator.is_main_process:
            begin_dir(state_dir)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging))  # every process writes its own RNG file
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            epoch = self.plan.epoch_of(step)
            (staging / TRAIN_STATE_FILE).write_text(json.dumps({"current_epoch": epoch, "current_step": step}))
            commit_dir(staging, state_dir, step)
            step_meta = dict(
                self.metadata, ss_steps=str(step), ss_epoch=str(epoch), ss_training_finished_at=str(time.time())
            )
            model = accelerator.unwrap_model(self.transformer)
            atomic_write_file(path, lambda partial: save_kohya_lora(model, partial, step_meta, dtype=self.save_dtype))
            if not final:
                prune_step_states(self.output_dir, config.output_name, step, config.keep_last_states)
        accelerator.wait_for_everyone()


class Sampler:
    """Sample images from the run's prompts (seeded per prompt); the stop flag is read between images."""

    def __init__(
        self,
        config: NativeTrainConfig,
        accelerator,
        transformer,
        parts,
        embeddings: dict,
        device,
        weight_dtype,
        output_dir: Path,
        stop: StopRequest,
        ownership: RunOwnership,
    ) -> None:
        self.config, self.accelerator, self.transformer, self.parts = config, accelerator, transformer, parts
        self.embeddings, self.device, self.weight_dtype, self.output_dir = embeddings, device, weight_dtype, output_dir
        self.stop, self.ownership = stop, ownership
        self.paths: list[str] = []
        self.image_seconds: list[float] = []

    @torch.no_grad()
    def write(self, step: int) -> None:
        from PIL import Image

        from flux_lora.engines.native.models import decode_latents

        config = self.config
        if not self.accelerator.is_main_process or not config.sample_prompts:
            return
        model = self.accelerator.unwrap_model(self.transformer)
        model.eval()
        stamp = time.strftime("%Y%m%d%H%M%S")
        (self.output_dir / "sample").mkdir(exist_ok=True)
        for index, prompt in enumerate(config.sample_prompts):
            if self.stop.signum and index:  # a sample pass can outlast SLURM's warning: a stop comes first
                print(
                    f"{signal.Signals(self.stop.signum).name}: {index} of {len(config.sample_prompts)} samples written at step {step}",
                    flush=True,
                )
                break
            self.ownership.check()
            began = time.perf_counter()
            pooled, t5 = self.embeddings[prompt["text"]]
            with self.accelerator.autocast():
                latents = sample_latents(
                    model,
                    pooled,
                    t5,
                    seed=prompt["seed"],
                    width=config.resolution,
                    height=config.resolution,
                    steps=config.sample_steps,
                    device=self.device,
                    dtype=self.weight_dtype,
                )
            # The VAE decodes in its own dtype, outside autocast: bf16 convolutions on a CPU take 20x longer than fp32.
            pixels = decode_latents(self.parts, latents)[0].float().cpu()
            array = ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
            path = (
                self.output_dir / "sample" / f"{config.output_name}_{step:06d}_{index:02d}_{stamp}_{prompt['seed']}.png"
            )
            with writing(path, cleanup=path):
                Image.fromarray(array).save(path)
            self.paths.append(str(path))
            self.image_seconds.append(time.perf_counter() - began)
        model.train()


# ------------------------------------------------------------------------------------------ the job


def run_training(config: NativeTrainConfig) -> TrainResult:
    """Train as configured; SIGTERM/SIGINT during the run stop it after the current optimizer step (TrainResult says so)."""
    stop = StopRequest()
    stop.install()
    try:
        return train_lora(config, stop)
    finally:
        stop.restore()


def start_accelerator(config: NativeTrainConfig):
    """A fresh accelerate state, seeded: the job is one run per process, but tests and benchmarks train repeatedly
    in one process, and accelerate keeps its state in class attributes."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import set_seed

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        cpu=config.use_cpu,
    )
    set_seed(config.seed)
    return accelerator


def train_lora(config: NativeTrainConfig, stop: StopRequest) -> TrainResult:
    """The recipe: 1. set up, 2. resume, 3. the loop, 4. save, 5. finish."""
    # 1. Set up: accelerate, the model parts, the dataset and prompts encoded (then the text encoders freed), the LoRA.
    began = time.time()
    ownership = RunOwnership()
    if config.save_precision not in SAVE_DTYPES:
        raise ValueError(f"save_precision={config.save_precision!r}: expected one of {sorted(SAVE_DTYPES)}")
    if config.resume_from and (problem := state_problem(Path(config.resume_from))):
        raise SystemExit(f"resume_from: {problem}")
    accelerator = start_accelerator(config)
    device = accelerator.device
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision, torch.float32)
    output_dir, logging_dir = Path(config.output_dir), Path(config.logging_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        write_device_record(output_dir / DEVICE_FILE, accelerator)
    parts = load_parts(config)
    for module in (parts.vae, parts.clip_encoder, parts.t5_encoder):
        module.to(device)
    items, stats = build_train_items(config, parts)
    classes = [item for item in items if item.is_class]
    if classes and accelerator.is_main_process:  # the plan as it trains: a test reads it back
        print(class_plan_line(items, config), flush=True)
    prompts = [p["text"] for p in config.sample_prompts]
    embeddings = cached_text_embeddings(parts, prompts, TensorCache(config.cache_dir, "text"), stats) if prompts else {}
    free_text_encoders(parts, device)
    training = prepare_lora_training(parts.transformer, config, accelerator, weight_dtype)
    register_state_hooks(accelerator, training.transformer)
    plan = BatchPlan(config, items, accelerator)

    # 2. Resume: from a saved state (its LoRA, optimizer, scheduler and RNG), or start from a LoRA file's weights.
    global_step, last_state = 0, None
    if config.init_lora and not config.resume_from:  # a resumed state already holds the weights it started from
        from flux_lora.engines.native.lora import load_kohya_lora

        load_kohya_lora(accelerator.unwrap_model(training.transformer), Path(config.init_lora))
        if accelerator.is_main_process:
            print(f"starting from the LoRA in {config.init_lora}", flush=True)
    if config.resume_from:
        global_step, last_state = resume_state(accelerator, training, config.resume_from), str(config.resume_from)
    first_step = global_step + 1
    metadata = run_metadata(config, accelerator, training, items, plan.per_epoch, time.time())
    checkpointer = Checkpointer(config, accelerator, training.transformer, output_dir, metadata, plan, ownership)
    sampler = Sampler(
        config, accelerator, training.transformer, parts, embeddings, device, weight_dtype, output_dir, stop, ownership
    )
    log = StepLog(config, accelerator, logging_dir, bool(classes))

    # 3. The loop: micro-batches until max_train_steps; after each optimizer step, what every process saw decides
    #    whether to stop (a signal, a non-finite loss, a lost lease), save or sample.
    stop_signal, _, _ = agreed_stop(accelerator, stop.signum or 0, False)  # a signal during setup: nothing new to save
    stop_reason: str | None = "signal" if stop_signal else None
    nonfinite_step: int | None = None
    lora_path: Path | None = None
    log.start(global_step)
    micro_step = global_step * config.gradient_accumulation_steps
    while global_step < config.max_train_steps and stop_reason is None:
        batch_index, position, indices = plan.micro_batch(micro_step)
        batch = {k: v.to(device) for k, v in collate(items, indices).items()}
        loss = train_micro_step(training, config, accelerator, batch, batch_index, weight_dtype)
        log.micro(position, loss, sum(items[i].is_class for i in indices))
        micro_step += 1
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        current = log.close_step()
        # Asked before this step writes a byte: every process leaves together when the run was taken over.
        stop_signal, nonfinite, lost = agreed_stop(
            accelerator, stop.signum or 0, not math.isfinite(current), accelerator.is_main_process and ownership.lost()
        )
        if lost:
            ownership.leave()
        log.write(global_step, training.scheduler.get_last_lr()[0], device)
        last = global_step == config.max_train_steps
        periodic = bool(config.save_every_n_steps) and global_step % config.save_every_n_steps == 0
        # A finite loss can still leave broken weights behind (the update after it); never save those.
        if nonfinite or ((stop_signal or periodic or last) and not lora_is_finite(training.params)):
            stop_reason, nonfinite_step = "nonfinite_loss", global_step
            break
        if last:
            break  # the final save below (a stop asked for now changes nothing)
        if stop_signal and accelerator.is_main_process:
            print(stopping_line(stop_signal, global_step), flush=True)
        if stop_signal or periodic:
            lora_path, state = checkpointer.save(global_step, final=False)
            last_state = str(state)
        if stop_signal:
            stop_reason = "signal"
            break
        if config.sample_every_n_steps and global_step % config.sample_every_n_steps == 0:
            sampler.write(global_step)
        log.restart_clock()
    log.close()

    # 4. Save: the final state and LoRA, and the final samples, when the run reached max_train_steps.
    if stop_reason is None:
        lora_path, state = checkpointer.save(global_step, final=True)
        last_state = str(state)
        sampler.write(global_step)
    if log.writer is not None:
        log.writer.close()

    # 5. Finish: the result, train_summary.json and a line saying how it ended.
    result = TrainResult(
        losses=log.losses,
        first_step=first_step,
        steps=global_step,
        final_loss=log.losses[-1] if log.losses else float("nan"),
        average_loss=log.recorder.average,
        seconds=time.time() - began,
        step_seconds=log.step_seconds,
        peak_memory_gb=peak_memory_gb(device),
        lora_path=None if lora_path is None or stop_reason == "nonfinite_loss" else str(lora_path),
        output_dir=str(output_dir),
        sample_paths=sampler.paths,
        cache=asdict(stats),
        save_seconds=checkpointer.save_seconds,
        sample_image_seconds=sampler.image_seconds,
        stop_reason=stop_reason,
        stop_signal=stop_signal if stop_reason == "signal" else None,
        nonfinite_step=nonfinite_step,
        last_state=last_state,
    )
    if accelerator.is_main_process:
        ownership.check()
        write_train_summary(output_dir / SUMMARY_FILE, result, config)
        if line := ending_line(result):
            print(line, flush=True)
    accelerator.end_training()
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 3) or (len(args) == 3 and args[1] != "--resume"):
        print(
            "usage: accelerate launch -m flux_lora.engines.native.train <run dir | native_config.json> [--resume STATE_DIR]",
            file=sys.stderr,
        )
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
        print(
            f"error: {failed}; the states saved before it are kept: free some space and launch again to resume",
            flush=True,
        )
        return EXIT_WRITE_FAILED
    if result.stop_reason is None:
        print(f"done: {result.steps} steps, final loss {result.final_loss:.4f}, LoRA {result.lora_path}", flush=True)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
