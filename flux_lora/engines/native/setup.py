"""Setting up a native run: the model parts, the fp8 base and block swap, the LoRA, the optimizer and scheduler
under accelerate, and a record of the device it trains on."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flux_lora.engines.native.config import NativeTrainConfig
from flux_lora.engines.native.rng import RngSlot


def load_parts(config: NativeTrainConfig):
    from flux_lora.engines.native import models

    if config.model_kind == "tiny":
        return models.build_tiny_flux(init_seed=config.init_seed, t5_max_length=config.t5_max_length)
    return models.load_flux_dev(
        transformer=config.transformer_path,
        vae=config.vae_path,
        clip_l=config.clip_l_path,
        t5xxl=config.t5xxl_path,
        diffusers_dir=config.diffusers_dir,
        tokenizer_dir=config.tokenizer_dir,
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
        apply_group_offloading(
            leaf,
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="leaf_level",
            use_stream=device.type == "cuda",
        )
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
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps * num_processes,
        num_training_steps=config.max_train_steps * num_processes,
        num_cycles=config.lr_scheduler_num_cycles,
    )


@dataclass
class LoraTraining:
    """One run's LoRA on the transformer, ready to step: what the loop and the GPU benchmark both run. A packed job
    holds several on one transformer, each with its adapter, optimizer, scheduler and random streams."""

    transformer: nn.Module  # wrapped by accelerate; shared by the runs of a packed job
    optimizer: torch.optim.Optimizer
    scheduler: object
    params: list[nn.Parameter]
    fp8_linears: int
    block_swap: bool
    adapter: str
    rng: RngSlot


def prepare_lora_training(
    transformer: nn.Module, config: NativeTrainConfig, accelerator, weight_dtype: torch.dtype
) -> LoraTraining:
    """One run: the packed setup with one adapter (peft's default name)."""
    from flux_lora.engines.native.lora import ADAPTER

    return prepare_lora_trainings(transformer, [config], [ADAPTER], accelerator, weight_dtype)[0]


def prepare_lora_trainings(
    transformer: nn.Module,
    configs: list[NativeTrainConfig],
    adapters: list[str],
    accelerator,
    weight_dtype: torch.dtype,
) -> list[LoraTraining]:
    """Base frozen in the compute dtype (or fp8), one LoRA per config in fp32, checkpointing, optimizers, block swap.
    The configs share what the base, the data and accelerate see (launch.pack's key); each LoRA starts from its own
    seed, as its separate run's would."""
    from accelerate.utils import set_seed
    from diffusers.training_utils import cast_training_params

    from flux_lora.engines.native.lora import add_flux_lora

    first = configs[0]
    transformer.requires_grad_(False)
    transformer.to(dtype=weight_dtype)
    lora_params, slots = [], []
    for config, adapter in zip(configs, adapters):
        set_seed(config.seed)  # the LoRA's initial weights: a separate run draws them right after this seed
        lora_params.append(
            add_flux_lora(transformer, config.network_dim, config.network_alpha, config.network_dropout, adapter)
        )
        # The initial weights are the same on every process; from here on each process draws its own dropout masks.
        set_seed(config.seed + accelerator.process_index)
        slots.append(RngSlot())
    for params in lora_params:  # adding an adapter froze the ones added before it
        for param in params:
            param.requires_grad_(True)
    cast_training_params(transformer, dtype=torch.float32)
    fp8_linears = store_base_in_fp8(transformer) if first.fp8_base else 0
    if first.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    optimizers = [build_optimizer(config, params) for config, params in zip(configs, lora_params)]
    schedulers = [build_scheduler(config, opt, accelerator.num_processes) for config, opt in zip(configs, optimizers)]
    transformer, *prepared = accelerator.prepare(transformer, *optimizers, *schedulers)
    optimizers, schedulers = prepared[: len(configs)], prepared[len(configs) :]
    block_swap = bool(first.blocks_to_swap) and accelerator.device.type == "cuda"
    if block_swap:
        enable_block_swap(accelerator.unwrap_model(transformer), first.blocks_to_swap, accelerator.device)
    return [
        LoraTraining(transformer, optimizer, scheduler, params, fp8_linears, block_swap, adapter, slot)
        for optimizer, scheduler, params, adapter, slot in zip(optimizers, schedulers, lora_params, adapters, slots)
    ]


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


DEVICE_FILE = "device.json"


def free_text_encoders(parts, device: torch.device) -> None:
    """The prompts are encoded and cached: the text encoders' memory goes back before the LoRA is built."""
    import gc

    parts.clip_encoder = parts.t5_encoder = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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
