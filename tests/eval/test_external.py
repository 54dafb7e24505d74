"""`python -m flux_lora.eval --lora FILE --dataset DIR`: a LoRA file that did not come from this project, judged on
the same scale with the same eval.json. The files are built here from the tiny model in other tools' conventions:
diffusers/peft keys written by diffusers' own FluxPipeline.save_lora_weights (what ai-toolkit, SimpleTuner and the
diffusers scripts write), and kohya keys for a subset of modules at another alpha (what sd-scripts writes with
`--network_args train_blocks=double`). The tiny model stands in for FLUX.1-dev."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flux_lora.compose import PROJECT_ROOT
from flux_lora.engines.native.lora import add_flux_lora, kohya_state_dict
from flux_lora.engines.native.models import build_tiny_flux
from tests.cli import ONE_THREAD, run_cli
from tests.eval.tiny_eval import EVAL_SECTIONS

CHEAP = [
    "--base-model",
    "tiny",
    "--resolution",
    "64",
    "--steps",
    "2",
    "--strengths",
    "1.0",
    "--seeds",
    "0",
    "--max-prompts",
    "1",
]


def diffusers_format_lora(target: Path) -> Path:
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = build_tiny_flux().transformer
    torch.manual_seed(0)
    transformer.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=4,
            init_lora_weights=False,  # random up weights: it does something
            target_modules=["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "proj_out"],
        )
    )
    FluxPipeline.save_lora_weights(
        target, transformer_lora_layers=get_peft_model_state_dict(transformer), safe_serialization=True
    )
    return target / "pytorch_lora_weights.safetensors"


def kohya_lora_of_another_tool(target: Path) -> Path:
    transformer = build_tiny_flux().transformer
    add_flux_lora(transformer, rank=4, alpha=2.0, dropout=None)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    state = {k: v for k, v in kohya_state_dict(transformer).items() if "_double_blocks_" in k}  # train_blocks=double
    path = target / "kohya_double_blocks.safetensors"
    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(path), metadata={"ss_network_module": "networks.lora_flux"}
    )
    return path


def judge(lora: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return run_cli(
        "--lora",
        str(lora),
        "--dataset",
        str(PROJECT_ROOT / "data" / "sample"),
        "--out",
        str(out),
        *CHEAP,
        module="flux_lora.eval",
        env=ONE_THREAD,
    )


def assert_judged_like_a_run(source: Path, before: bytes, done: subprocess.CompletedProcess[str], judged: Path) -> None:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((judged / "eval" / "eval.json").read_text())
    assert set(result) == EVAL_SECTIONS  # the same eval.json as a run's
    assert result["run"]["label"].startswith(f"a LoRA file from elsewhere: {source.resolve()}")
    validation = result["validation"]
    assert (
        validation["images"] == "validation-folder"
        and validation["count"] == 8
        and result["basis"]["images"] == "validation-folder"
    )
    assert validation["final"]["loss"] != validation["base_loss"]  # the LoRA was applied
    assert result["load_check"]["passed"], result["load_check"]  # diffusers loads it and it changes the output
    assert result["likeness"]["ceiling"]["faces_found"] == 8  # the folder's faces are the references
    assert source.read_bytes() == before  # the file is read, never changed


@pytest.mark.slow
def test_a_lora_in_diffusers_peft_keys_is_judged_by_file(judged_diffusers_lora) -> None:
    source, before, done, judged = judged_diffusers_lora
    assert_judged_like_a_run(source, before, done, judged)


@pytest.mark.slow
def test_a_kohya_lora_of_another_tool_is_judged_by_file(tmp_path: Path) -> None:
    source = kohya_lora_of_another_tool(tmp_path)
    before = source.read_bytes()
    assert_judged_like_a_run(source, before, judge(source, tmp_path / "judged"), tmp_path / "judged")


def test_a_key_format_it_cannot_read_is_one_line(tmp_path: Path) -> None:
    odd = tmp_path / "odd.safetensors"
    save_file({"model.layers.0.weight": torch.zeros(2, 2)}, str(odd))
    done = judge(odd, tmp_path / "judged")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line == (
        f"error: {odd}: LoRA key format not recognised (e.g. 'model.layers.0.weight'); read are kohya "
        "(lora_unet_*.lora_down/up) and diffusers/peft (transformer.*.lora_A/lora_B)"
    )
    assert load_file(str(odd))  # untouched
