"""What each FLUX.1-dev file must hold: key families, block counts and the shapes of a few defining tensors.

The shapes follow from the architecture (`FluxDims`), the same numbers as the native engine's
`engines/native/model_configs/` and sd-scripts' `flux_models.configs["dev"]`: hidden 3072, 24 heads,
19 double and 38 single blocks, 64 input channels (16 latent channels packed 2x2), CLIP-L 768 wide
with 12 layers, T5-XXL d_model 4096 with 24 blocks. Names are BFL's single-file names (what
`flux1-dev.safetensors` and `ae.safetensors` hold), CLIP and T5 as transformers names them.
`tests/models/test_layout.py` checks these shapes against the diffusers and transformers models.
A smaller `FluxDims` gives a test-sized layout; nothing picks one unless asked to.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# The four files, by the config key that names each (model.transformer, model.vae, ...).
PART_KEYS = ("transformer", "vae", "clip_l", "t5xxl")
PRECISION_NAMES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "F8_E4M3": "fp8 e4m3fn", "F8_E5M2": "fp8 e5m2"}
FP8 = "F8_E4M3"  # the fp8 variant sd-scripts and the native engine read (e5m2 and "fnuz" are refused by sd-scripts)
WIDE = ("BF16", "F16", "F32")


@dataclass(frozen=True)
class FluxDims:
    name: str = "FLUX.1-dev"
    hidden: int = 3072
    heads: int = 24
    mlp_ratio: int = 4
    double_blocks: int = 19
    single_blocks: int = 38
    in_channels: int = 64
    vec_in: int = 768  # CLIP-L's pooled output
    context_in: int = 4096  # T5-XXL's d_model
    time_in: int = 256
    ae_channels: int = 128
    ae_channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    ae_res_blocks: int = 2
    latent_channels: int = 16
    clip_hidden: int = 768
    clip_layers: int = 12
    clip_intermediate: int = 3072
    clip_vocab: int = 49408
    clip_positions: int = 77
    t5_d_model: int = 4096
    t5_layers: int = 24
    t5_d_ff: int = 10240
    t5_heads: int = 64
    t5_d_kv: int = 64
    t5_vocab: int = 32128
    t5_buckets: int = 32


@dataclass(frozen=True)
class ExpectedTensor:
    keys: tuple[str, ...]  # alternative names for one tensor; the first present is checked
    shape: tuple[int, ...]


@dataclass(frozen=True)
class BlockCount:
    pattern: str  # regex over normalised keys; group 1 is the block index
    expected: int
    label: str


@dataclass(frozen=True)
class PartLayout:
    key: str  # the config key: model.<key>
    title: str
    families: tuple[str, ...]  # key prefixes every such file has (after normalise_key); they identify the part
    tensors: tuple[ExpectedTensor, ...]
    blocks: tuple[BlockCount, ...]
    weights: tuple[str, ...]  # large matrices whose dtype is the file's precision (norms and biases may differ)
    release_dtype: str  # what the published file holds
    accepted_dtypes: tuple[str, ...] = WIDE  # 16/32-bit floats are cast to the compute dtype by both engines
    absent_means: dict[str, str] = field(default_factory=dict)  # family -> what a file without it is


@dataclass(frozen=True)
class ModelLayout:
    name: str
    parts: dict[str, PartLayout]


def normalise_key(key: str) -> str:
    """Drop the wrappers some tools add: ComfyUI's `model.diffusion_model.`, CLIP's `[...]text_model.`."""
    key = key.removeprefix("model.diffusion_model.")
    return key.rsplit("text_model.", 1)[1] if "text_model." in key else key


def _t(shape: tuple[int, ...], *keys: str) -> ExpectedTensor:
    return ExpectedTensor(keys=keys, shape=shape)


def transformer_layout(d: FluxDims) -> PartLayout:
    h, mlp, head = d.hidden, d.hidden * d.mlp_ratio, d.hidden // d.heads
    last_double, last_single = d.double_blocks - 1, d.single_blocks - 1
    return PartLayout(
        key="transformer",
        title=f"{d.name} transformer",
        families=(
            "double_blocks.",
            "single_blocks.",
            "img_in.",
            "txt_in.",
            "time_in.",
            "vector_in.",
            "guidance_in.",
            "final_layer.",
        ),
        tensors=(
            _t((h, d.in_channels), "img_in.weight"),
            _t((h, d.time_in), "time_in.in_layer.weight"),
            _t((h, d.vec_in), "vector_in.in_layer.weight"),
            _t((h, d.time_in), "guidance_in.in_layer.weight"),
            _t((h, d.context_in), "txt_in.weight"),
            _t((3 * h, h), "double_blocks.0.img_attn.qkv.weight"),
            _t((head,), "double_blocks.0.img_attn.norm.query_norm.scale"),
            _t((mlp, h), "double_blocks.0.img_mlp.0.weight"),
            _t((6 * h, h), "double_blocks.0.img_mod.lin.weight"),
            _t((3 * h, h), "double_blocks.0.txt_attn.qkv.weight"),
            _t((h, mlp), f"double_blocks.{last_double}.txt_mlp.2.weight"),
            _t((3 * h + mlp, h), "single_blocks.0.linear1.weight"),
            _t((h, h + mlp), "single_blocks.0.linear2.weight"),
            _t((3 * h, h), "single_blocks.0.modulation.lin.weight"),
            _t((head,), f"single_blocks.{last_single}.norm.key_norm.scale"),
            _t((d.in_channels, h), "final_layer.linear.weight"),
            _t((2 * h, h), "final_layer.adaLN_modulation.1.weight"),
        ),
        # The keys sd-scripts counts blocks by (flux_utils.analyze_checkpoint_state).
        blocks=(
            BlockCount(r"double_blocks\.(\d+)\.img_attn\.proj\.bias$", d.double_blocks, "double blocks"),
            BlockCount(r"single_blocks\.(\d+)\.modulation\.lin\.bias$", d.single_blocks, "single blocks"),
        ),
        weights=("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"),
        release_dtype="BF16",
        absent_means={"guidance_in.": "FLUX.1-schnell or another guidance-free FLUX (no guidance_in)"},
    )


def vae_layout(d: FluxDims) -> PartLayout:
    widths = [d.ae_channels * m for m in d.ae_channel_mult]
    top, levels = widths[-1], len(widths)
    return PartLayout(
        key="vae",
        title="FLUX autoencoder (ae)",
        families=(
            "encoder.down.",
            "encoder.mid.",
            "decoder.up.",
            "decoder.mid.",
            "encoder.conv_in.",
            "decoder.conv_out.",
        ),
        tensors=(
            _t((widths[0], 3, 3, 3), "encoder.conv_in.weight"),
            _t((widths[0], widths[0], 3, 3), "encoder.down.0.block.0.conv1.weight"),
            _t((top, top, 3, 3), f"encoder.down.{levels - 1}.block.{d.ae_res_blocks - 1}.conv2.weight"),
            _t((top, top, 1, 1), "encoder.mid.attn_1.q.weight"),
            _t((2 * d.latent_channels, top, 3, 3), "encoder.conv_out.weight"),  # mean and log-variance
            _t((top, d.latent_channels, 3, 3), "decoder.conv_in.weight"),
            _t((top, top, 3, 3), "decoder.mid.block_1.conv1.weight"),
            _t((widths[0], widths[0], 3, 3), f"decoder.up.0.block.{d.ae_res_blocks}.conv2.weight"),
            _t((3, widths[0], 3, 3), "decoder.conv_out.weight"),
        ),
        blocks=(
            BlockCount(r"encoder\.down\.(\d+)\.block\.0\.conv1\.weight$", levels, "encoder levels"),
            BlockCount(r"decoder\.up\.(\d+)\.block\.0\.conv1\.weight$", levels, "decoder levels"),
        ),
        weights=("decoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight"),
        release_dtype="F32",
    )


def clip_l_layout(d: FluxDims) -> PartLayout:
    w, last = d.clip_hidden, d.clip_layers - 1
    return PartLayout(
        key="clip_l",
        title="CLIP-L text encoder",
        families=(
            "embeddings.token_embedding.",
            "embeddings.position_embedding.",
            "encoder.layers.",
            "final_layer_norm.",
        ),
        tensors=(
            _t((d.clip_vocab, w), "embeddings.token_embedding.weight"),
            _t((d.clip_positions, w), "embeddings.position_embedding.weight"),
            _t((w, w), "encoder.layers.0.self_attn.q_proj.weight"),
            _t((d.clip_intermediate, w), "encoder.layers.0.mlp.fc1.weight"),
            _t((w, d.clip_intermediate), f"encoder.layers.{last}.mlp.fc2.weight"),
            _t((w,), "final_layer_norm.weight"),
        ),
        blocks=(BlockCount(r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.weight$", d.clip_layers, "layers"),),
        weights=("encoder.layers.0.self_attn.q_proj.weight", "encoder.layers.0.mlp.fc1.weight"),
        release_dtype="F16",
    )


def t5xxl_layout(d: FluxDims) -> PartLayout:
    w, inner, last = d.t5_d_model, d.t5_heads * d.t5_d_kv, d.t5_layers - 1
    return PartLayout(
        key="t5xxl",
        title="T5-XXL text encoder",
        families=("encoder.block.", "encoder.final_layer_norm."),
        tensors=(
            # transformers ties the two; a file keeps one or both.
            _t((d.t5_vocab, w), "shared.weight", "encoder.embed_tokens.weight"),
            _t((inner, w), "encoder.block.0.layer.0.SelfAttention.q.weight"),
            _t((d.t5_buckets, d.t5_heads), "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
            _t((d.t5_d_ff, w), "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"),
            _t((w, d.t5_d_ff), "encoder.block.0.layer.1.DenseReluDense.wo.weight"),
            _t((w, inner), f"encoder.block.{last}.layer.0.SelfAttention.o.weight"),
            _t((w,), "encoder.final_layer_norm.weight"),
        ),
        blocks=(BlockCount(r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.q\.weight$", d.t5_layers, "blocks"),),
        weights=(
            "encoder.block.0.layer.0.SelfAttention.q.weight",
            "encoder.block.0.layer.1.DenseReluDense.wi_0.weight",
        ),
        release_dtype="F16",
    )


def flux_layout(dims: FluxDims) -> ModelLayout:
    parts = (transformer_layout(dims), vae_layout(dims), clip_l_layout(dims), t5xxl_layout(dims))
    return ModelLayout(name=dims.name, parts={p.key: p for p in parts})


FLUX_DEV = flux_layout(FluxDims())

# Recognised so a wrong file is named, not just refused.
OTHER_KINDS: tuple[tuple[tuple[str, ...], str], ...] = (
    (
        ("transformer_blocks.", "single_transformer_blocks."),
        "a diffusers-format FLUX transformer (use BFL's single file, or model.diffusers_dir)",
    ),
    (("encoder.down_blocks.", "decoder.up_blocks."), "a diffusers-format VAE"),
    (("input_blocks.", "output_blocks."), "a Stable Diffusion UNet"),
)


def identify(keys: set[str], layout: ModelLayout) -> str | None:
    """Which part of `layout` (its config key) or which other known kind of file `keys` (normalised) belong to."""
    if any("lora_down" in k or "lora_A" in k or "lora_up" in k for k in keys):
        return "a LoRA"
    for part in layout.parts.values():
        core = [f for f in part.families if f not in part.absent_means]
        if all(any(k.startswith(f) for k in keys) for f in core[:2]):
            return part.key
    for families, what in OTHER_KINDS:
        if all(any(k.startswith(f) for k in keys) for f in families):
            return what
    return None


def block_indices(keys: set[str], pattern: str) -> set[int]:
    compiled = re.compile(pattern)
    return {int(m.group(1)) for k in keys if (m := compiled.match(k))}
