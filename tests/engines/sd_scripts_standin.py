"""Stand-in for kohya-ss sd-scripts' flux_train_network.py, for tests that cannot train FLUX.

It parses the command line with a parser built from the pinned parser's option table (the packaged
sd_scripts_flux_args.json), checks the run-directory files it is given, and writes what sd-scripts
would write, under sd-scripts' names: step and final LoRA files (kohya keys, ss_* metadata), state
folders with train_state.json, and a TensorBoard run. Nothing is trained: the loss is made up.
"""

from __future__ import annotations

import argparse
import json
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
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    dataset = tomllib.loads(Path(args.dataset_config).read_text(encoding="utf-8"))
    for subset in dataset["datasets"][0]["subsets"]:
        assert Path(subset["image_dir"]).is_dir(), f"image_dir {subset['image_dir']} is not a directory"
    if args.sample_prompts:
        assert Path(args.sample_prompts).is_file(), f"sample prompts {args.sample_prompts} missing"


def save_lora(path: Path, args: argparse.Namespace, step: int) -> None:
    import torch
    from safetensors.torch import save_file

    rank = args.network_dim or 4
    tensors = {}
    for module in ("lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"):
        tensors[f"{module}.lora_down.weight"] = torch.zeros(rank, 16)
        tensors[f"{module}.lora_up.weight"] = torch.zeros(48, rank)
        tensors[f"{module}.alpha"] = torch.tensor(float(args.network_alpha))
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


def first_step(args: argparse.Namespace) -> int:
    # sd-scripts restarts global_step at 0 on --resume unless --skip_until_initial_step is given.
    if not args.resume or not args.skip_until_initial_step:
        return 0
    return json.loads((Path(args.resume) / "train_state.json").read_text())["current_step"]


def main() -> None:
    args = setup_parser().parse_args()
    check_run_files(args)
    from torch.utils.tensorboard import SummaryWriter

    output_dir, name = Path(args.output_dir), args.output_name or "last"
    output_dir.mkdir(parents=True, exist_ok=True)
    log_dir = Path(args.logging_dir) / f"{args.log_prefix or ''}{time.strftime('%Y%m%d%H%M%S')}" / "network_train"
    writer = SummaryWriter(str(log_dir)) if args.log_with in ("tensorboard", "all") else None
    losses: list[float] = []
    for step in range(first_step(args) + 1, args.max_train_steps + 1):
        loss = 0.5 / (1.0 + 0.05 * step)  # made up and decreasing: nothing is trained
        losses.append(loss)
        if writer is not None:
            writer.add_scalar("loss/current", loss, step)
            writer.add_scalar("loss/average", sum(losses) / len(losses), step)
            writer.add_scalar("lr/unet", args.learning_rate, step)
        print(f"steps: {step}/{args.max_train_steps} loss={loss:.4f}", flush=True)
        if args.save_every_n_steps and step % args.save_every_n_steps == 0:
            save_lora(output_dir / f"{name}-step{step:08d}.safetensors", args, step)
            if args.save_state:
                save_state(output_dir / f"{name}-step{step:08d}-state", step)
    if writer is not None:
        writer.close()
    save_lora(output_dir / f"{name}.safetensors", args, args.max_train_steps)
    if args.save_state or args.save_state_on_train_end:
        save_state(output_dir / f"{name}-state", args.max_train_steps)
    print(f"model saved: {output_dir / f'{name}.safetensors'}", flush=True)


if __name__ == "__main__":
    main()
