"""The tiny FLUX build and the FLUX.1-dev loaders, exercised offline on tiny weights in real files."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from safetensors.torch import save_file

from flux_lora.engines.native.models import (
    MODEL_CONFIGS,
    ModelFilesMissing,
    build_tiny_flux,
    decode_latents,
    encode_images,
    encode_prompts,
    load_flux_dev,
    missing_flux_dev_files,
)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def pack(latents: torch.Tensor) -> torch.Tensor:
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


def image_ids(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def run_transformer(parts, prompt="TOK Woman", seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, 32, 32, generator=generator)
    pooled, sequence = encode_prompts(parts, [prompt])
    with torch.no_grad():
        return parts.transformer(
            hidden_states=pack(latents),
            timestep=torch.tensor([0.5]),
            guidance=torch.tensor([1.0]),
            pooled_projections=pooled,
            encoder_hidden_states=sequence,
            txt_ids=torch.zeros(sequence.shape[1], 3),
            img_ids=image_ids(16, 16),
            return_dict=False,
        )[0]


def all_weights(parts) -> dict[str, torch.Tensor]:
    weights = {}
    for name in ("transformer", "vae", "clip_encoder", "t5_encoder"):
        weights.update({f"{name}.{k}": v for k, v in getattr(parts, name).state_dict().items()})
    return weights


def test_tiny_build_is_fast_and_deterministic_per_seed():
    start = time.perf_counter()
    first = build_tiny_flux(init_seed=0)
    assert time.perf_counter() - start < 2.0
    same, other = all_weights(build_tiny_flux(init_seed=0)), all_weights(build_tiny_flux(init_seed=1))
    weights = all_weights(first)
    assert all(torch.equal(weights[k], same[k]) for k in weights)
    assert not all(torch.equal(weights[k], other[k]) for k in weights if weights[k].is_floating_point())
    assert sum(p.numel() for p in first.transformer.parameters()) < 1_000_000
    assert first.transformer.config.guidance_embeds
    assert first.vae_identity != build_tiny_flux(init_seed=1).vae_identity


def test_tiny_transformer_forward_with_packed_latents_ids_and_guidance():
    out = run_transformer(build_tiny_flux())
    assert out.shape == (1, 256, 64)
    assert torch.isfinite(out).all()


def test_encoders_shapes_and_round_trip_shapes():
    parts = build_tiny_flux(t5_max_length=48)
    pooled, sequence = encode_prompts(parts, ["TOK Woman", "a photo of TOK Woman, smiling; ünïcödé ✓"])
    assert pooled.shape == (2, parts.transformer.config.pooled_projection_dim)
    assert sequence.shape == (2, 48, parts.transformer.config.joint_attention_dim)
    assert not torch.equal(pooled[0], pooled[1])
    latents = encode_images(parts, torch.rand(2, 3, 256, 128) * 2 - 1)
    assert latents.shape == (2, 16, 32, 16)
    pixels = decode_latents(parts, latents)
    assert pixels.shape == (2, 3, 256, 128)
    assert pixels.min() >= -1 and pixels.max() <= 1


def test_flux_pipeline_samples_256px_offline():
    parts = build_tiny_flux()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
        vae=parts.vae,
        text_encoder=parts.clip_encoder,
        tokenizer=parts.clip_tokenizer,
        text_encoder_2=parts.t5_encoder,
        tokenizer_2=parts.t5_tokenizer,
        transformer=parts.transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        "TOK Woman",
        height=256,
        width=256,
        num_inference_steps=2,
        guidance_scale=3.5,
        max_sequence_length=parts.t5_max_length,
        generator=torch.Generator().manual_seed(0),
        output_type="pil",
    ).images
    assert images[0].size == (256, 256)


def test_missing_files_name_each_file_and_its_key(tmp_path):
    (tmp_path / "ae.safetensors").write_bytes(b"x")
    lines = missing_flux_dev_files(
        transformer=str(tmp_path / "flux1-dev.safetensors"),
        vae=str(tmp_path / "ae.safetensors"),
        clip_l=str(tmp_path / "clip_l.safetensors"),
        t5xxl=None,
        diffusers_dir=None,
        tokenizer_dir=str(tmp_path / "tokenizers"),
    )
    assert lines[0] == (
        f"model.transformer: {tmp_path}/flux1-dev.safetensors not found; "
        "set model.transformer=<path> or paths.models=<dir>"
    )
    assert lines[1].startswith(f"model.clip_l: {tmp_path}/clip_l.safetensors not found")
    assert lines[2].startswith("model.t5xxl: not set")
    assert [line.split(":")[0] for line in lines[3:]] == ["model.tokenizer_dir"] * 2
    with pytest.raises(ModelFilesMissing) as error:
        load_flux_dev(
            transformer=str(tmp_path / "flux1-dev.safetensors"),
            vae=str(tmp_path / "ae.safetensors"),
            clip_l=str(tmp_path / "clip_l.safetensors"),
            t5xxl=None,
            diffusers_dir=None,
            tokenizer_dir=str(tmp_path / "tokenizers"),
        )
    assert str(error.value) == "; ".join(lines)
    assert missing_flux_dev_files(
        transformer=None, vae=None, clip_l=None, t5xxl=None, diffusers_dir=str(tmp_path / "nope"), tokenizer_dir=None
    ) == [f"model.diffusers_dir: {tmp_path}/nope not found; set model.diffusers_dir=<path>"]


def test_shipped_configs_are_flux1_dev():
    transformer = json.loads((MODEL_CONFIGS / "transformer" / "config.json").read_text())
    assert (transformer["num_layers"], transformer["num_single_layers"], transformer["guidance_embeds"]) == (
        19,
        38,
        True,
    )
    assert sum(transformer["axes_dims_rope"]) == transformer["attention_head_dim"]
    vae = json.loads((MODEL_CONFIGS / "vae" / "config.json").read_text())
    assert (vae["latent_channels"], vae["shift_factor"], vae["scaling_factor"]) == (16, 0.1159, 0.3611)
    clip = json.loads((MODEL_CONFIGS / "clip_l" / "config.json").read_text())
    t5 = json.loads((MODEL_CONFIGS / "t5xxl" / "config.json").read_text())
    assert clip["hidden_size"] == transformer["pooled_projection_dim"]
    assert t5["d_model"] == transformer["joint_attention_dim"]


# --- tiny weights written in the formats a kohya user has (inverse of diffusers' conversions) ---


def to_bfl_transformer(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renames = [
        (r"time_text_embed\.timestep_embedder\.linear_1", "time_in.in_layer"),
        (r"time_text_embed\.timestep_embedder\.linear_2", "time_in.out_layer"),
        (r"time_text_embed\.text_embedder\.linear_1", "vector_in.in_layer"),
        (r"time_text_embed\.text_embedder\.linear_2", "vector_in.out_layer"),
        (r"time_text_embed\.guidance_embedder\.linear_1", "guidance_in.in_layer"),
        (r"time_text_embed\.guidance_embedder\.linear_2", "guidance_in.out_layer"),
        (r"context_embedder", "txt_in"),
        (r"x_embedder", "img_in"),
        (r"^transformer_blocks\.(\d+)\.norm1\.linear", r"double_blocks.\1.img_mod.lin"),
        (r"^transformer_blocks\.(\d+)\.norm1_context\.linear", r"double_blocks.\1.txt_mod.lin"),
        (r"^transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"double_blocks.\1.img_attn.norm.query_norm.scale"),
        (r"^transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"double_blocks.\1.img_attn.norm.key_norm.scale"),
        (r"^transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight", r"double_blocks.\1.txt_attn.norm.query_norm.scale"),
        (r"^transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight", r"double_blocks.\1.txt_attn.norm.key_norm.scale"),
        (r"^transformer_blocks\.(\d+)\.ff\.net\.0\.proj", r"double_blocks.\1.img_mlp.0"),
        (r"^transformer_blocks\.(\d+)\.ff\.net\.2", r"double_blocks.\1.img_mlp.2"),
        (r"^transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj", r"double_blocks.\1.txt_mlp.0"),
        (r"^transformer_blocks\.(\d+)\.ff_context\.net\.2", r"double_blocks.\1.txt_mlp.2"),
        (r"^transformer_blocks\.(\d+)\.attn\.to_out\.0", r"double_blocks.\1.img_attn.proj"),
        (r"^transformer_blocks\.(\d+)\.attn\.to_add_out", r"double_blocks.\1.txt_attn.proj"),
        (r"^single_transformer_blocks\.(\d+)\.norm\.linear", r"single_blocks.\1.modulation.lin"),
        (r"^single_transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"single_blocks.\1.norm.query_norm.scale"),
        (r"^single_transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"single_blocks.\1.norm.key_norm.scale"),
        (r"^single_transformer_blocks\.(\d+)\.proj_out", r"single_blocks.\1.linear2"),
        (r"^proj_out", "final_layer.linear"),
    ]
    fused = {
        r"^transformer_blocks\.(\d+)\.attn\.(to_q|to_k|to_v)\.": (
            "double_blocks.{}.img_attn.qkv",
            ["to_q", "to_k", "to_v"],
        ),
        r"^transformer_blocks\.(\d+)\.attn\.(add_q_proj|add_k_proj|add_v_proj)\.": (
            "double_blocks.{}.txt_attn.qkv",
            ["add_q_proj", "add_k_proj", "add_v_proj"],
        ),
        r"^single_transformer_blocks\.(\d+)\.(attn\.to_q|attn\.to_k|attn\.to_v|proj_mlp)\.": (
            "single_blocks.{}.linear1",
            ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
        ),
    }
    out, groups = {}, {}
    for key, value in state.items():
        for pattern, (target, order) in fused.items():
            match = re.match(pattern, key)
            if match:
                kind = key.rsplit(".", 1)[1]
                groups.setdefault((target.format(match[1]), kind), {})[order.index(match[2])] = value
                break
        else:
            if key.startswith("norm_out.linear"):
                scale, shift = value.chunk(2)
                out[key.replace("norm_out.linear", "final_layer.adaLN_modulation.1")] = torch.cat([shift, scale])
                continue
            new = key
            for pattern, replacement in renames:
                new = re.sub(pattern, replacement, new)
            assert new != key, key
            out[new] = value
    for (target, kind), parts in groups.items():
        out[f"{target}.{kind}"] = torch.cat([parts[i] for i in sorted(parts)])
    return {f"model.diffusion_model.{k}": v.contiguous() for k, v in out.items()}


def to_ldm_vae(state: dict[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    renames = [
        (r"conv_norm_out", "norm_out"),
        (r"conv_shortcut", "nin_shortcut"),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (r"mid_block\.resnets\.0\.", "mid.block_1."),
        (r"mid_block\.resnets\.1\.", "mid.block_2."),
        (r"mid_block\.attentions\.0\.group_norm", "mid.attn_1.norm"),
        (r"mid_block\.attentions\.0\.to_q", "mid.attn_1.q"),
        (r"mid_block\.attentions\.0\.to_k", "mid.attn_1.k"),
        (r"mid_block\.attentions\.0\.to_v", "mid.attn_1.v"),
        (r"mid_block\.attentions\.0\.to_out\.0", "mid.attn_1.proj_out"),
    ]
    out = {}
    for key, value in state.items():
        new = key
        for pattern, replacement in renames:
            new = re.sub(pattern, replacement, new)
        new = re.sub(
            r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{num_blocks - 1 - int(m[1])}.block.", new
        )
        new = re.sub(
            r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
            lambda m: f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample.",
            new,
        )
        if ".attn_1." in new and new.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM attention projections are 1x1 convolutions
        out[new] = value.contiguous()
    return out


def write_single_files(parts, root):
    models = root / "models"
    models.mkdir()
    save_file(to_bfl_transformer(parts.transformer.state_dict()), models / "flux1-dev.safetensors")
    save_file(to_ldm_vae(parts.vae.state_dict(), len(parts.vae.config.block_out_channels)), models / "ae.safetensors")
    # ComfyUI's clip_l keys start with "text_model."; its T5 file has no duplicate embed_tokens.
    save_file({f"text_model.{k}": v for k, v in parts.clip_encoder.state_dict().items()}, models / "clip_l.safetensors")
    save_file(
        {k: v for k, v in parts.t5_encoder.state_dict().items() if k != "encoder.embed_tokens.weight"},
        models / "t5xxl_fp16.safetensors",
    )
    parts.clip_tokenizer.save_pretrained(models / "tokenizers" / "tokenizer")
    parts.t5_tokenizer.save_pretrained(models / "tokenizers" / "tokenizer_2")
    configs = root / "configs"
    for name, config in (
        ("transformer", dict(parts.transformer.config)),
        ("vae", dict(parts.vae.config)),
        ("clip_l", parts.clip_encoder.config.to_dict()),
        ("t5xxl", parts.t5_encoder.config.to_dict()),
    ):
        (configs / name).mkdir(parents=True)
        (configs / name / "config.json").write_text(json.dumps(config, default=list))
    return models, configs


def assert_same_model(loaded, reference):
    got, want = all_weights(loaded), all_weights(reference)
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    # Same weights; outputs may differ by an ulp from memory layout alone.
    torch.testing.assert_close(run_transformer(loaded), run_transformer(reference))
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(decode_latents(loaded, latents), decode_latents(reference, latents))
    for got, want in zip(encode_prompts(loaded, ["TOK Woman"]), encode_prompts(reference, ["TOK Woman"])):
        assert torch.equal(got, want)


def test_single_files_load_through_the_flux_dev_path(tmp_path):
    reference = build_tiny_flux(init_seed=3, t5_max_length=64)
    models, configs = write_single_files(reference, tmp_path)
    loaded = load_flux_dev(
        transformer=str(models / "flux1-dev.safetensors"),
        vae=str(models / "ae.safetensors"),
        clip_l=str(models / "clip_l.safetensors"),
        t5xxl=str(models / "t5xxl_fp16.safetensors"),
        diffusers_dir=None,
        tokenizer_dir=str(models / "tokenizers"),
        t5_max_length=64,
        dtype=torch.float32,
        config_dir=configs,
    )
    assert_same_model(loaded, reference)
    assert loaded.transformer.dtype == torch.float32
    assert not any(p.requires_grad for p in loaded.vae.parameters())
    assert loaded.vae_identity.startswith("flux-vae-") and loaded.text_encoders_identity.endswith("t5len64")
    bf16 = load_flux_dev(
        transformer=str(models / "flux1-dev.safetensors"),
        vae=str(models / "ae.safetensors"),
        clip_l=str(models / "clip_l.safetensors"),
        t5xxl=str(models / "t5xxl_fp16.safetensors"),
        diffusers_dir=None,
        tokenizer_dir=str(models / "tokenizers"),
        t5_max_length=64,
        config_dir=configs,
    )
    assert bf16.transformer.dtype == bf16.vae.dtype == bf16.t5_encoder.dtype == torch.bfloat16
    assert bf16.clip_encoder.embeddings.position_ids.dtype == torch.int64  # integer buffers keep their dtype
    assert bf16.vae_identity == loaded.vae_identity


def test_diffusers_folder_loads(tmp_path):
    reference = build_tiny_flux(init_seed=4, t5_max_length=64)
    FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=reference.vae,
        text_encoder=reference.clip_encoder,
        tokenizer=reference.clip_tokenizer,
        text_encoder_2=reference.t5_encoder,
        tokenizer_2=reference.t5_tokenizer,
        transformer=reference.transformer,
    ).save_pretrained(tmp_path / "flux")
    loaded = load_flux_dev(
        transformer=None,
        vae=None,
        clip_l=None,
        t5xxl=None,
        diffusers_dir=str(tmp_path / "flux"),
        tokenizer_dir=None,
        t5_max_length=64,
        dtype=torch.float32,
    )
    assert_same_model(loaded, reference)
