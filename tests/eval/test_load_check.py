"""diffusers' own FLUX LoRA loader on a real native LoRA, and on the files it must refuse."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flux_lora.engines.native.models import build_tiny_flux
from flux_lora.eval.load_check import check_lora_loads, probe_output
from flux_lora.eval.run_record import read_run

MIN_CHANGE = 1e-4


@pytest.fixture
def base_transformer(tiny_run: Path):
    model = read_run(tiny_run).section("model")
    return build_tiny_flux(init_seed=model["init_seed"], t5_max_length=model["t5xxl_max_token_length"]).transformer


def _rewritten(run_dir: Path, target: Path, change) -> Path:
    """The run's final LoRA with `change` applied to its tensors, saved as `target`."""
    save_file(change(load_file(str(read_run(run_dir).final.path))), str(target))
    return target


def test_a_real_native_lora_loads_fully_and_changes_the_output(tiny_run: Path, base_transformer) -> None:
    before = probe_output(base_transformer)
    result = check_lora_loads(base_transformer, read_run(tiny_run).final.path, MIN_CHANGE)
    assert result["passed"], result
    assert result["modules_loaded"] == 2 * 14 + 2 * 6  # the diffusers Linears of 2 double and 2 single blocks
    assert result["unconsumed_keys"] == [] and result["warnings"] == [] and result["output_change"] > MIN_CHANGE
    assert torch.equal(probe_output(base_transformer), before)  # unloaded again afterwards


def test_a_lora_whose_up_weights_are_zero_fails(tiny_run: Path, base_transformer, tmp_path: Path) -> None:
    def zero_up(tensors: dict) -> dict:
        return {k: torch.zeros_like(v) if k.endswith("lora_up.weight") else v for k, v in tensors.items()}

    path = _rewritten(tiny_run, tmp_path / "zero.safetensors", zero_up)
    result = check_lora_loads(base_transformer, path, MIN_CHANGE)
    assert not result["passed"]
    assert result["unconsumed_keys"] == [] and result["output_change"] == 0.0 and result["changes_output"] is False


def test_a_renamed_key_fails(tiny_run: Path, base_transformer, tmp_path: Path) -> None:
    def rename(tensors: dict) -> dict:
        tensors["lora_unet_double_blocks_0_img_attn_qkx.lora_down.weight"] = tensors.pop(
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"
        )
        return tensors

    result = check_lora_loads(
        base_transformer, _rewritten(tiny_run, tmp_path / "renamed.safetensors", rename), MIN_CHANGE
    )
    assert not result["passed"]
    assert any(
        k.startswith("lora_unet_double_blocks_0_img_attn_qkx.lora_down.weight") for k in result["unconsumed_keys"]
    )


def test_a_key_for_a_block_the_model_lacks_fails(tiny_run: Path, base_transformer, tmp_path: Path) -> None:
    def add_block_7(tensors: dict) -> dict:
        for suffix in ("lora_down.weight", "lora_up.weight", "alpha"):
            source = tensors[f"lora_unet_double_blocks_0_img_attn_proj.{suffix}"]
            tensors[f"lora_unet_double_blocks_7_img_attn_proj.{suffix}"] = source.clone()
        return tensors

    result = check_lora_loads(
        base_transformer, _rewritten(tiny_run, tmp_path / "b7.safetensors", add_block_7), MIN_CHANGE
    )
    assert not result["passed"]
    assert any("unexpected keys" in w and "transformer_blocks.7" in w for w in result["warnings"])


def test_an_unknown_key_fails(tiny_run: Path, base_transformer, tmp_path: Path) -> None:
    def add_junk(tensors: dict) -> dict:
        tensors["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(8, 32)
        tensors["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(32, 8)
        return tensors

    result = check_lora_loads(base_transformer, _rewritten(tiny_run, tmp_path / "te.safetensors", add_junk), MIN_CHANGE)
    assert not result["passed"]
    assert len(result["unconsumed_keys"]) == 2
