"""launch.pack against the same cells run one after another.

Sweep (default; the tiny model on this machine's CPU): the six ablation cells that share a base (baseline, a1 alpha,
a2 noise offset, a4 adafactor, a6 min-SNR, a7 dropout) through the real CLI, `launch.pack=false` and `launch.pack=true`,
in fresh folders, the order alternating over --repeats. It prints the whole sweep's wall time (start-up included: each
separate cell starts Python, accelerate and a job, builds the model and reads the cache), the time inside the
training jobs only (start-up excluded), and per cell the median seconds per optimizer step after the first
--skip steps as TensorBoard recorded them (a packed run records its own turns only), each with packed / separate.

    python benchmarks/bench_packed_sweep.py [--steps 30] [--repeats 2]

GPU (`--gpu`): a FLUX.1-dev-sized transformer with random weights (no weights needed) at 512 and 1024 px, the job's
own setup (bf16 base, LoRA rank of the profile, checkpointing, AdamW8bit) with 1 and with K adapters: seconds per
step of one adapter alone and per adapter in a K pack, peak memory and memory per added adapter; and one base
forward+backward at batch K against K at batch 1 (what a batched pass, option (b) of docs/design/packed-sweep.md,
could gain).

    python benchmarks/bench_packed_sweep.py --gpu [--resolutions 512 1024] [--adapters 6]
    python benchmarks/bench_packed_sweep.py --gpu --device cpu --tiny     # check the script on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKABLE = ("baseline", "a1_alpha", "a2_noise_offset", "a4_adafactor", "a6_min_snr", "a7_dropout")


# ------------------------------------------------------------------------------------------ the sweep, through the CLI


def run_sweep(folder: Path, pack: bool, steps: int) -> dict:
    sweep_dir = folder / "sweep"
    argv = [
        sys.executable,
        str(REPO / "launch.py"),
        "-m",
        f"ablation={','.join(PACKABLE)}",
        f"launch.pack={str(pack).lower()}",
        f"ablation.baseline_steps={steps}",
        f"profile.save_every_n_steps={steps}",
        f"profile.sample_every_n_steps={steps * 10}",
        "profile.sample_steps=2",
        f"hydra.sweep.dir={sweep_dir}",
        f"paths.outputs={folder / 'outputs'}",
        f"paths.cache={folder / 'cache'}",
    ]
    began = time.perf_counter()
    done = subprocess.run(argv, cwd=folder, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(
            f"the {'packed' if pack else 'separate'} sweep failed: {done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    cells, jobs = {}, {}
    for cell in sorted(sweep_dir.iterdir()):
        status_file = cell / "status.json"
        if not status_file.is_file():
            continue
        attempt = json.loads(status_file.read_text())["attempts"][-1]
        ablation = next(name for name in PACKABLE if cell.name.endswith(name))
        cells[ablation] = step_seconds(cell / "logs")
        jobs[tuple(sorted([str(cell), *attempt.get("packed_with", [])]))] = attempt["duration_s"]
    return {"wall": wall, "jobs": sum(jobs.values()), "job_count": len(jobs), "cells": cells}


def step_seconds(logs: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(logs), size_guidance={"scalars": 0})
    accumulator.Reload()
    return [event.value for event in accumulator.Scalars("perf/seconds_per_step")]


def sweep_benchmark(args: argparse.Namespace) -> None:
    results: dict[bool, list[dict]] = {False: [], True: []}
    for repeat in range(args.repeats):
        for pack in (False, True) if repeat % 2 == 0 else (True, False):
            with tempfile.TemporaryDirectory() as folder:
                results[pack].append(run_sweep(Path(folder), pack, args.steps))
                print(
                    f"repeat {repeat + 1}: {'packed' if pack else 'separate'} {results[pack][-1]['wall']:.1f} s",
                    flush=True,
                )
    separate, packed = results[False], results[True]
    wall_s, wall_p = min(r["wall"] for r in separate), min(r["wall"] for r in packed)
    jobs_s, jobs_p = min(r["jobs"] for r in separate), min(r["jobs"] for r in packed)
    print(
        f"\n{len(PACKABLE)} cells x {args.steps} steps, tiny FLUX on {os.cpu_count()} CPU cores, best of {args.repeats}"
    )
    print(f"{'':34s} {'separate':>9s} {'packed':>9s} {'packed/separate':>16s}")
    print(f"{'whole sweep, start-up included (s)':34s} {wall_s:9.1f} {wall_p:9.1f} {wall_p / wall_s:16.2f}")
    print(f"{'training jobs only (s)':34s} {jobs_s:9.1f} {jobs_p:9.1f} {jobs_p / jobs_s:16.2f}")
    print(f"{'accelerate launches':34s} {separate[0]['job_count']:9d} {packed[0]['job_count']:9d}")
    print(f"\nmedian seconds per optimizer step after step {args.skip} (TensorBoard perf/seconds_per_step)")
    for cell in PACKABLE:
        s = min(statistics.median(r["cells"][cell][args.skip :]) for r in separate)
        p = min(statistics.median(r["cells"][cell][args.skip :]) for r in packed)
        print(f"  {cell:18s} {s:8.3f} {p:8.3f} {p / s:8.2f}")


# ------------------------------------------------------------------------------------------ one pack on a GPU


def measure_pack(args: argparse.Namespace, device, resolution: int, adapters: int) -> tuple[float, float, float]:
    """(median seconds per step per adapter, peak GB after setup, peak GB after the steps) of one pack."""
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_native_gpu import BENCH_RUN_DIR, build_random_transformer, transformer_config

    from flux_lora.engines.native.engine import composed_native_config
    from flux_lora.engines.native.lora import use_adapter
    from flux_lora.engines.native.records import peak_memory_gb
    from flux_lora.engines.native.setup import prepare_lora_trainings
    from flux_lora.engines.native.train import start_accelerator, train_micro_step

    tier = "cpu" if device.type == "cpu" else "h100"
    config = composed_native_config([f"gpu={tier}"], BENCH_RUN_DIR, resolution=resolution, use_cpu=device.type == "cpu")
    accelerator = start_accelerator(config)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    transformer = build_random_transformer(transformer_config(args.tiny), device, seed=0)
    names = [f"run{i}" for i in range(adapters)]
    trainings = prepare_lora_trainings(transformer, [config] * adapters, names, accelerator, torch.bfloat16)
    setup_gb = peak_memory_gb(device)
    model = accelerator.unwrap_model(trainings[0].transformer)
    generator = torch.Generator().manual_seed(0)
    side = resolution // 8
    batch = {
        "latents": torch.randn(1, 16, side, side, generator=generator),
        "pooled": torch.randn(1, model.config.pooled_projection_dim, generator=generator),
        "t5": torch.randn(1, config.t5_max_length, model.config.joint_attention_dim, generator=generator),
    }
    batch = {k: v.to(device, torch.bfloat16) for k, v in batch.items()}

    def one_round(step: int) -> None:  # the job's loop: each adapter's micro-batch in its turn
        with accelerator.accumulate(trainings[0].transformer):
            for training in trainings:
                use_adapter(model, training.adapter)
                with training.rng.turn():
                    train_micro_step(training, config, accelerator, batch, step, torch.bfloat16)

    for step in range(args.warmup):
        one_round(step)
    seconds = []
    for step in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        one_round(args.warmup + step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append((time.perf_counter() - began) / adapters)
    peak = peak_memory_gb(device)
    accelerator.free_memory()
    return statistics.median(seconds), setup_gb, peak


def gpu_benchmark(args: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_native_gpu import transformer_config

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU box, or pass --device cpu --tiny to check the script")
    resolutions = args.resolutions or ([64, 128] if args.tiny else [512, 1024])
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}")
    for resolution in resolutions:
        one_s, one_setup, one_peak = measure_pack(args, device, resolution, 1)
        k_s, k_setup, k_peak = measure_pack(args, device, resolution, args.adapters)
        per_adapter = (k_setup - one_setup) / max(1, args.adapters - 1)
        print(
            f"{resolution:5d} px: s/step one adapter {one_s:.3f}, per adapter in a {args.adapters}-pack {k_s:.3f} "
            f"(ratio {k_s / one_s:.2f}); peak GB {one_peak:.2f} -> {k_peak:.2f}; setup GB per added adapter {per_adapter:.3f}"
        )
        batched_vs_looped(transformer_config(args.tiny), device, resolution, args.adapters, args.steps)


def batched_vs_looped(config: dict, device, resolution: int, k: int, steps: int) -> None:
    """The frozen base's forward+backward at batch K against K at batch 1 (input gradients only, as a LoRA needs)."""
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_native_gpu import build_random_transformer

    from flux_lora.engines.native import flow

    transformer = build_random_transformer(config, device, seed=0).requires_grad_(False)
    transformer.enable_gradient_checkpointing()
    side = resolution // 8
    text_tokens = 512 if resolution >= 256 else 32

    def pass_of(batch: int) -> None:
        latents = torch.randn(batch, 16, side, side, device=device, dtype=torch.bfloat16)
        tokens = flow.pack_latents(latents).requires_grad_(True)
        out = transformer(
            hidden_states=tokens,
            encoder_hidden_states=torch.randn(
                batch,
                text_tokens,
                config["joint_attention_dim"],
                device=device,
                dtype=torch.bfloat16,
            ),
            pooled_projections=torch.randn(batch, config["pooled_projection_dim"], device=device, dtype=torch.bfloat16),
            timestep=torch.full((batch,), 0.5, device=device, dtype=torch.bfloat16),
            img_ids=flow.image_ids(side, side, device, torch.bfloat16),
            txt_ids=flow.text_ids(text_tokens, device, torch.bfloat16),
            guidance=torch.full((batch,), 1.0, device=device, dtype=torch.bfloat16),
            return_dict=False,
        )[0]
        out.float().square().mean().backward()

    def timed(fn) -> float:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        for _ in range(steps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - began) / steps

    looped = timed(lambda: [pass_of(1) for _ in range(k)])
    batched = timed(lambda: pass_of(k))
    print(
        f"        base forward+backward: {k} x batch 1 {looped:.3f} s, batch {k} {batched:.3f} s (ratio {batched / looped:.2f})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per cell (timed steps with --gpu)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip", type=int, default=3, help="first steps left out of the per-step median")
    parser.add_argument("--gpu", action="store_true", help="the FLUX.1-dev-sized pack instead of the CLI sweep")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="with --gpu: a tiny FLUX-shaped model (check the script)")
    parser.add_argument("--resolutions", type=int, nargs="*")
    parser.add_argument("--adapters", type=int, default=len(PACKABLE))
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    if args.gpu:
        gpu_benchmark(args)
    else:
        sweep_benchmark(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
