"""Native engine vs a plain hand-written loop doing the same math, in one process, tiny FLUX on CPU.

Prints median seconds per optimizer step and the peak resident-memory growth of each, and their
ratios (target: engine/plain within 1.10). Memory is the growth of the process's resident size
during each run (model build included, same for both), with glibc set to return freed memory. Both use the same cached batch data, bf16 autocast,
gradient checkpointing, LoRA rank 8, AdamW8bit and gradient clipping; the engine adds accelerate,
logging, the progress line and the final save (outside the per-step timing).

    python benchmarks/bench_native_step.py [--steps 30] [--resolution 256]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from flux_lora.engines.native.config import NativeTrainConfig  # noqa: E402
from flux_lora.engines.native.data import build_train_items, collate, epoch_batches  # noqa: E402
from flux_lora.engines.native.engine import composed_native_config
from flux_lora.engines.native.setup import build_optimizer, load_parts  # noqa: E402
from flux_lora.engines.native.train import (  # noqa: E402
    draw_noise_and_sigmas,
    flow_matching_loss,
    run_training,
    step_generator,
)

WARMUP_STEPS = 3


def return_freed_memory_to_the_os() -> None:
    """glibc keeps freed blocks (so a second run would show no RSS growth): mmap every block >= 64 KiB
    and trim on free, so the resident size follows the live tensors of each run."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (fixed: disables the dynamic threshold)
    libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD


class PeakRss:
    """Largest resident set size seen while active, sampled every 2 ms, minus the size at start."""

    def __enter__(self) -> PeakRss:
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    @property
    def growth_gb(self) -> float:
        return (self.peak - self.start) / 2**30


def make_dataset(folder: Path, resolution: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(3):
        Image.fromarray((rng.random((resolution, resolution, 3)) * 255).astype("uint8")).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(f"TOK woman, photo {index}")
    return folder


def plain_loop(config: NativeTrainConfig) -> list[float]:
    """The same math with nothing around it: no accelerate, no logging, no checkpoints."""
    from diffusers.training_utils import cast_training_params

    from flux_lora.engines.native.lora import add_flux_lora

    torch.manual_seed(config.seed)
    parts = load_parts(config)
    items, _ = build_train_items(config, parts)
    transformer = parts.transformer.requires_grad_(False).to(dtype=torch.bfloat16)
    params = add_flux_lora(transformer, config.network_dim, config.network_alpha, config.network_dropout)
    cast_training_params(transformer)
    transformer.enable_gradient_checkpointing()
    transformer.train()
    optimizer = build_optimizer(config, params)
    batches = epoch_batches(items, config.num_repeats, config.batch_size, torch.Generator().manual_seed(config.seed))
    seconds = []
    for step in range(config.max_train_steps):
        began = time.perf_counter()
        batch = collate(items, batches[step % len(batches)])
        noise, sigmas = draw_noise_and_sigmas(config, batch["latents"], step_generator(config.seed, step))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = flow_matching_loss(
                transformer, config, batch["latents"], noise, sigmas, batch["pooled"], batch["t5"], torch.bfloat16
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        seconds.append(time.perf_counter() - began)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--resolution", type=int, default=256)
    args = parser.parse_args()
    return_freed_memory_to_the_os()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = composed_native_config(
            [],
            root / "run",
            dataset_path=str(make_dataset(root / "ds", args.resolution)),
            resolution=args.resolution,
            min_bucket_reso=args.resolution,
            max_bucket_reso=args.resolution,
            bucket_reso_steps=64,
            max_train_steps=args.steps,
            learning_rate=1e-3,
            lr_scheduler="constant",
            network_dim=8,
            network_alpha=8,
            optimizer="adamw8bit",
            optimizer_args={"weight_decay": 0.01},
            mixed_precision="bf16",
            gradient_checkpointing=True,
            save_every_n_steps=0,
            sample_every_n_steps=0,
            use_cpu=True,
            cache_dir=str(root / "cache"),
            output_dir=str(root / "out"),
            logging_dir=str(root / "logs"),
        )
        plain_loop(config)  # fills the caches and warms the allocator for both measured runs
        timings = {}
        for name in ("plain", "engine", "plain", "engine"):  # the second of each pair is reported
            gc.collect()
            with PeakRss() as memory:
                seconds = plain_loop(config) if name == "plain" else run_training(config).step_seconds
            timings[name] = (statistics.median(seconds[WARMUP_STEPS:]), memory.growth_gb, memory.peak / 2**30)
    (plain_s, plain_gb, plain_peak), (engine_s, engine_gb, engine_peak) = timings["plain"], timings["engine"]
    print(
        f"tiny FLUX, CPU ({torch.get_num_threads()} threads), {args.resolution} px, batch 1, {args.steps} steps, "
        f"median after {WARMUP_STEPS} warm-up steps"
    )
    print(
        f"plain loop : {plain_s:.4f} s/step   peak RSS growth {plain_gb * 1024:.1f} MiB (peak RSS {plain_peak:.3f} GiB)"
    )
    print(
        f"engine     : {engine_s:.4f} s/step   peak RSS growth {engine_gb * 1024:.1f} MiB (peak RSS {engine_peak:.3f} GiB)"
    )
    print(
        f"ratio engine/plain: time {engine_s / plain_s:.3f}   peak RSS {engine_peak / plain_peak:.3f}"
        f"   RSS growth {engine_gb / plain_gb if plain_gb > 0 else float('nan'):.3f} (tiny model: MiB-scale, noisy)"
    )


if __name__ == "__main__":
    main()
