"""Seconds per optimizer step and peak GPU memory of the native engine, per GPU tier, on a FLUX.1-dev-sized
transformer with random weights.

For each tier in conf/gpu (rtx4090, a6000, h100, h200) and each resolution up to the tier's max_resolution,
the script sets the model up the way the training job does (bf16 base, fp8 base and block swap when the tier
says so, the LoRA of the profile's rank, gradient checkpointing, AdamW8bit from conf/optimizer under accelerate), then
times optimizer steps (each one batch_size x gradient_accumulation_steps images) of the real flow-matching
loss on random packed latents, T5 embeddings and CLIP pooled vectors. The emulated tier is not the card the
script runs on: "peak GB" says whether the tier's setting would fit its card's memory, "s/step" is the speed
of the card it ran on. Results are appended to benchmarks/results/<gpu-name>.json, one entry per run.

    python benchmarks/bench_native_gpu.py [--tiers h100 h200] [--resolutions 512 1024] [--steps 5 --warmup 2]
    python benchmarks/bench_native_gpu.py --device cpu --tiny     # check the script on a CPU (64 / 128 px)
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
import yaml

from flux_lora.engines.native.config import NativeTrainConfig
from flux_lora.engines.native.engine import composed_native_config
from flux_lora.engines.native.models import MODEL_CONFIGS
from flux_lora.engines.native.records import peak_memory_gb
from flux_lora.engines.native.setup import prepare_lora_training
from flux_lora.engines.native.train import train_micro_step

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
RESULTS = REPO / "benchmarks" / "results"
TIERS = ("rtx4090", "a6000", "h100", "h200")
GPU_RESOLUTIONS = (512, 768, 1024)
TINY_RESOLUTIONS = (64, 128)
# A FLUX.1-dev-shaped transformer a CPU steps through in well under a second.
TINY_OVERRIDES = {
    "num_layers": 2,
    "num_single_layers": 2,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "axes_dims_rope": [4, 6, 6],
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
}
NO_CUDA = "no CUDA device: run on a GPU box, or pass --device cpu --tiny to check the script"


@dataclass
class Setting:
    tier: str
    resolution: int
    tier_memory_gb: float
    config: NativeTrainConfig


def read_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


# The job config names a run folder; these benchmarks write nothing into it.
BENCH_RUN_DIR = Path(tempfile.gettempdir()) / "flux-lora-bench-run"


def settings_to_measure(
    tiers: list[str], resolutions: list[int], profile: str, tiny: bool, device: torch.device
) -> list[Setting]:
    """One NativeTrainConfig per (tier, resolution) the tier allows, filled from the conf files the launcher composes."""
    recipe = read_yaml(CONF / "profile" / f"{profile}.yaml")
    optimizer = read_yaml(CONF / "optimizer" / "adamw8bit.yaml")
    t5_tokens = read_yaml(CONF / "model" / "flux_dev.yaml")["t5xxl_max_token_length"]
    settings = []
    for tier in tiers:
        gpu = read_yaml(CONF / "gpu" / f"{tier}.yaml")
        for resolution in resolutions:
            # Tiny resolutions stand in for the GPU ones, so every tier runs them.
            if not tiny and resolution > gpu["max_resolution"]:
                continue
            config = composed_native_config(
                [f"profile={profile}", f"gpu={tier}"],
                BENCH_RUN_DIR,
                model_kind="tiny" if tiny else "flux_dev",
                t5_max_length=t5_tokens,
                resolution=resolution,
                network_dim=recipe["network_dim"],
                network_alpha=float(recipe["network_alpha"]),
                network_dropout=recipe.get("network_dropout"),
                learning_rate=float(recipe["learning_rate"]),
                noise_offset=recipe.get("noise_offset", 0.0),
                min_snr_gamma=recipe.get("min_snr_gamma"),
                batch_size=gpu["batch_size"],
                gradient_accumulation_steps=gpu["gradient_accumulation_steps"],
                blocks_to_swap=gpu["blocks_to_swap"],
                fp8_base=gpu["fp8_base"],
                use_cpu=device.type == "cpu",
                optimizer=optimizer["name"],
                optimizer_args={k: v for k, v in optimizer.items() if k != "name"},
            )
            settings.append(Setting(tier, resolution, float(gpu["memory_gb"]), config))
    return settings


def transformer_config(tiny: bool) -> dict:
    config = json.loads((MODEL_CONFIGS / "transformer" / "config.json").read_text())
    return {**config, **TINY_OVERRIDES} if tiny else config


def build_random_transformer(config: dict, device: torch.device, seed: int):
    """The shipped architecture with random weights, allocated straight on `device` in bf16 (no fp32 copy, no files)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights(include_buffers=True):
        model = FluxTransformer2DModel.from_config(config)
    model = model.to(dtype=torch.bfloat16).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:  # unit-variance outputs for unit-variance inputs, so activations stay finite
                param.normal_(0.0, param.shape[1] ** -0.5, generator=generator)
            elif name.endswith("weight"):  # RMSNorm scales
                param.fill_(1.0)
            else:
                param.zero_()
    return model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def measure(
    setting: Setting, *, tiny: bool, device: torch.device, steps: int, warmup: int, seed: int, stage: list
) -> dict:
    """Set up as run_training does, then time `warmup + steps` optimizer steps; `stage[0]` names where an OOM hit."""
    from flux_lora.engines.native.train import start_accelerator

    config = setting.config
    stage[0] = "setup"
    accelerator = start_accelerator(config)  # the job's own: a fresh accelerate state, seeded
    weight_dtype = torch.bfloat16

    # The job's own setup: bf16 base, LoRA in fp32, fp8 base, checkpointing, optimizer, prepare, block swap.
    transformer = build_random_transformer(transformer_config(tiny), device, seed)  # already in weight_dtype
    training = prepare_lora_training(transformer, config, accelerator, weight_dtype)
    synchronize(device)
    setup_peak = peak_memory_gb(device)

    # Random stand-ins for one cached batch, kept on the CPU in bf16 like the job's caches.
    model_config = accelerator.unwrap_model(training.transformer).config
    generator = torch.Generator().manual_seed(seed)
    b, side = config.batch_size, setting.resolution // 8
    batch = {
        "latents": torch.randn(b, 16, side, side, generator=generator).to(torch.bfloat16),
        "pooled": torch.randn(b, model_config.pooled_projection_dim, generator=generator).to(torch.bfloat16),
        "t5": torch.randn(b, config.t5_max_length, model_config.joint_attention_dim, generator=generator).to(
            torch.bfloat16
        ),
    }

    micro_step = 0
    losses = []

    def optimizer_step() -> None:
        nonlocal micro_step
        for _ in range(config.gradient_accumulation_steps):
            on_device = {k: v.to(device) for k, v in batch.items()}
            # The job reads every micro-step's loss too (a device sync), so the timing includes it.
            with accelerator.accumulate(training.transformer):
                losses.append(train_micro_step(training, config, accelerator, on_device, micro_step, weight_dtype))
            micro_step += 1
        if not accelerator.sync_gradients:
            raise RuntimeError("accumulation out of step: the last micro-step did not update the weights")

    stage[0] = "steps"
    reset_peak(device)
    for _ in range(warmup):
        optimizer_step()
    seconds = []
    for _ in range(steps):
        synchronize(device)
        began = time.perf_counter()
        optimizer_step()
        synchronize(device)
        seconds.append(time.perf_counter() - began)
    seconds_per_step = sum(seconds) / len(seconds)
    return {
        "status": "ok",
        "seconds_per_step": seconds_per_step,
        "seconds_per_image": seconds_per_step / (config.batch_size * config.gradient_accumulation_steps),
        "step_seconds": seconds,
        "peak_memory_gb": peak_memory_gb(device),
        "setup_peak_memory_gb": setup_peak,
        "fp8_linears": training.fp8_linears,
        "block_swap_applied": training.block_swap,
        "final_loss": losses[-1],
    }


def measure_or_oom(setting: Setting, **kwargs) -> dict:
    row = {
        "tier": setting.tier,
        "resolution": setting.resolution,
        "batch_size": setting.config.batch_size,
        "gradient_accumulation_steps": setting.config.gradient_accumulation_steps,
        "blocks_to_swap": setting.config.blocks_to_swap,
        "fp8_base": setting.config.fp8_base,
        "network_dim": setting.config.network_dim,
        "network_alpha": setting.config.network_alpha,
        "tier_memory_gb": setting.tier_memory_gb,
    }
    device = kwargs["device"]
    row["block_swap_applied"] = (
        bool(setting.config.blocks_to_swap) and device.type == "cuda"
    )  # the job swaps only on CUDA
    reset_peak(device)
    stage = ["setup"]
    try:
        row.update(measure(setting, stage=stage, **kwargs))
    except torch.OutOfMemoryError:
        row.update(status="OOM", stage=stage[0], peak_memory_gb=peak_memory_gb(device))
    except Exception as error:  # one broken setting (e.g. block swap) must not lose the rest of a GPU session
        traceback.print_exc()
        row.update(
            status="error",
            stage=stage[0],
            error=f"{type(error).__name__}: {error}"[:500],
            peak_memory_gb=peak_memory_gb(device),
        )
    # Everything the setting allocated is unreachable once measure() has returned or its exception is gone.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def environment(device: torch.device, tiny: bool) -> dict:
    import bitsandbytes
    import diffusers
    import peft

    record = {
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": str(device),
        "model": "tiny FLUX (shipped config, shrunk)"
        if tiny
        else "FLUX.1-dev transformer (shipped config), random weights",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "python": platform.python_version(),
        "git_commit": _command(["git", "-C", str(REPO), "rev-parse", "HEAD"]),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        record.update(
            gpu_name=torch.cuda.get_device_name(device),
            gpu_memory_gb=props.total_memory / 2**30,
            compute_capability=f"{props.major}.{props.minor}",
            driver=_command(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", f"--id={device.index or 0}"]
            ),
        )
    else:
        record.update(gpu_name=None, cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return record


def _command(argv: list[str]) -> str | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def print_table(rows: list[dict], header: str) -> None:
    baseline = next((r for r in rows if r["status"] == "ok"), None)
    print(header)
    print(
        f"{'tier':8} {'px':>5} {'batch':>5} {'accum':>5} {'swap':>4} {'fp8':>3} {'s/step':>8} {'s/image':>8} "
        f"{'x first':>7} {'peak GB':>8} {'setup GB':>8} {'tier GB':>7}  status"
    )
    for r in rows:
        head = (
            f"{r['tier']:8} {r['resolution']:>5} {r['batch_size']:>5} {r['gradient_accumulation_steps']:>5} "
            f"{r['blocks_to_swap'] if r['block_swap_applied'] else '-':>4} {'yes' if r['fp8_base'] else 'no':>3}"
        )
        if r["status"] == "ok":
            ratio = r["seconds_per_image"] / baseline["seconds_per_image"]
            print(
                f"{head} {r['seconds_per_step']:8.3f} {r['seconds_per_image']:8.3f} {ratio:7.2f} "
                f"{r['peak_memory_gb']:8.2f} {r['setup_peak_memory_gb']:8.2f} {r['tier_memory_gb']:7.0f}  ok"
            )
        else:
            print(
                f"{head} {'-':>8} {'-':>8} {'-':>7} {r['peak_memory_gb']:8.2f} {'-':>8} {r['tier_memory_gb']:7.0f}  "
                f"{r['status']} in {r['stage']}" + (f": {r['error'][:80]}" if "error" in r else "")
            )
    if baseline is not None:
        print(f"x first: s/image relative to {baseline['tier']} at {baseline['resolution']} px, measured in this run")


def append_run(path: Path, run: dict) -> None:
    """One file per GPU model; each run is appended so split runs (--tiers, --resolutions) accumulate."""
    data = json.loads(path.read_text()) if path.exists() else {"gpu_name": run["environment"]["gpu_name"], "runs": []}
    data["runs"].append(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def save_results(args: argparse.Namespace, env: dict, rows: list[dict], suffix: str) -> None:
    """Append this run to --out, or to benchmarks/results/<gpu-name><suffix>.json (a tiny check saves nothing unless asked)."""
    out = args.out or (None if args.tiny else RESULTS / f"{slug(env['gpu_name'])}{suffix}.json")
    if out is None:
        return
    append_run(
        out,
        {
            "environment": env,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "rows": rows,
        },
    )
    print(f"results appended to {out}")


def add_common_arguments(
    parser: argparse.ArgumentParser, *, resolutions_help: str, steps_help: str, out_name: str
) -> None:
    """The options every GPU benchmark here shares (device, tiny check, resolutions, timing, seed, results file)."""
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (cpu needs --tiny)")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny FLUX config at 64/128 px: checks the script, measures nothing useful"
    )
    parser.add_argument(
        "--resolutions", nargs="+", type=int, default=None, help=f"default {resolutions_help} (tiny: 64 128)"
    )
    parser.add_argument("--steps", type=int, default=5, help=steps_help)
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before them")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"results file (default benchmarks/results/{out_name}; with --tiny, none unless given)",
    )


def benchmark_device(args: argparse.Namespace) -> torch.device | None:
    """The device to measure on, made current; None (after saying why on stderr) when the options cannot run here."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return None
    if device.type != "cuda" and not args.tiny:
        print("the full-size model only runs on CUDA: pass --tiny with --device cpu", file=sys.stderr)
        return None
    if device.type == "cuda":
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)  # accelerate places the native engine's model on the current device
    if args.tiny and device.type == "cpu":
        torch.set_num_threads(
            1
        )  # tiny matrices: OpenMP barriers cost more than a second thread gives (20x on a busy 2-core box)
    return device


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(
        parser,
        resolutions_help="512 768 1024",
        steps_help="timed optimizer steps per setting",
        out_name="<gpu-name>.json",
    )
    parser.add_argument("--tiers", nargs="+", default=list(TIERS), choices=TIERS)
    parser.add_argument("--profile", default="fast", help="conf/profile file for rank, alpha, dropout, noise offset")
    args = parser.parse_args()
    device = benchmark_device(args)
    if device is None:
        return 2
    resolutions = args.resolutions or list(TINY_RESOLUTIONS if args.tiny else GPU_RESOLUTIONS)
    settings = settings_to_measure(args.tiers, resolutions, args.profile, args.tiny, device)
    env = environment(device, args.tiny)
    rows = []
    for setting in settings:
        print(f"measuring {setting.tier} at {setting.resolution} px ...", flush=True)
        rows.append(
            measure_or_oom(setting, tiny=args.tiny, device=device, steps=args.steps, warmup=args.warmup, seed=args.seed)
        )

    on = env["gpu_name"] or f"CPU ({env['threads']} threads)"
    if not settings:
        raise SystemExit("no setting to measure: every resolution is above the chosen tiers' max_resolution")
    recipe = settings[0].config
    memory = "CUDA max allocated, reset per setting" if device.type == "cuda" else "CPU: process max RSS, never reset"
    print_table(
        rows,
        f"\n{env['model']} on {on}; profile {args.profile} (rank {recipe.network_dim}, alpha "
        f"{recipe.network_alpha:g}), {recipe.optimizer}, gradient checkpointing; mean of {args.steps} "
        f"optimizer steps after {args.warmup} warm-up; peak GB: {memory}",
    )
    save_results(args, env, rows, suffix="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
