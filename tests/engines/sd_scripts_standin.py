"""Stand-in for kohya-ss sd-scripts' flux_train_network.py, for tests that cannot train FLUX.

It parses the command line with a parser built from the pinned parser's option table (the packaged
sd_scripts_flux_args.json), finds the images the way sd-scripts does (one folder per subset, no
recursion), counts epochs, optimizer steps and resumed steps with sd-scripts' own arithmetic
(including its --skip_until_initial_step bug), and writes what sd-scripts would write, under its
names: step and final LoRA files (kohya keys, ss_* metadata), state folders with train_state.json,
and a TensorBoard run. Nothing is trained: the loss is made up.

The LoRA files hold zeros of made-up shapes, unless FLUX_LORA_STANDIN_LORA=tiny: then they are real kohya
LoRAs for the tiny model (flux_lora model=tiny: its module names and shapes, non-zero up weights that differ per
step), so the evaluator can judge the run with `--base-model tiny`.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time
from pathlib import Path

import flux_lora.engines

# The packaged option table; found through the package because tests copy this file into a fake checkout.
OPTIONS_JSON = Path(flux_lora.engines.__file__).with_name("sd_scripts_flux_args.json")


def _int_or_float(text: str) -> float:
    # Same rule as sd-scripts' train_util.int_or_float: a percentage, a fraction below 1, or an int.
    if text.endswith("%"):
        return float(text[:-1]) / 100.0
    return int(text) if float(text) >= 1 else float(text)


TYPES = {"int": int, "float": float, "str": str, "Path": Path, "int_or_float": _int_or_float, None: None}


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flux_train_network.py (stand-in)", allow_abbrev=False)
    for option in json.loads(OPTIONS_JSON.read_text(encoding="utf-8"))["options"]:
        kwargs: dict = {"dest": option["dest"], "default": option["default"]}
        if option["action"] == "store_true":
            kwargs["action"] = "store_true"
        else:
            kwargs.update(type=TYPES[option["type"]], choices=option["choices"], nargs=option["nargs"])
        parser.add_argument(*option["option_strings"], **kwargs)
    return parser


def check_run_files(args: argparse.Namespace) -> None:
    if args.sample_prompts:
        assert Path(args.sample_prompts).is_file(), f"sample prompts {args.sample_prompts} missing"


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def dataset_subsets(args: argparse.Namespace) -> list[tuple[Path, int, bool]]:
    import tomllib

    dataset = tomllib.loads(Path(args.dataset_config).read_text(encoding="utf-8"))
    return [
        (Path(s["image_dir"]), int(s.get("num_repeats", 1)), bool(s.get("is_reg", False)))
        for d in dataset["datasets"]
        for s in d["subsets"]
    ]


def subset_images(folder: Path) -> list[Path]:
    # each subset folder is read WITHOUT recursion, hidden files skipped, sorted by path (train_util.glob_images)
    return (
        sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        if folder.is_dir()
        else []
    )


def registered_images(args: argparse.Namespace) -> tuple[int, dict[Path, int], int]:
    """(subject images with repeats, class image -> times per epoch, kohya's num_reg_images), as DreamBoothDataset
    registers them: class images, in subset then path order, each with its num_repeats until they fill as many places
    as the subject's images; if they run out first, one more repeat each in turn."""
    num_train, num_reg, reg_infos = 0, 0, []
    for folder, repeats, is_reg in dataset_subsets(args):
        found = subset_images(folder)
        if is_reg:
            num_reg += repeats * len(found)
            reg_infos += [[path, repeats] for path in found]
        else:
            num_train += repeats * len(found)
    registered: dict[Path, int] = {}
    n, first_loop = 0, True
    while reg_infos and n < num_train:
        for info in reg_infos:
            if first_loop:
                registered[info[0]] = info[1]
                n += info[1]
            else:
                registered[info[0]] += 1
                n += 1
            if n >= num_train:
                break
        first_loop = False
    return num_train, registered, num_reg


def batches_per_epoch(args: argparse.Namespace) -> int:
    """len(train_dataloader): the subject's images and the registered class images with their repeats; bucketing is
    left out (one bucket), so this is exact for a single-bucket dataset."""
    num_train, registered, _ = registered_images(args)
    return math.ceil((num_train + sum(registered.values())) / args.train_batch_size)


STANDIN_LORA_ENV = "FLUX_LORA_STANDIN_LORA"


@functools.cache
def _tiny_transformer_with_lora(rank: int, alpha: float):
    from flux_lora.engines.native.lora import add_flux_lora
    from flux_lora.engines.native.models import build_tiny_flux

    transformer = build_tiny_flux().transformer
    add_flux_lora(transformer, rank, alpha, dropout=None)
    return transformer


def tiny_lora_tensors(rank: int, alpha: float, step: int) -> dict:
    """A real kohya LoRA of the tiny model: peft's down init, up weights drawn from the step (zero up does nothing)."""
    import torch

    from flux_lora.engines.native.lora import kohya_state_dict

    transformer = _tiny_transformer_with_lora(rank, alpha)
    generator = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return kohya_state_dict(transformer)


def placeholder_lora_tensors(rank: int, alpha: float) -> dict:
    import torch

    tensors = {}
    for module in ("lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"):
        tensors[f"{module}.lora_down.weight"] = torch.zeros(rank, 16)
        tensors[f"{module}.lora_up.weight"] = torch.zeros(48, rank)
        tensors[f"{module}.alpha"] = torch.tensor(float(alpha))
    return tensors


def save_lora(path: Path, args: argparse.Namespace, step: int) -> None:
    from safetensors.torch import save_file

    rank = args.network_dim or 4
    if os.environ.get(STANDIN_LORA_ENV) == "tiny":
        tensors = tiny_lora_tensors(rank, float(args.network_alpha or rank), step)
    else:
        tensors = placeholder_lora_tensors(rank, args.network_alpha)
    metadata = {
        "ss_network_module": str(args.network_module),
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(args.network_alpha),
        "ss_network_dropout": str(args.network_dropout),
        "ss_learning_rate": str(args.learning_rate),
        "ss_max_train_steps": str(args.max_train_steps),
        "ss_gradient_accumulation_steps": str(args.gradient_accumulation_steps),
        "ss_mixed_precision": str(args.mixed_precision),
        "ss_optimizer": str(args.optimizer_type),
        "ss_steps": str(step),
        "ss_seed": str(args.seed),
        "ss_num_train_images": str(registered_images(args)[0]),
        "ss_num_reg_images": str(registered_images(args)[2]),
        "ss_prior_loss_weight": str(args.prior_loss_weight),
        "modelspec.architecture": "flux-1-dev/lora",
    }
    # Like sd-scripts, these are recorded even though its FLUX trainer ignores them.
    for name in ("noise_offset", "min_snr_gamma"):
        if getattr(args, name) is not None:
            metadata[f"ss_{name}"] = str(getattr(args, name))
    save_file(tensors, str(path), metadata=metadata)


def save_state(state_dir: Path, step: int) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "train_state.json").write_text(json.dumps({"current_epoch": 1, "current_step": step}))


def resume_arithmetic(args: argparse.Namespace, steps_from_state: int | None, loader_len: int) -> tuple[int, int, int]:
    """(epoch_to_start, initial micro-batches to skip, starting global_step), as train_network.py:1232-1273 and
    1340-1344 compute them at the pinned commit, including the --skip_until_initial_step bug with accumulation > 1."""
    accumulation = args.gradient_accumulation_steps
    updates_per_epoch = math.ceil(loader_len / accumulation)
    initial_step = 0
    if args.initial_epoch is not None or args.initial_step is not None:
        if args.initial_step is not None:
            initial_step = args.initial_step
        else:
            initial_step = (args.initial_epoch - 1) * updates_per_epoch
    elif steps_from_state is not None:
        initial_step = steps_from_state
    if initial_step > 0:
        assert args.max_train_steps > initial_step, (
            f"max_train_steps should be greater than initial step: {args.max_train_steps} vs {initial_step}"
        )
    epoch_to_start = 0
    if initial_step > 0:
        if args.skip_until_initial_step:
            initial_step *= accumulation  # micro-batches ...
            epoch_to_start = initial_step // updates_per_epoch  # ... divided by optimizer steps per epoch (#2407)
        else:
            epoch_to_start = initial_step // updates_per_epoch
            initial_step = 0
    global_step = 0
    if initial_step > 0:
        for _ in range(epoch_to_start):
            initial_step -= loader_len
        global_step = initial_step
    return epoch_to_start, initial_step, global_step


def main() -> None:
    args = setup_parser().parse_args()
    check_run_files(args)
    loader_len = batches_per_epoch(args)
    num_train, registered, num_reg = registered_images(args)
    # sd-scripts logs these (train_util.py) and the class images' places per epoch follow from them
    print(f"{num_train} train images with repeats.", flush=True)
    print(f"{num_reg} reg images with repeats.", flush=True)
    if num_reg:
        print(f"reg images per epoch (stand-in): {json.dumps({p.name: n for p, n in registered.items()})}", flush=True)
    if loader_len == 0:
        # sd-scripts logs this and returns: exit code 0 with nothing trained (train_network.py:575-579).
        print(
            "No data found. Please verify arguments (train_data_dir must be the parent of folders with images)",
            flush=True,
        )
        return
    from torch.utils.tensorboard import SummaryWriter

    output_dir, name = Path(args.output_dir), args.output_name or "last"
    output_dir.mkdir(parents=True, exist_ok=True)
    steps_from_state = None
    if args.resume:
        steps_from_state = json.loads((Path(args.resume) / "train_state.json").read_text())["current_step"]
        print(f"load train state from {args.resume}: current_step {steps_from_state}", flush=True)
    epoch_to_start, initial_step, global_step = resume_arithmetic(args, steps_from_state, loader_len)
    print(
        f"resume arithmetic: epoch_to_start={epoch_to_start} initial_step={initial_step} global_step={global_step}",
        flush=True,
    )
    accumulation = args.gradient_accumulation_steps
    num_train_epochs = math.ceil(args.max_train_steps / math.ceil(loader_len / accumulation))
    log_dir = Path(args.logging_dir) / f"{args.log_prefix or ''}{time.strftime('%Y%m%d%H%M%S')}" / "network_train"
    writer = SummaryWriter(str(log_dir)) if args.log_with in ("tensorboard", "all") else None
    losses: list[float] = []
    trained = 0
    current_step = global_step
    for _epoch in range(epoch_to_start, num_train_epochs):
        skip = 0
        if initial_step > 0:
            skip, initial_step = initial_step, 0
        accumulated = 0
        for micro in range(loader_len):
            current_step = global_step
            if micro < skip:
                continue
            # accelerate syncs (an optimizer step) every `accumulation` batches and at the end of the dataloader
            accumulated += 1
            if accumulated % accumulation and micro + 1 != loader_len:
                continue
            accumulated = 0
            global_step += 1
            trained += 1
            loss = 0.5 / (1.0 + 0.05 * global_step)  # made up and decreasing: nothing is trained
            losses.append(loss)
            if writer is not None:
                writer.add_scalar("loss/current", loss, global_step)
                writer.add_scalar("loss/average", sum(losses) / len(losses), global_step)
                writer.add_scalar("lr/unet", args.learning_rate, global_step)
            print(f"steps: {global_step}/{args.max_train_steps} loss={loss:.4f}", flush=True)
            if args.save_every_n_steps and global_step % args.save_every_n_steps == 0:
                save_lora(output_dir / f"{name}-step{global_step:08d}.safetensors", args, global_step)
                if args.save_state:
                    save_state(output_dir / f"{name}-step{global_step:08d}-state", global_step)
            if global_step >= args.max_train_steps:
                break
        if global_step >= args.max_train_steps:
            break
    if writer is not None:
        writer.close()
    print(f"trained {trained} optimizer steps", flush=True)
    save_lora(output_dir / f"{name}.safetensors", args, global_step)
    if args.save_state or args.save_state_on_train_end:
        save_state(
            output_dir / f"{name}-state", current_step + 1
        )  # sd-scripts writes current_step + 1 (train_network.py:948)
    print(f"model saved: {output_dir / f'{name}.safetensors'}", flush=True)


class FluxNetworkTrainer:
    """The pre-training checks of FluxNetworkTrainer that the launcher's engine preflight runs."""

    def get_latents_caching_strategy(self, args: argparse.Namespace) -> str:
        return "flux latents"

    def assert_extra_args(self, args: argparse.Namespace, train_dataset_group, val_dataset_group) -> None:
        # The base trainer's check comes first (train_network.py:175), then FLUX's own (flux_train_network.py:95).
        train_dataset_group.verify_bucket_reso_steps(64)
        train_dataset_group.verify_bucket_reso_steps(32)
        assert not (args.blocks_to_swap and args.cpu_offload_checkpointing), (
            "blocks_to_swap is not supported with cpu_offload_checkpointing"
        )


if __name__ == "__main__":
    main()
