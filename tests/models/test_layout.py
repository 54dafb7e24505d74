"""The expected FLUX.1-dev layout against the real architectures: diffusers' FluxTransformer2DModel and
AutoencoderKL, transformers' CLIPTextModel and T5EncoderModel, built on the meta device (no weights) from the
native engine's FLUX.1-dev configs. BFL names map to diffusers names as diffusers' single-file converter maps them."""

from __future__ import annotations

import json

import pytest

from flux_lora.models import FLUX_DEV
from flux_lora.models.layout import block_indices, normalise_key

torch = pytest.importorskip("torch")

CONFIGS = __import__("flux_lora.engines.native.models", fromlist=["MODEL_CONFIGS"]).MODEL_CONFIGS


def _config(name: str) -> dict:
    return json.loads((CONFIGS / name / "config.json").read_text())


def _shapes(model) -> dict[str, tuple[int, ...]]:
    return {normalise_key(k): tuple(v.shape) for k, v in model.state_dict().items()}


def _rows(shapes: dict, *keys: str) -> tuple[int, int]:
    """BFL fuses q, k, v (and the single blocks' MLP input) into one matrix: rows add up, columns agree."""
    assert len({shapes[k][1] for k in keys}) == 1
    return (sum(shapes[k][0] for k in keys), shapes[keys[0]][1])


def _expected(part: str) -> dict[str, tuple[int, ...]]:
    return {t.keys[0]: t.shape for t in FLUX_DEV.parts[part].tensors}


def test_transformer_layout_is_diffusers_flux_dev() -> None:
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(_config("transformer"))
    d = _shapes(model)
    attn = [f"transformer_blocks.0.attn.to_{x}.weight" for x in "qkv"]
    context = [f"transformer_blocks.0.attn.add_{x}_proj.weight" for x in "qkv"]
    single = [f"single_transformer_blocks.0.attn.to_{x}.weight" for x in "qkv"] + [
        "single_transformer_blocks.0.proj_mlp.weight"
    ]
    from_diffusers = {
        "img_in.weight": d["x_embedder.weight"],
        "time_in.in_layer.weight": d["time_text_embed.timestep_embedder.linear_1.weight"],
        "vector_in.in_layer.weight": d["time_text_embed.text_embedder.linear_1.weight"],
        "guidance_in.in_layer.weight": d["time_text_embed.guidance_embedder.linear_1.weight"],
        "txt_in.weight": d["context_embedder.weight"],
        "double_blocks.0.img_attn.qkv.weight": _rows(d, *attn),
        "double_blocks.0.img_attn.norm.query_norm.scale": d["transformer_blocks.0.attn.norm_q.weight"],
        "double_blocks.0.img_mlp.0.weight": d["transformer_blocks.0.ff.net.0.proj.weight"],
        "double_blocks.0.img_mod.lin.weight": d["transformer_blocks.0.norm1.linear.weight"],
        "double_blocks.0.txt_attn.qkv.weight": _rows(d, *context),
        "double_blocks.18.txt_mlp.2.weight": d["transformer_blocks.18.ff_context.net.2.weight"],
        "single_blocks.0.linear1.weight": _rows(d, *single),
        "single_blocks.0.linear2.weight": d["single_transformer_blocks.0.proj_out.weight"],
        "single_blocks.0.modulation.lin.weight": d["single_transformer_blocks.0.norm.linear.weight"],
        "single_blocks.37.norm.key_norm.scale": d["single_transformer_blocks.37.attn.norm_k.weight"],
        "final_layer.linear.weight": d["proj_out.weight"],
        "final_layer.adaLN_modulation.1.weight": d["norm_out.linear.weight"],
    }
    assert _expected("transformer") == from_diffusers
    counts = [c.expected for c in FLUX_DEV.parts["transformer"].blocks]
    assert counts == [len(model.transformer_blocks), len(model.single_transformer_blocks)] == [19, 38]


def test_vae_layout_is_diffusers_flux_autoencoder() -> None:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        model = AutoencoderKL.from_config(_config("vae"))
    d = _shapes(model)
    from_diffusers = {
        "encoder.conv_in.weight": d["encoder.conv_in.weight"],
        "encoder.down.0.block.0.conv1.weight": d["encoder.down_blocks.0.resnets.0.conv1.weight"],
        "encoder.down.3.block.1.conv2.weight": d["encoder.down_blocks.3.resnets.1.conv2.weight"],
        "encoder.mid.attn_1.q.weight": d["encoder.mid_block.attentions.0.to_q.weight"] + (1, 1),  # BFL keeps a 1x1 conv
        "encoder.conv_out.weight": d["encoder.conv_out.weight"],
        "decoder.conv_in.weight": d["decoder.conv_in.weight"],
        "decoder.mid.block_1.conv1.weight": d["decoder.mid_block.resnets.0.conv1.weight"],
        "decoder.up.0.block.2.conv2.weight": d[
            "decoder.up_blocks.3.resnets.2.conv2.weight"
        ],  # BFL counts levels upward
        "decoder.conv_out.weight": d["decoder.conv_out.weight"],
    }
    assert _expected("vae") == from_diffusers
    assert d["decoder.conv_in.weight"][1] == 16  # FLUX's 16 latent channels
    assert [c.expected for c in FLUX_DEV.parts["vae"].blocks] == [
        len(model.encoder.down_blocks),
        len(model.decoder.up_blocks),
    ]


@pytest.mark.parametrize(
    "part, model_class, config_class",
    [("clip_l", "CLIPTextModel", "CLIPTextConfig"), ("t5xxl", "T5EncoderModel", "T5Config")],
)
def test_text_encoder_layouts_are_the_transformers_models(part: str, model_class: str, config_class: str) -> None:
    import transformers

    config = getattr(transformers, config_class).from_dict(_config(part))
    with torch.device("meta"):
        model = getattr(transformers, model_class)(config)
    d = _shapes(model)
    assert {key: d[key] for key in _expected(part)} == _expected(part)
    (count,) = FLUX_DEV.parts[part].blocks
    assert len(block_indices(set(d), count.pattern)) == count.expected == config.num_hidden_layers
