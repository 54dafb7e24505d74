"""The run's base model, rebuilt from its frozen config, and a kohya LoRA file applied to it at a strength.

Reuses the native engine's loaders and LoRA code, so sd-scripts and native runs are judged by the same model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from flux_lora.engines.native.lora import ADAPTER, add_flux_lora, load_kohya_lora, lora_module_names
from flux_lora.engines.native.models import FluxParts, build_tiny_flux, encode_prompts, load_flux_dev
from flux_lora.eval.lora_file import KOHYA, lora_key_format
from flux_lora.eval.settings import device_type

TextEmbedding = tuple[torch.Tensor, torch.Tensor]  # (pooled [D_clip], T5 sequence [L, D_t5])


def pick_device(name: str) -> torch.device:
    return torch.device(device_type(name) if name == "auto" else name)


def compute_dtype(device: torch.device) -> torch.dtype:
    # bf16 is what FLUX runs in on a GPU; on CPU float32 is both faster and exact.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@contextmanager
def tiny_model_threads(model: dict, device: torch.device) -> Iterator[None]:
    """One CPU thread while the tiny model runs: its ops take microseconds, so a second OpenMP thread only
    adds barrier waits (default evaluation of a tiny run on a shared 2-core machine: 103 s with 2, 14 s with 1)."""
    threads = torch.get_num_threads()
    if model.get("kind") == "tiny" and device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def load_base_parts(model: dict, dtype: torch.dtype) -> FluxParts:
    """model.kind tiny: drawn in code from model.init_seed; flux_dev: the local files the config names."""
    t5_max_length = int(model.get("t5xxl_max_token_length") or 512)
    if model.get("kind") == "tiny":
        return build_tiny_flux(init_seed=int(model.get("init_seed") or 0), t5_max_length=t5_max_length)
    return load_flux_dev(
        transformer=model.get("transformer"),
        vae=model.get("vae"),
        clip_l=model.get("clip_l"),
        t5xxl=model.get("t5xxl"),
        diffusers_dir=model.get("diffusers_dir"),
        tokenizer_dir=model.get("tokenizer_dir"),
        t5_max_length=t5_max_length,
        dtype=dtype,
    )


def place(parts: FluxParts, device: torch.device, dtype: torch.dtype) -> FluxParts:
    for module in (parts.transformer, parts.vae):
        module.to(device)
        if next(module.parameters()).dtype != dtype:  # diffusers warns about any dtype given to .to()
            module.to(dtype)
    for encoder in (parts.clip_encoder, parts.t5_encoder):
        if encoder is not None:
            encoder.to(device)
    return parts


def encode_texts(parts: FluxParts, texts: list[str]) -> dict[str, TextEmbedding]:
    """Every distinct text once; the tensors come back on the CPU."""
    embeddings = {}
    for text in dict.fromkeys(texts):
        pooled, sequence = encode_prompts(parts, [text])
        embeddings[text] = (pooled[0].float().cpu(), sequence[0].float().cpu())
    return embeddings


def free_text_encoders(parts: FluxParts) -> None:
    # T5-XXL alone is ~9 GB in bf16; nothing after encoding needs it.
    parts.clip_encoder = parts.t5_encoder = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def lora_rank_alpha(path: Path) -> tuple[int, float]:
    with safe_open(str(path), framework="pt") as handle:
        down = next((k for k in handle.keys() if k.endswith(".lora_down.weight")), None)
        if down is None:
            raise ValueError(f"{path}: no .lora_down.weight tensors; not a kohya LoRA file")
        rank = handle.get_slice(down).get_shape()[0]
        alpha_key = down.replace(".lora_down.weight", ".alpha")
        alpha = float(handle.get_tensor(alpha_key)) if alpha_key in handle.keys() else float(rank)
    return rank, alpha


def attach_lora(transformer, path: Path) -> None:
    """Load a LoRA file into the transformer as its one adapter: a kohya file with this project's loader (the peft
    LoRA added first if it has none yet), a diffusers/peft file (ai-toolkit, SimpleTuner, diffusers) with diffusers'."""
    if lora_key_format(path) == KOHYA and (ours := _our_kohya_layout(path, transformer)):
        if ADAPTER not in (getattr(transformer, "peft_config", None) or {}):
            add_flux_lora(transformer, *ours, dropout=None)
            transformer.requires_grad_(False)
        load_kohya_lora(transformer, path)
        return
    # Other tools' files: diffusers/peft keys, or kohya keys for another set of modules (some blocks only, text
    # encoder LoRAs beside them): diffusers' FLUX loader converts them; only the transformer's part is applied.
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    if ADAPTER in (getattr(transformer, "peft_config", None) or {}):
        transformer.delete_adapters(ADAPTER)
    state = FluxLoraLoaderMixin.lora_state_dict(str(path))
    transformer.load_lora_adapter(
        {k: v for k, v in state.items() if k.startswith("transformer.")}, prefix="transformer", adapter_name=ADAPTER
    )
    transformer.requires_grad_(False)


def _our_kohya_layout(path: Path, transformer) -> tuple[int, float] | None:
    """(rank, alpha) when the file holds exactly the modules this project trains (its own loader applies), else None."""
    with safe_open(str(path), framework="pt") as handle:
        modules = {key.split(".", 1)[0] for key in handle.keys()}
    if modules != set(lora_module_names(transformer)):
        return None
    return lora_rank_alpha(path)


@contextmanager
def lora_strength(transformer, strength: float | None) -> Iterator[None]:
    """Inside: the LoRA at `strength` (its delta times strength), or switched off for None (the base model)."""
    if strength is None:
        transformer.disable_adapters()
    else:
        transformer.set_adapters([ADAPTER], weights=[strength])
    try:
        yield
    finally:
        transformer.enable_adapters()
        transformer.set_adapters([ADAPTER], weights=[1.0])
