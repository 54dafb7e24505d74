"""The ComfyUI FLUX key table against real LoRA module names (tiny file, FLUX.1-dev's 304) and bogus keys."""

from __future__ import annotations

import json
from pathlib import Path

from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel
from safetensors import safe_open

from flux_lora.engines.native.lora import lora_module_names
from flux_lora.engines.native.models import MODEL_CONFIGS, build_tiny_flux
from flux_lora.eval.comfy_keys import FluxShape, check_keys, comfy_module_table
from flux_lora.eval.run_record import read_run


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), framework="pt") as handle:
        return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}


def test_every_key_of_a_real_native_lora_is_in_comfys_map(tiny_run: Path) -> None:
    shape = FluxShape.of(build_tiny_flux().transformer)
    result = check_keys(_shapes(read_run(tiny_run).final.path), shape)
    assert result == {"modules": 26, "keys": 78, "passed": True, "problems": []}


def test_flux_dev_has_the_304_module_names_of_a_native_lora() -> None:
    config = json.loads((MODEL_CONFIGS / "transformer" / "config.json").read_text())
    with init_empty_weights():
        transformer = FluxTransformer2DModel.from_config(config)
    names = lora_module_names(transformer)
    table = comfy_module_table(FluxShape.of(transformer))
    assert len(names) == 304 and set(names) <= set(table)
    assert table["lora_unet_single_blocks_37_linear1"] == (3 * 3072 + 12288, 3072)
    assert table["lora_unet_double_blocks_18_img_mod_lin"] == (6 * 3072, 3072)


def test_a_bogus_key_a_bad_suffix_and_a_wrong_shape_are_refused(tiny_run: Path) -> None:
    shape = FluxShape.of(build_tiny_flux().transformer)
    shapes = _shapes(read_run(tiny_run).final.path)
    shapes["lora_unet_double_blocks_0_img_attn_qkvx.lora_up.weight"] = (96, 8)
    shapes["lora_unet_double_blocks_0_img_attn_proj.lora_A.weight"] = (8, 32)
    shapes["lora_unet_single_blocks_1_linear2.lora_up.weight"] = (33, 8)
    result = check_keys(shapes, shape)
    assert not result["passed"]
    assert [p.split(":")[0] for p in result["problems"]] == [
        "lora_unet_double_blocks_0_img_attn_proj.lora_A.weight",
        "lora_unet_double_blocks_0_img_attn_qkvx.lora_up.weight",
        "lora_unet_single_blocks_1_linear2.lora_up.weight",
    ]
