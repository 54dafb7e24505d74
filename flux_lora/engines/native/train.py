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
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
from flux_lora.engines.native.lora import ADAPTER
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
    prepare_lora_trainings,
    reapply_recipe,
    write_device_record,
)
from flux_lora.engines.native.stopping import (
    EXIT_WRITE_FAILED,
    RunOwnership,
    RunTakenOver,
    StopRequest,
    agreed_stop,
    lora_is_finite,
    prune_step_states,
    writing,
)
from flux_lora.lifecycle.job_guard import LEASE_LOST_EXIT_CODE
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
    """One micro-batch, inside the caller's `accelerator.accumulate`: the optimizer steps when gradients sync."""
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


def _state_name(name: str, adapter: str) -> str:
    # A state names the LoRA's parameters as a separate run does (peft's default adapter), packed or not, so either
    # can resume the other's state.
    from flux_lora.engines.native.lora import ADAPTER

    return name.replace(f".{adapter}.", f".{ADAPTER}.")


def save_state(accelerator, training: LoraTraining, state_dir: Path, micro_step: int) -> None:
    """This run's part of a state: its LoRA (not the frozen base), optimizer, scheduler and random streams (the ones
    swapped in: call it in the run's turn). Every process writes its own random streams. `micro_step` is what
    accelerate's own save records as its step (its accumulation ticks): this run's, not the packed job's."""
    from accelerate.checkpointing import save_accelerator_state
    from safetensors.torch import save_file

    from flux_lora.engines.native.lora import adapter_parameters

    model = accelerator.unwrap_model(training.transformer)
    if accelerator.is_main_process:
        lora = {
            _state_name(n, training.adapter): p.detach().cpu().contiguous()
            for n, p in adapter_parameters(model, training.adapter).items()
        }
        save_file(lora, str(state_dir / LORA_STATE_FILE))
    save_accelerator_state(
        str(state_dir),
        [],
        [training.optimizer],
        [training.scheduler],
        [],
        accelerator.process_index,
        micro_step,
        accelerator.scaler,
    )


def resume_state(accelerator, training: LoraTraining, state_dir: str, say: Callable[[str], None]) -> int:
    """Load a saved state (LoRA, optimizer, scheduler, random streams) with this run's recipe over it; the step it was
    saved at. Call it in the run's turn: the streams it restores are the run's."""
    from accelerate.checkpointing import load_accelerator_state
    from safetensors.torch import load_file

    from flux_lora.engines.native.lora import adapter_parameters

    recipe = optimizer_recipe(training)
    saved = load_file(str(Path(state_dir) / LORA_STATE_FILE))
    with torch.no_grad():
        for name, param in adapter_parameters(accelerator.unwrap_model(training.transformer), training.adapter).items():
            param.copy_(saved[_state_name(name, training.adapter)])
    # As accelerator.load_state chooses: on each process's device with several GPUs, else the CPU (MULTI_CPU too).
    on_device = "on_device" if accelerator.num_processes > 1 and accelerator.multi_device else "cpu"
    restored = load_accelerator_state(
        state_dir,
        [],
        [training.optimizer],
        [training.scheduler],
        [],
        accelerator.process_index,
        accelerator.scaler,
        on_device,
    )
    accelerator.step = restored.get("step", accelerator.step)
    step = json.loads((Path(state_dir) / TRAIN_STATE_FILE).read_text())["current_step"]
    reapplied = reapply_recipe(training, recipe)
    if reapplied:
        say(f"resumed at step {step} with this run's recipe: {'; '.join(reapplied)}")
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

    def __init__(
        self, config: NativeTrainConfig, accelerator, logging_dir: Path, has_classes: bool, label: str
    ) -> None:
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
        self.label = label
        self.clock_seconds = 0.0
        self.clock_from: float | None = None

    def start(self, global_step: int) -> None:
        self.progress = Progress(self.config.max_train_steps, global_step, self.accelerator.is_main_process, self.label)
        self.restart_clock()

    def restart_clock(self) -> None:
        self.clock_seconds, self.clock_from = 0.0, time.perf_counter()

    # The step's clock runs only during the run's own turns: a packed job's run records its own seconds per step,
    # not those of the runs trained between its turns.
    def pause_clock(self) -> None:
        if self.clock_from is not None:
            self.clock_seconds += time.perf_counter() - self.clock_from
            self.clock_from = None

    def resume_clock(self) -> None:
        self.clock_from = time.perf_counter()

    def micro(self, position: int, loss: float, class_samples: int) -> None:
        self.micro_losses.append(loss)
        self.class_samples += class_samples
        self.recorder.add(position, loss)

    def close_step(self) -> float:
        """The optimizer step's loss (the mean of its micro-batches), its time recorded."""
        current = sum(self.micro_losses) / len(self.micro_losses)
        self.micro_losses.clear()
        self.losses.append(current)
        running = time.perf_counter() - self.clock_from if self.clock_from is not None else 0.0
        self.step_seconds.append(self.clock_seconds + running)
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
        training: LoraTraining,
        output_dir: Path,
        metadata: dict[str, str],
        plan: BatchPlan,
        ownership: RunOwnership,
    ) -> None:
        self.config, self.accelerator, self.training, self.output_dir = config, accelerator, training, output_dir
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
        save_state(accelerator, self.training, staging, step * config.gradient_accumulation_steps)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            epoch = self.plan.epoch_of(step)
            (staging / TRAIN_STATE_FILE).write_text(json.dumps({"current_epoch": epoch, "current_step": step}))
            commit_dir(staging, state_dir, step)
            step_meta = dict(
                self.metadata, ss_steps=str(step), ss_epoch=str(epoch), ss_training_finished_at=str(time.time())
            )
            model, adapter = accelerator.unwrap_model(self.training.transformer), self.training.adapter
            atomic_write_file(
                path, lambda partial: save_kohya_lora(model, partial, step_meta, dtype=self.save_dtype, adapter=adapter)
            )
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
        say: Callable[[str], None],
    ) -> None:
        self.config, self.accelerator, self.transformer, self.parts = config, accelerator, transformer, parts
        self.embeddings, self.device, self.weight_dtype, self.output_dir = embeddings, device, weight_dtype, output_dir
        self.stop, self.ownership, self.say = stop, ownership, say
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
                self.say(
                    f"{signal.Signals(self.stop.signum).name}: {index} of {len(config.sample_prompts)} samples written at step {step}"
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


class Cell:
    """One run of the job (a packed job trains several on one base): its adapter, batches, noise and random streams,
    its records, checkpoints and samples, and how far it got. Whatever it does happens in its `turn`."""

    def __init__(
        self,
        config: NativeTrainConfig,
        training: LoraTraining,
        accelerator,
        items: list,
        label: str,
        alone: bool,
        began: float,
    ) -> None:
        self.config, self.training, self.accelerator, self.items, self.label = (
            config,
            training,
            accelerator,
            items,
            label,
        )
        # Its training time: the job's wall time alone; packed, the shared setup and its own turns (not the others').
        self.began, self.alone = began, alone
        self.setup_seconds, self.turn_seconds = time.time() - began, 0.0
        self.ownership = RunOwnership(config.run_dir, alone)
        self.plan = BatchPlan(config, items, accelerator)
        self.log = StepLog(config, accelerator, Path(config.logging_dir), any(i.is_class for i in items), label)
        self.global_step, self.micro_step, self.first_step = 0, 0, 1
        self.last_state: str | None = None
        self.lora_path: Path | None = None
        self.stop_reason: str | None = None
        self.stop_signal, self.nonfinite_step = 0, None
        self.reached_end = False
        self.checkpointer: Checkpointer
        self.sampler: Sampler

    def say(self, line: str) -> None:
        if self.accelerator.is_main_process:
            print(self.label + line, flush=True)

    @contextmanager
    def turn(self) -> Iterator[None]:
        """Its adapter active and its random streams swapped in; a lost lease ends this run only (packed)."""
        from flux_lora.engines.native.lora import use_adapter

        use_adapter(self.accelerator.unwrap_model(self.training.transformer), self.training.adapter)
        self.log.resume_clock()
        turn_began = time.time()
        try:
            with self.training.rng.turn():
                yield
        except RunTakenOver:
            self.stop_reason = "taken_over"
        finally:
            self.log.pause_clock()
            self.turn_seconds += time.time() - turn_began

    @property
    def running(self) -> bool:
        return self.stop_reason is None and not self.reached_end

    def start(self, parts, embeddings: dict, device, weight_dtype, stop: StopRequest) -> None:
        """Resume from a saved state or start from a LoRA file's weights; then its checkpointer, sampler and log."""
        config, accelerator = self.config, self.accelerator
        if config.init_lora and not config.resume_from:  # a resumed state already holds the weights it started from
            from flux_lora.engines.native.lora import load_kohya_lora

            model = accelerator.unwrap_model(self.training.transformer)
            load_kohya_lora(model, Path(config.init_lora), self.training.adapter)
            self.say(f"starting from the LoRA in {config.init_lora}")
        if config.resume_from:
            self.global_step = resume_state(accelerator, self.training, config.resume_from, self.say)
            self.last_state = str(config.resume_from)
        self.first_step = self.global_step + 1
        self.micro_step = self.global_step * config.gradient_accumulation_steps
        output_dir = Path(config.output_dir)
        metadata = run_metadata(config, accelerator, self.training, self.items, self.plan.per_epoch, time.time())
        self.checkpointer = Checkpointer(
            config, accelerator, self.training, output_dir, metadata, self.plan, self.ownership
        )
        model = self.training.transformer
        self.sampler = Sampler(
            config,
            accelerator,
            model,
            parts,
            embeddings,
            device,
            weight_dtype,
            output_dir,
            stop,
            self.ownership,
            self.say,
        )
        self.reached_end = self.global_step >= config.max_train_steps
        self.log.start(self.global_step)

    def train_micro(self, device, weight_dtype) -> None:
        batch_index, position, indices = self.plan.micro_batch(self.micro_step)
        batch = {k: v.to(device) for k, v in collate(self.items, indices).items()}
        loss = train_micro_step(self.training, self.config, self.accelerator, batch, batch_index, weight_dtype)
        self.log.micro(position, loss, sum(self.items[i].is_class for i in indices))
        self.micro_step += 1

    def after_step(self, signum: int, device) -> None:
        """After an optimizer step: what every process saw decides whether it stops (a signal, a non-finite loss, a
        lost lease), saves or samples."""
        config, accelerator = self.config, self.accelerator
        self.global_step += 1
        current = self.log.close_step()
        # Asked before this step writes a byte: every process leaves together when the run was taken over.
        stop_signal, nonfinite, lost = agreed_stop(
            accelerator, signum, not math.isfinite(current), accelerator.is_main_process and self.ownership.lost()
        )
        if lost:
            self.ownership.leave()
        self.log.write(self.global_step, self.training.scheduler.get_last_lr()[0], device)
        last = self.global_step == config.max_train_steps
        periodic = bool(config.save_every_n_steps) and self.global_step % config.save_every_n_steps == 0
        # A finite loss can still leave broken weights behind (the update after it); never save those.
        if nonfinite or ((stop_signal or periodic or last) and not lora_is_finite(self.training.params)):
            self.stop_reason, self.nonfinite_step = "nonfinite_loss", self.global_step
        elif last:
            self.reached_end = True  # the final save comes in finish() (a stop asked for now changes nothing)
        else:
            if stop_signal:
                self.say(stopping_line(stop_signal, self.global_step))
            if stop_signal or periodic:
                self.lora_path, state = self.checkpointer.save(self.global_step, final=False)
                self.last_state = str(state)
            if stop_signal:
                self.stop_reason, self.stop_signal = "signal", stop_signal
            elif config.sample_every_n_steps and self.global_step % config.sample_every_n_steps == 0:
                self.sampler.write(self.global_step)
        self.log.restart_clock()

    def finish(self, stats, device) -> TrainResult:
        """The final state, LoRA and samples when it reached max_train_steps; its result and train_summary.json."""
        self.log.close()
        if self.reached_end and self.stop_reason is None:
            self.lora_path, state = self.checkpointer.save(self.global_step, final=True)
            self.last_state = str(state)
            self.sampler.write(self.global_step)
        if self.log.writer is not None:
            self.log.writer.close()
        log, stop_reason = self.log, self.stop_reason
        result = TrainResult(
            losses=log.losses,
            first_step=self.first_step,
            steps=self.global_step,
            final_loss=log.losses[-1] if log.losses else float("nan"),
            average_loss=log.recorder.average,
            seconds=time.time() - self.began if self.alone else self.setup_seconds + self.turn_seconds,
            step_seconds=log.step_seconds,
            peak_memory_gb=peak_memory_gb(device),
            lora_path=None if self.lora_path is None or stop_reason == "nonfinite_loss" else str(self.lora_path),
            output_dir=self.config.output_dir,
            sample_paths=self.sampler.paths,
            cache=asdict(stats),
            save_seconds=self.checkpointer.save_seconds,
            sample_image_seconds=self.sampler.image_seconds,
            stop_reason=stop_reason,
            stop_signal=self.stop_signal if stop_reason == "signal" else None,
            nonfinite_step=self.nonfinite_step,
            last_state=self.last_state,
        )
        if self.accelerator.is_main_process:
            self.ownership.check()
            write_train_summary(Path(self.config.output_dir) / SUMMARY_FILE, result, self.config)
            if line := ending_line(result):
                self.say(line)
        return result


# ------------------------------------------------------------------------------------------ the job


def run_training(config: NativeTrainConfig) -> TrainResult:
    """Train as configured; SIGTERM/SIGINT during the run stop it after the current optimizer step (TrainResult says so)."""
    (result,) = run_packed([config])  # a job of one run that is taken over exits (RunOwnership.leave)
    assert result is not None
    return result


def run_packed(configs: list[NativeTrainConfig]) -> list[TrainResult | None]:
    """Train runs that share a base (launch.pack) as one job; each result as its separate run's would be."""
    stop = StopRequest()
    stop.install()
    try:
        return train_lora(configs, stop)
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


def train_lora(configs: list[NativeTrainConfig], stop: StopRequest) -> list[TrainResult | None]:
    """The recipe: 1. set up, 2. resume, 3. the loop, 4. save, 5. finish. One config is one run; several (a packed
    job: they share a base, data and batch structure) train an adapter each on one base, each as its own run would."""
    # 1. Set up: accelerate, the model parts, the dataset and prompts encoded (then the text encoders freed), the LoRAs.
    began = time.time()
    for config in configs:
        if config.save_precision not in SAVE_DTYPES:
            raise ValueError(f"save_precision={config.save_precision!r}: expected one of {sorted(SAVE_DTYPES)}")
        if config.resume_from and (problem := state_problem(Path(config.resume_from))):
            raise SystemExit(f"resume_from: {problem}")
    base = configs[0]  # what the runs share comes from the first (launch.pack groups by it)
    accelerator = start_accelerator(base)
    device = accelerator.device
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(base.mixed_precision, torch.float32)
    for config in configs:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        if accelerator.is_main_process:
            write_device_record(Path(config.output_dir) / DEVICE_FILE, accelerator)
    parts = load_parts(base)
    for module in (parts.vae, parts.clip_encoder, parts.t5_encoder):
        module.to(device)
    items, stats = build_train_items(base, parts)
    labels = [f"[{Path(c.run_dir).name}] " if len(configs) > 1 else "" for c in configs]
    if any(item.is_class for item in items) and accelerator.is_main_process:  # the plan as it trains: a test reads it
        for config, label in zip(configs, labels):
            print(label + class_plan_line(items, config), flush=True)
    prompts = list(dict.fromkeys(p["text"] for c in configs for p in c.sample_prompts))
    embeddings = cached_text_embeddings(parts, prompts, TensorCache(base.cache_dir, "text"), stats) if prompts else {}
    free_text_encoders(parts, device)
    adapters = [ADAPTER] if len(configs) == 1 else [f"run{i}" for i in range(len(configs))]
    trainings = prepare_lora_trainings(parts.transformer, configs, adapters, accelerator, weight_dtype)
    cells = [
        Cell(c, t, accelerator, items, label, len(configs) == 1, began)
        for c, t, label in zip(configs, trainings, labels)
    ]
    results: dict[int, TrainResult] = {}

    # 2. Resume: each run from its saved state (LoRA, optimizer, scheduler, random streams) or a LoRA file's weights.
    for cell in cells:
        with cell.turn():
            cell.start(parts, embeddings, device, weight_dtype, stop)
    stop_signal, _, _ = agreed_stop(accelerator, stop.signum or 0, False)  # a signal during setup: nothing new to save
    for cell in cells if stop_signal else []:
        cell.stop_reason, cell.stop_signal = "signal", stop_signal

    # 3. The loop: each running run's micro-batch in its turn (one accumulation tick for all), then after each
    #    optimizer step what every process saw decides whether it stops, saves or samples. A run that ended finishes.
    transformer = trainings[0].transformer
    while active := [cell for cell in cells if cell.running]:
        with accelerator.accumulate(transformer):
            for cell in active:
                with cell.turn():
                    cell.train_micro(device, weight_dtype)
        if not accelerator.sync_gradients:
            continue
        signum = stop.signum or 0  # one reading for all the runs of this step
        for cell in active:
            with cell.turn():
                cell.after_step(signum, device)

    # 4. Save: the final state, LoRA and samples of each run that reached max_train_steps (in Cell.finish, with
    # 5. finish: each run's result and train_summary.json, and a line saying how it ended).
    for index, cell in enumerate(cells):
        if cell.stop_reason != "taken_over":
            with cell.turn():
                results[index] = cell.finish(stats, device)
    accelerator.end_training()
    return [results.get(i) for i in range(len(cells))]  # None: taken over by another launch, nothing written


def job_exit_code(results: list[TrainResult | None]) -> int:
    """A stop by a signal first (the launcher resumes every run), then the first run that did not succeed; every run
    taken over: the lease-lost code."""
    if all(r is None for r in results):
        return LEASE_LOST_EXIT_CODE
    codes = [r.exit_code for r in results if r is not None]
    return next((c for c in codes if c >= 128), next((c for c in codes if c), 0))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    runs: list[list[str]] = []  # [run dir, state to resume from?] ...
    for arg in args:
        if runs and len(runs[-1]) == 2 and runs[-1][1] == "--resume":
            runs[-1][1] = arg
        elif arg == "--resume" and runs and len(runs[-1]) == 1:
            runs[-1].append(arg)
        else:
            runs.append([arg])
    if not runs or any(len(run) == 2 and run[1] == "--resume" for run in runs):
        print(
            "usage: accelerate launch -m flux_lora.engines.native.train <run dir | native_config.json> "
            "[--resume STATE_DIR] [<run dir> [--resume STATE_DIR] ...]",
            file=sys.stderr,
        )
        return 2
    # The launcher passes run directories; the job reads only the config frozen in each. A resumed attempt names its
    # state on the command line, so the frozen config stays as it was.
    configs = []
    for run in runs:
        frozen = Path(run[0])
        config = NativeTrainConfig.from_json(frozen / CONFIG_FILE if frozen.is_dir() else frozen)
        if len(run) == 2:
            config.resume_from = run[1]
        configs.append(config)
    try:
        results = run_packed(configs)
    except WriteFailed as failed:  # one line, and the exit code the launcher reads as failed; earlier states stay
        print(
            f"error: {failed}; the states saved before it are kept: free some space and launch again to resume",
            flush=True,
        )
        return EXIT_WRITE_FAILED
    labels = [f"[{Path(c.run_dir).name}] " if len(configs) > 1 else "" for c in configs]
    for label, result in zip(labels, results):
        if result is not None and result.stop_reason is None:
            print(
                f"{label}done: {result.steps} steps, final loss {result.final_loss:.4f}, LoRA {result.lora_path}",
                flush=True,
            )
    return job_exit_code(results)


if __name__ == "__main__":
    code = main()
    # Everything is written, flushed and closed (LoRA, states, summary, TensorBoard's writer in end_training): skip the
    # interpreter's teardown of torch, diffusers and peft's ~4000 modules, which holds each job ~1.8 s after its work.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
