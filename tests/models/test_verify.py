"""The header check on real safetensors files: FLUX.1-dev's true shapes (data as a sparse hole), and broken ones."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from flux_lora.models import FLUX_DEV, FluxDims, flux_layout, model_file_problems, verify_file
from flux_lora.models.verify import sha256_verdict
from tests.models.model_stubs import (
    DEFAULT_FILES,
    TEST_SIZED,
    part_tensors,
    write_model_folder,
    write_part,
    write_safetensors_header,
)

PARTS = FLUX_DEV.parts


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    return write_model_folder(tmp_path / "models")


def test_true_flux_dev_files_pass_and_are_named(models: dict[str, Path]) -> None:
    lines = {key: verify_file(key, path) for key, path in models.items()}
    assert all(v.problem is None for v in lines.values()), [v.line for v in lines.values()]
    assert "FLUX.1-dev transformer, bf16 (BF16), 19 double blocks, 38 single blocks" in lines["transformer"].line
    assert "FLUX autoencoder (ae), fp32 (F32), 4 encoder levels, 4 decoder levels" in lines["vae"].line
    assert "CLIP-L text encoder, fp16 (F16), 12 layers" in lines["clip_l"].line
    assert "T5-XXL text encoder, fp16 (F16), 24 blocks" in lines["t5xxl"].line
    # The data region is a hole: the files are full size on paper and cost no disk.
    assert models["t5xxl"].stat().st_size > 10**9
    assert sum(p.stat().st_blocks for p in models.values()) * 512 < 10 * 2**20


def test_the_stubs_are_files_safetensors_itself_opens(models: dict[str, Path]) -> None:
    from safetensors import safe_open

    with safe_open(str(models["transformer"]), "np") as handle:
        qkv = handle.get_slice("double_blocks.0.img_attn.qkv.weight")
        assert (qkv.get_shape(), qkv.get_dtype()) == ([9216, 3072], "BF16")


def test_truncated_download_is_one_line_with_both_sizes(models: dict[str, Path]) -> None:
    path = models["transformer"]
    full = path.stat().st_size
    os.truncate(path, full - 12345)
    verdict = verify_file("transformer", path)
    assert verdict.line == (
        f"model.transformer: {path} is truncated: {full - 12345:,} bytes where its header says {full:,} (12,345 missing); "
        "download it again (python -m flux_lora.models fetch model=flux_dev paths.models=<dir>)"
    )
    os.truncate(path, 100)  # inside the header itself
    assert "is truncated: 100 bytes, fewer than its header alone needs" in verify_file("transformer", path).line


def test_wrong_file_under_the_right_name(models: dict[str, Path]) -> None:
    shutil.copy(models["vae"], models["transformer"])  # the ae saved as flux1-dev.safetensors
    line = verify_file("transformer", models["transformer"]).line
    assert line == (
        f"model.transformer: {models['transformer']} holds the FLUX autoencoder (ae), not the FLUX.1-dev transformer: "
        "a wrong file under this name; point model.vae at it and model.transformer at flux1-dev.safetensors"
    )
    shutil.copy(models["clip_l"], models["t5xxl"])
    assert "holds the CLIP-L text encoder, not the T5-XXL text encoder" in verify_file("t5xxl", models["t5xxl"]).line


def test_fp8_where_bf16_is_expected_and_back(tmp_path: Path) -> None:
    fp8 = tmp_path / "flux1-dev.safetensors"
    write_part(fp8, PARTS["transformer"], "F8_E4M3")
    line = verify_file("transformer", fp8, fp8_base=False).line
    assert (
        "holds the fp8 e4m3fn (F8_E4M3) FLUX.1-dev transformer where bf16 (BF16) is expected (gpu.fp8_base=false)"
        in line
    )
    assert "set gpu.fp8_base=true" in line and line.count("\n") == 0
    ok = verify_file("transformer", fp8, fp8_base=True)
    assert ok.problem is None and "fp8 e4m3fn (F8_E4M3)" in ok.summary
    # An fp8 T5 under the fp16 name: a renamed file.
    t5 = tmp_path / "t5xxl_fp16.safetensors"
    write_part(t5, PARTS["t5xxl"], "F8_E4M3")
    line = verify_file("t5xxl", t5).line
    assert (
        "holds the fp8 e4m3fn (F8_E4M3) T5-XXL text encoder where 16/32-bit (published: fp16 (F16)) is expected" in line
    )
    assert "(its name does not say fp8); an fp8 file under a 16-bit name" in line
    # ... and the other way: a 16-bit file under the fp8 name.
    named_fp8 = tmp_path / "t5xxl_fp8_e4m3fn.safetensors"
    write_part(named_fp8, PARTS["t5xxl"], "F16")
    line = verify_file("t5xxl", named_fp8).line
    assert "holds the fp16 (F16) T5-XXL text encoder where fp8 e4m3fn (F8_E4M3) is expected (its name says fp8)" in line
    write_part(named_fp8, PARTS["t5xxl"], "F8_E4M3")
    assert verify_file("t5xxl", named_fp8).problem is None
    write_part(fp8, PARTS["transformer"], "F8_E5M2")
    assert "neither engine reads fp8 e5m2 (F8_E5M2)" in verify_file("transformer", fp8, fp8_base=True).line


def test_missing_file_names_the_key_and_the_fetch(tmp_path: Path) -> None:
    line = verify_file("vae", tmp_path / "ae.safetensors").line
    assert line.startswith(
        f"model.vae: {tmp_path / 'ae.safetensors'} not found; set model.vae=<path> or paths.models=<dir>"
    )
    assert "python -m flux_lora.models fetch" in line


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "is empty (0 bytes)"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n", "is a Git LFS pointer"),
        (b"<!DOCTYPE html><html><body>Access denied</body></html>", "is a web page"),
    ],
)
def test_not_a_safetensors_file(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "flux1-dev.safetensors"
    path.write_bytes(content)
    line = verify_file("transformer", path).line
    assert f"{path} {expected}" in line and "download it again" in line


def test_other_flux_models_are_told_apart(tmp_path: Path) -> None:
    path = tmp_path / "flux1-dev.safetensors"
    tensors = part_tensors(PARTS["transformer"], "BF16")
    write_safetensors_header(path, {k: v for k, v in tensors.items() if not k.startswith("guidance_in.")})
    assert (
        "is FLUX.1-schnell or another guidance-free FLUX (no guidance_in), not FLUX.1-dev"
        in verify_file("transformer", path).line
    )
    pruned = {k: v for k, v in tensors.items() if not (k.startswith("double_blocks.") and int(k.split(".")[1]) >= 8)}
    pruned["double_blocks.7.txt_mlp.2.weight"] = ("BF16", (3072, 12288))
    write_safetensors_header(path, pruned)
    line = verify_file("transformer", path).line
    assert (
        "is not the FLUX.1-dev transformer: has 8 double blocks and 38 single blocks where FLUX.1-dev has 19 and 38"
        in line
    )
    # A CLIP of another width (SDXL's CLIP-G is 1280 wide) under the CLIP-L name.
    wide = flux_layout(FluxDims(clip_hidden=1280, clip_intermediate=5120)).parts["clip_l"]
    write_part(tmp_path / "clip_l.safetensors", wide)
    line = verify_file("clip_l", tmp_path / "clip_l.safetensors").line
    assert (
        "is not the CLIP-L text encoder of FLUX.1-dev: embeddings.token_embedding.weight is [49408, 1280] where FLUX.1-dev has [49408, 768]"
        in line
    )


def test_comfyui_prefixes_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "flux1-dev.safetensors"
    write_part(path, PARTS["transformer"], prefix="model.diffusion_model.")
    assert verify_file("transformer", path).problem is None
    write_part(tmp_path / "clip_l.safetensors", PARTS["clip_l"], prefix="")  # transformers 5 saves without text_model.
    assert verify_file("clip_l", tmp_path / "clip_l.safetensors").problem is None


def test_test_sized_layout_only_when_asked(tmp_path: Path) -> None:
    files = write_model_folder(tmp_path, TEST_SIZED, dense=True)
    assert all(verify_file(k, p, layout=TEST_SIZED).problem is None for k, p in files.items())
    refused = verify_file("transformer", files["transformer"])  # the default is FLUX.1-dev, always
    assert (
        "is not the FLUX.1-dev transformer: has 2 double blocks and 2 single blocks where FLUX.1-dev has 19 and 38"
        in refused.line
    )


def test_sha256_against_a_pinned_table(tmp_path: Path) -> None:
    files = write_model_folder(tmp_path, TEST_SIZED, dense=True)
    import hashlib

    real = hashlib.sha256(files["vae"].read_bytes()).hexdigest()
    assert sha256_verdict("vae", files["vae"], {"ae.safetensors": real}).problem is None
    bad = sha256_verdict("vae", files["vae"], {"ae.safetensors": "0" * 64})
    assert f"has sha256 {real} where ae.safetensors has {'0' * 64}" in bad.line
    unpinned = sha256_verdict("vae", files["vae"])  # the shipped table has no verified values yet
    assert unpinned.problem is None and "no pinned value for ae.safetensors: not compared" in unpinned.line


def test_launch_check_is_quiet_for_good_files_and_one_line_per_bad_one(compose_run, tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_model_folder(models)
    run = compose_run("model=flux_dev", f"paths.models={models}")
    assert model_file_problems(run) == []
    os.truncate(models / DEFAULT_FILES["t5xxl"], 1000)
    (models / DEFAULT_FILES["vae"]).unlink()  # missing: the engine's own line says so, not this check
    (problem,) = model_file_problems(run)
    assert problem.startswith(f"model.t5xxl: {models / 't5xxl_fp16.safetensors'} is truncated: 1,000 bytes")
    assert model_file_problems(compose_run("model=tiny")) == []
    # The native engine reads a diffusers folder instead of the single files when one is given.
    assert (
        model_file_problems(compose_run("model=flux_dev", f"paths.models={models}", f"model.diffusers_dir={tmp_path}"))
        == []
    )
