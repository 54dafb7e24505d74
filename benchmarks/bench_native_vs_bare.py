"""The native engine's training step against a bare diffusers + peft loop doing the same math, same run, same GPU.

Both train a rank-32 LoRA on the full-size FLUX.1-dev transformer (the shipped config, random weights), batch 1,
on the same random latents, T5 embeddings and pooled CLIP vector, at 512 and 1024 px, with and without gradient
checkpointing, over a bf16 base and an fp8 base:

- native: `prepare_lora_training` + `train_micro_step` from flux_lora/engines/native/train.py, i.e. the job's own
  setup (kohya-shaped LoRA, accelerate, fp8 Linears, AdamW) and micro-step (flow-matching loss from flow.py);
- bare: what diffusers' train_dreambooth_lora_flux.py does, written out: FluxTransformer2DModel.add_adapter(peft
  LoraConfig on the same Linears), LoRA in fp32, bf16 autocast, MSE against noise - x0, clip at 1.0, torch AdamW,
  `enable_gradient_checkpointing()`. Its fp8 base is the engine's weight-only fp8 Linear (`store_base_in_fp8`):
  diffusers' own fp8 storage (`enable_layerwise_casting`, which does train with a LoRA added after it) leaves
  every module named "*norm*" in bf16, FLUX's large modulation Linears among them, so it would store a different
  model; with the same fp8 Linears the pair compares the loops, not two fp8 methods.
  The one difference in what is trained: the engine shares one lora_A within each of kohya's fused groups (qkv,
  single-block linear1), peft keeps one per Linear, so the bare loop's AdamW updates 172M parameters to the
  engine's 153M (same matmuls in the forward and backward).

Per configuration it prints the median seconds per optimizer step of each, the ratio native/bare (target 1.10 at
most), peak CUDA memory of each, and 6 x 12e9 x tokens per step as achieved TFLOP/s and as a share of the card's
datasheet bf16 peak. Each run is appended to benchmarks/results/<gpu-name>-native-vs-bare.json.

    python benchmarks/bench_native_vs_bare.py [--resolutions 512 1024] [--checkpointing on off] [--bases bf16 fp8]
                                              [--steps 5 --warmup 2]   # estimate: about 4 minutes on one H200
    python benchmarks/bench_native_vs_bare.py --device cpu --tiny     # check the script on a CPU (64 / 128 px)
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_native_gpu import (
    BENCH_RUN_DIR,
    CONF,
    TINY_RESOLUTIONS,
    add_common_arguments,
    benchmark_device,
    build_random_transformer,
    read_yaml,
    reset_peak,
    save_results,
    synchronize,
    transformer_config,
)

from flux_lora.engines.native.engine import composed_native_config
from flux_lora.engines.native.lora import DOUBLE_BLOCK_MODULES, SINGLE_BLOCK_MODULES
from flux_lora.engines.native.setup import prepare_lora_training, store_base_in_fp8
from flux_lora.engines.native.train import train_micro_step

REPO = Path(__file__).resolve().parents[1]
GPU_RESOLUTIONS = (512, 1024)
FLUX_DEV_PARAMS = 12e9  # the FLOP estimate's N for the full-size model; the tiny one counts its own
LEARNING_RATE = 1e-4
MAX_GRAD_NORM = 1.0  # the engine's default; the bare loop clips at the same norm
TARGET_RATIO = 1.10
# Dense bf16 tensor-core TFLOP/s from the vendors' datasheets; first substring of the CUDA device name that matches.
PEAK_BF16_TFLOPS = (
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("RTX A6000", 155.0),
    ("RTX 4090", 165.0),
)
BELOW_PEAK = (
    "below peak because: a LoRA skips the base's weight gradients (without checkpointing the base does "
    "4NT, not 6NT), attention, norms, RoPE and modulation are not in 6NT and are memory-bound, the "
    "rank-32 matmuls and AdamW are small kernels, and batch 1 gives 1.5k-4.6k tokens per step"
)


@dataclass(frozen=True)
class Case:
    resolution: int
    checkpointing: bool
    fp8_base: bool

    @property
    def label(self) -> str:
        return f"{self.resolution} px, {'ckpt' if self.checkpointing else 'no ckpt'}, {'fp8' if self.fp8_base else 'bf16'} base"


def random_batch(config: dict, resolution: int, text_tokens: int, seed: int) -> dict[str, torch.Tensor]:
    """One cached batch's stand-in (batch 1), on the CPU in bf16 like the job's caches; both loops read this one."""
    generator = torch.Generator().manual_seed(seed)
    side = resolution // 8
    return {
        "latents": torch.randn(1, 16, side, side, generator=generator).to(torch.bfloat16),
        "pooled": torch.randn(1, config["pooled_projection_dim"], generator=generator).to(torch.bfloat16),
        "t5": torch.randn(1, text_tokens, config["joint_attention_dim"], generator=generator).to(torch.bfloat16),
    }


class NativeEngineLoop:
    """The training job's setup and micro-step, imported, not copied."""

    def __init__(self, case: Case, *, tiny: bool, device: torch.device, rank: int, text_tokens: int, seed: int) -> None:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState

        self.device = device
        self.config = composed_native_config(
            [],
            BENCH_RUN_DIR,
            model_kind="tiny" if tiny else "flux_dev",
            t5_max_length=text_tokens,
            resolution=case.resolution,
            network_dim=rank,
            network_alpha=float(rank),
            learning_rate=LEARNING_RATE,
            lr_scheduler="constant",
            optimizer="adamw",
            max_grad_norm=MAX_GRAD_NORM,
            gradient_checkpointing=case.checkpointing,
            fp8_base=case.fp8_base,
            use_cpu=device.type == "cpu",
            seed=seed,
        )
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        self.accelerator = Accelerator(mixed_precision="bf16", cpu=self.config.use_cpu)
        transformer = build_random_transformer(transformer_config(tiny), device, seed)
        self.training = prepare_lora_training(transformer, self.config, self.accelerator, torch.bfloat16)

    def step(self, batch: dict[str, torch.Tensor], index: int) -> float:
        on_device = {k: v.to(self.device) for k, v in batch.items()}
        with self.accelerator.accumulate(self.training.transformer):
            return train_micro_step(self.training, self.config, self.accelerator, on_device, index, torch.bfloat16)

    def close(self) -> None:
        self.accelerator.free_memory()
        self.training = None


def lora_target_modules(config: dict) -> list[str]:
    """Full module names, as the engine targets them: a bare suffix such as "proj_out" would also catch the output layer."""
    doubles = [
        f"transformer_blocks.{i}.{m}"
        for i in range(config["num_layers"])
        for ms in DOUBLE_BLOCK_MODULES.values()
        for m in ms
    ]
    singles = [
        f"single_transformer_blocks.{i}.{m}"
        for i in range(config["num_single_layers"])
        for ms in SINGLE_BLOCK_MODULES.values()
        for m in ms
    ]
    return doubles + singles


def pack_2x2(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, 4C], FluxPipeline._pack_latents' layout."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_2x2(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


class BareDiffusersLoop:
    """diffusers' FLUX LoRA example reduced to its step: no accelerate, no engine code but the fp8 Linear."""

    def __init__(self, case: Case, *, tiny: bool, device: torch.device, rank: int, text_tokens: int, seed: int) -> None:
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        self.device = device
        config = transformer_config(tiny)
        torch.manual_seed(seed)
        model = build_random_transformer(config, device, seed).requires_grad_(False)
        model.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True, target_modules=lora_target_modules(config))
        )
        cast_training_params(model, dtype=torch.float32)
        if case.fp8_base:
            store_base_in_fp8(model)
        if case.checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LEARNING_RATE)
        self.generator = torch.Generator(device).manual_seed(seed)

    def step(self, batch: dict[str, torch.Tensor], index: int) -> float:
        device, dtype = self.device, torch.bfloat16
        x0, t5, pooled = (batch[k].to(device) for k in ("latents", "t5", "pooled"))
        b, _, h, w = x0.shape
        noise = torch.randn(x0.shape, device=device, dtype=dtype, generator=self.generator)
        sigmas = torch.sigmoid(torch.randn(b, device=device, generator=self.generator))
        s = sigmas.view(-1, 1, 1, 1).to(dtype)
        noisy = (1.0 - s) * x0 + s * noise
        img_ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
        img_ids[..., 1] = torch.arange(h // 2, device=device, dtype=dtype)[:, None]
        img_ids[..., 2] = torch.arange(w // 2, device=device, dtype=dtype)[None, :]
        with torch.autocast(device.type, dtype=dtype):
            prediction = self.model(
                hidden_states=pack_2x2(noisy),
                encoder_hidden_states=t5,
                pooled_projections=pooled,
                timestep=sigmas.to(dtype),
                img_ids=img_ids.reshape(-1, 3),
                txt_ids=torch.zeros(t5.shape[1], 3, device=device, dtype=dtype),
                guidance=torch.ones(b, device=device, dtype=dtype),
                return_dict=False,
            )[0]
        loss = F.mse_loss(unpack_2x2(prediction, h, w).float(), (noise - x0).float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach().item()  # the example logs every step's loss, as the engine does

    def close(self) -> None:
        self.model = self.optimizer = None
        self.params = []


LOOPS = {"native": NativeEngineLoop, "bare": BareDiffusersLoop}


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def time_loop(name: str, case: Case, batch: dict, *, steps: int, warmup: int, **setup) -> dict:
    """Build the loop, then run warmup + steps optimizer steps; peak memory is over the steps (setup excluded)."""
    device = setup["device"]
    stage = "setup"
    loop = None
    try:
        loop = LOOPS[name](case, **setup)
        synchronize(device)
        stage = "steps"
        reset_peak(device)
        losses = [loop.step(batch, index) for index in range(warmup)]
        seconds = []
        for index in range(warmup, warmup + steps):
            synchronize(device)
            began = time.perf_counter()
            losses.append(loop.step(batch, index))
            synchronize(device)
            seconds.append(time.perf_counter() - began)
        result = {
            "status": "ok",
            "seconds_per_step": statistics.median(seconds),
            "step_seconds": seconds,
            "peak_memory_gb": peak_gb(device),
            "final_loss": losses[-1],
        }
    except torch.OutOfMemoryError:
        result = {"status": "OOM", "stage": stage, "peak_memory_gb": peak_gb(device)}
    except Exception as error:  # one broken setting must not lose the rest of a GPU session
        traceback.print_exc()
        result = {
            "status": "error",
            "stage": stage,
            "error": f"{type(error).__name__}: {error}"[:500],
            "peak_memory_gb": peak_gb(device),
        }
    finally:
        if loop is not None:
            loop.close()
        del loop
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def peak_tflops(device_name: str | None) -> float | None:
    return next((peak for key, peak in PEAK_BF16_TFLOPS if device_name and key in device_name), None)


def gemm_tflops(device: torch.device) -> float | None:
    """This card's bf16 matmul rate on random 8192^3 products: the ceiling the step rates can be read against."""
    if device.type != "cuda":
        return None
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    synchronize(device)
    began = time.perf_counter()
    for _ in range(10):
        a @ b
    synchronize(device)
    return 10 * 2 * 8192**3 / (time.perf_counter() - began) / 1e12


def environment(device: torch.device, tiny: bool, params: float) -> dict:
    import accelerate
    import diffusers
    import peft

    try:
        commit = (
            subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    record = {
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": str(device),
        "model": "tiny FLUX (shipped config, shrunk)"
        if tiny
        else "FLUX.1-dev transformer (shipped config), random weights",
        "flop_params": params,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
        "git_commit": commit,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = torch.cuda.get_device_name(device)
        record.update(
            gpu_name=name,
            gpu_memory_gb=props.total_memory / 2**30,
            compute_capability=f"{props.major}.{props.minor}",
            datasheet_bf16_tflops=peak_tflops(name),
        )
    else:
        record.update(gpu_name=None, cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return record


def tiny_params() -> float:
    """The tiny model's own parameter count, so its TFLOP/s column is computed the same way (and means as little)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        return float(sum(p.numel() for p in FluxTransformer2DModel.from_config(transformer_config(True)).parameters()))


def flops_per_step(params: float, resolution: int, text_tokens: int) -> float:
    return 6 * params * ((resolution // 16) ** 2 + text_tokens)


def add_rates(row: dict, peak: float | None) -> None:
    """The ratio, achieved TFLOP/s and share of the datasheet peak of one measured configuration."""
    ok = row["native"]["status"] == "ok" and row["bare"]["status"] == "ok"
    row["ratio_native_over_bare"] = row["native"]["seconds_per_step"] / row["bare"]["seconds_per_step"] if ok else None
    for name in LOOPS:
        measured = row[name]
        tflops = row["flops_per_step"] / measured["seconds_per_step"] / 1e12 if measured["status"] == "ok" else None
        measured["tflops"] = tflops
        measured["share_of_peak"] = tflops / peak if tflops and peak else None


def print_table(rows: list[dict]) -> None:
    def cell(value, fmt):
        return format(value, fmt) if value is not None else "-"

    print(
        f"{'px':>5} {'ckpt':>4} {'base':>4} | {'native s':>8} {'bare s':>8} {'n/b':>5} | {'native GB':>9} {'bare GB':>8} | "
        f"{'native TF/s':>11} {'bare TF/s':>9} {'% peak':>6} | status"
    )
    for r in rows:
        native, bare, ratio = r["native"], r["bare"], r["ratio_native_over_bare"]
        share = f"{100 * native['share_of_peak']:.1f}%" if native.get("share_of_peak") else "-"
        status = (
            f"{'met' if ratio <= TARGET_RATIO else 'MISSED'} (target {TARGET_RATIO:.2f}x)"
            if ratio is not None
            else "; ".join(f"{k} {r[k]['status']} in {r[k]['stage']}" for k in LOOPS if r[k]["status"] != "ok")
        )
        print(
            f"{r['resolution']:>5} {'on' if r['checkpointing'] else 'off':>4} {'fp8' if r['fp8_base'] else 'bf16':>4} | "
            f"{cell(native.get('seconds_per_step'), '8.3f'):>8} {cell(bare.get('seconds_per_step'), '8.3f'):>8} {cell(ratio, '5.2f'):>5} | "
            f"{cell(native['peak_memory_gb'], '9.2f'):>9} {cell(bare['peak_memory_gb'], '8.2f'):>8} | "
            f"{cell(native.get('tflops'), '11.4g'):>11} {cell(bare.get('tflops'), '9.4g'):>9} {share:>6} | {status}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(
        parser,
        resolutions_help="512 1024",
        steps_help="timed optimizer steps per loop and configuration (median reported)",
        out_name="<gpu-name>-native-vs-bare.json",
    )
    parser.add_argument("--checkpointing", nargs="+", choices=("on", "off"), default=["on", "off"])
    parser.add_argument("--bases", nargs="+", choices=("bf16", "fp8"), default=["bf16", "fp8"])
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank (alpha = rank)")
    args = parser.parse_args()
    device = benchmark_device(args)
    if device is None:
        return 2

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # else every .to(dtype) of a random model prints a notice about fp32 modules it has none of
    text_tokens = read_yaml(CONF / "model" / "flux_dev.yaml")["t5xxl_max_token_length"]
    params = tiny_params() if args.tiny else FLUX_DEV_PARAMS
    env = environment(device, args.tiny, params)
    peak = env.get("datasheet_bf16_tflops")
    gemm = gemm_tflops(device)
    env["measured_bf16_gemm_tflops"] = gemm
    cases = [
        Case(resolution, checkpointing == "on", base == "fp8")
        for resolution in args.resolutions or (TINY_RESOLUTIONS if args.tiny else GPU_RESOLUTIONS)
        for checkpointing in args.checkpointing
        for base in args.bases
    ]
    setup = {"tiny": args.tiny, "device": device, "rank": args.rank, "text_tokens": text_tokens, "seed": args.seed}
    model_config = transformer_config(args.tiny)

    rows = []
    began = time.perf_counter()
    for index, case in enumerate(cases):
        batch = random_batch(model_config, case.resolution, text_tokens, args.seed)
        row = {
            "resolution": case.resolution,
            "checkpointing": case.checkpointing,
            "fp8_base": case.fp8_base,
            "batch_size": 1,
            "rank": args.rank,
            "tokens": (case.resolution // 16) ** 2 + text_tokens,
            "flops_per_step": flops_per_step(params, case.resolution, text_tokens),
        }
        # Alternate which loop goes first, so neither always meets the warmer (or fuller) device.
        for name in ("native", "bare") if index % 2 == 0 else ("bare", "native"):
            print(f"[{time.perf_counter() - began:6.0f} s] {case.label}: {name} ...", flush=True)
            row[name] = time_loop(name, case, batch, steps=args.steps, warmup=args.warmup, **setup)
        add_rates(row, peak)
        rows.append(row)

    on = env["gpu_name"] or f"CPU ({env['threads']} threads)"
    print(
        f"\n{env['model']} on {on}; torch {env['torch']}, diffusers {env['diffusers']}, peft {env['peft']}; "
        f"batch 1, LoRA rank {args.rank}, AdamW, bf16 autocast, {text_tokens} text tokens; "
        f"median of {args.steps} optimizer steps after {args.warmup} warm-up; {time.perf_counter() - began:.0f} s in all"
    )
    print(
        "peak GB: CUDA max allocated over the timed loop's steps, reset after its setup"
        if device.type == "cuda"
        else "peak GB: not measured on a CPU"
    )
    print(
        f"TF/s: 6 x {params:.3g} params x tokens per step / s per step; % peak: native's TF/s over the datasheet's "
        + (f"{peak:g} TFLOP/s bf16" if peak else "bf16 peak (unknown for this device: omitted)")
        + (f"; measured bf16 GEMM 8192^3 here: {gemm:.0f} TFLOP/s" if gemm else "")
    )
    print_table(rows)
    print(BELOW_PEAK)
    save_results(args, env, rows, suffix="-native-vs-bare")
    return 0


if __name__ == "__main__":
    sys.exit(main())
