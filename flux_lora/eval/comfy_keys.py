"""Would ComfyUI apply every tensor of this LoRA file? A table of the FLUX key names it maps.

ComfyUI names FLUX weights as in BFL's checkpoint (`double_blocks.0.img_attn.qkv.weight`) and maps a
kohya LoRA module `lora_unet_<weight name without .weight, dots as underscores>` onto each such Linear;
a key it cannot map is skipped with "lora key not loaded". The table below lists those Linears (our own
table of the pattern, with the shapes FLUX gives them), so a file can be checked without ComfyUI.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

PREFIX = "lora_unet_"
# The tensor suffixes ComfyUI's LoRA loader reads for a kohya module (lora_mid: LoCon; dora_scale: DoRA).
SUFFIXES = ("lora_up.weight", "lora_down.weight", "alpha", "lora_mid.weight", "dora_scale")


@dataclass(frozen=True)
class FluxShape:
    hidden: int  # FLUX.1-dev: 3072
    mlp_hidden: int  # hidden * 4
    in_channels: int  # packed latent channels (64)
    out_channels: int
    context: int  # T5 width (4096)
    pooled: int  # CLIP pooled width (768)
    double_blocks: int  # 19
    single_blocks: int  # 38

    @classmethod
    def of(cls, transformer) -> FluxShape:
        c = transformer.config
        hidden = c.num_attention_heads * c.attention_head_dim
        return cls(
            hidden,
            hidden * 4,
            c.in_channels,
            c.patch_size**2 * (c.out_channels or c.in_channels),
            c.joint_attention_dim,
            c.pooled_projection_dim,
            c.num_layers,
            c.num_single_layers,
        )


Shape = Callable[[FluxShape], tuple[int, int]]  # (out_features, in_features) of the Linear
_TIMESTEP_FEATURES = 256  # FLUX's sinusoidal timestep/guidance embedding width

DOUBLE_BLOCK: dict[str, Shape] = {
    f"{stream}_{name}": shape
    for stream in ("img", "txt")
    for name, shape in {
        "mod.lin": lambda s: (6 * s.hidden, s.hidden),
        "attn.qkv": lambda s: (3 * s.hidden, s.hidden),
        "attn.proj": lambda s: (s.hidden, s.hidden),
        "mlp.0": lambda s: (s.mlp_hidden, s.hidden),
        "mlp.2": lambda s: (s.hidden, s.mlp_hidden),
    }.items()
}
SINGLE_BLOCK: dict[str, Shape] = {
    "linear1": lambda s: (3 * s.hidden + s.mlp_hidden, s.hidden),
    "linear2": lambda s: (s.hidden, s.hidden + s.mlp_hidden),
    "modulation.lin": lambda s: (3 * s.hidden, s.hidden),
}
GLOBAL: dict[str, Shape] = {
    "img_in": lambda s: (s.hidden, s.in_channels),
    "txt_in": lambda s: (s.hidden, s.context),
    "time_in.in_layer": lambda s: (s.hidden, _TIMESTEP_FEATURES),
    "time_in.out_layer": lambda s: (s.hidden, s.hidden),
    "vector_in.in_layer": lambda s: (s.hidden, s.pooled),
    "vector_in.out_layer": lambda s: (s.hidden, s.hidden),
    "guidance_in.in_layer": lambda s: (s.hidden, _TIMESTEP_FEATURES),
    "guidance_in.out_layer": lambda s: (s.hidden, s.hidden),
    "final_layer.linear": lambda s: (s.out_channels, s.hidden),
    "final_layer.adaLN_modulation.1": lambda s: (2 * s.hidden, s.hidden),
}


def _kohya(weight_name: str) -> str:
    return PREFIX + weight_name.replace(".", "_")


def comfy_module_table(shape: FluxShape) -> dict[str, tuple[int, int]]:
    """kohya module name -> (out, in) of the FLUX Linear ComfyUI applies it to."""
    table = {_kohya(name): fn(shape) for name, fn in GLOBAL.items()}
    for index in range(shape.double_blocks):
        table.update({_kohya(f"double_blocks.{index}.{n}"): fn(shape) for n, fn in DOUBLE_BLOCK.items()})
    for index in range(shape.single_blocks):
        table.update({_kohya(f"single_blocks.{index}.{n}"): fn(shape) for n, fn in SINGLE_BLOCK.items()})
    return table


_KEY = re.compile(r"^(?P<module>[^.]+)\.(?P<suffix>.+)$")


def check_keys(tensors: dict[str, torch.Size | tuple[int, ...]], shape: FluxShape) -> dict:
    """Every key mapped by ComfyUI's FLUX table, with a matching shape; problems listed one per key."""
    table = comfy_module_table(shape)
    problems: list[str] = []
    modules: dict[str, set[str]] = {}
    for key, size in sorted(tensors.items()):
        match = _KEY.match(key)
        module, suffix = (match["module"], match["suffix"]) if match else (key, "")
        if module not in table:
            problems.append(f"{key}: no FLUX weight {module!r} in ComfyUI's key map (lora key not loaded)")
            continue
        if suffix not in SUFFIXES:
            problems.append(f"{key}: suffix {suffix!r} is not one ComfyUI reads ({', '.join(SUFFIXES)})")
            continue
        modules.setdefault(module, set()).add(suffix)
        out_features, in_features = table[module]
        size = tuple(size)
        if suffix == "lora_up.weight" and size[0] != out_features:
            problems.append(f"{key}: {size[0]} rows, the FLUX weight has {out_features} outputs")
        if suffix == "lora_down.weight" and size[-1] != in_features:
            problems.append(f"{key}: {size[-1]} columns, the FLUX weight has {in_features} inputs")
    for module, suffixes in sorted(modules.items()):
        if not {"lora_up.weight", "lora_down.weight"} <= suffixes:
            problems.append(f"{module}: needs both lora_up.weight and lora_down.weight, has {sorted(suffixes)}")
    return {"modules": len(modules), "keys": len(tensors), "passed": not problems, "problems": problems}
