"""Which key format a FLUX LoRA file uses, so any trainer's file can be judged on the same scale.

kohya (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`): what sd-scripts and this project write;
diffusers/peft (`transformer.transformer_blocks.0.attn.to_q.lora_A.weight`): what ai-toolkit, SimpleTuner and
diffusers' own training scripts write. diffusers' FLUX loader reads both (and BFL-named `diffusion_model.*`
keys, which it converts too); anything else is one line naming a key.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

KOHYA = "kohya"
DIFFUSERS = "diffusers/peft"


def lora_key_format(path: Path) -> str:
    """KOHYA or DIFFUSERS; ValueError naming the file and a key for anything else."""
    try:
        with safe_open(str(path), framework="numpy") as handle:
            keys = list(handle.keys())
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for a damaged file
        raise ValueError(
            f"{path}: not a readable safetensors file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from None
    if any(key.startswith("lora_unet_") for key in keys):
        return KOHYA
    if any((".lora_A." in key or ".lora_B." in key or ".lora.down." in key) for key in keys):
        return DIFFUSERS
    example = keys[0] if keys else "(no tensors)"
    raise ValueError(
        f"{path}: LoRA key format not recognised (e.g. {example!r}); read are kohya (lora_unet_*.lora_down/up) and "
        "diffusers/peft (transformer.*.lora_A/lora_B)"
    )
