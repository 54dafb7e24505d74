"""The FLUX parts the native engine trains with: a tiny random build for tests, or FLUX.1-dev from local files.

Nothing here ever downloads: configs ship in `model_configs/`, tokenizers come from a local folder
(or are built in code for the tiny model), and every loader runs with `local_files_only`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, FluxTransformer2DModel
from diffusers.loaders.single_file_utils import (
    convert_flux_transformer_checkpoint_to_diffusers,
    convert_ldm_vae_checkpoint,
)
from safetensors.torch import load_file
from tokenizers import pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPTokenizerFast,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    T5TokenizerFast,
)

from flux_lora.engines.native.model_files import (  # noqa: F401 - missing_flux_dev_files is part of this module's API
    CLIP_TOKENIZER_SUBDIRS,
    DIFFUSERS_SUBDIRS,
    T5_TOKENIZER_SUBDIRS,
    find_tokenizer_dir,
    missing_flux_dev_files,
)

MODEL_CONFIGS = Path(__file__).parent / "model_configs"
CLIP_MAX_LENGTH = 77


@dataclass
class FluxParts:
    transformer: FluxTransformer2DModel
    vae: AutoencoderKL
    clip_tokenizer: CLIPTokenizer | CLIPTokenizerFast
    clip_encoder: CLIPTextModel
    t5_tokenizer: T5TokenizerFast | T5Tokenizer
    t5_encoder: T5EncoderModel
    vae_identity: str  # stable id of the VAE weights, for latent cache keys
    text_encoders_identity: str  # stable id of CLIP+T5 weights, tokenizers and t5_max_length, for text cache keys
    t5_max_length: int


class ModelFilesMissing(FileNotFoundError):
    """Raised by `load_flux_dev`; the message lists each missing file with the config key that fixes it."""


# ---------------------------------------------------------------------------------------------------
# Tiny FLUX: every part of the real architecture, a few thousand times smaller, random but seeded.
# ---------------------------------------------------------------------------------------------------

TINY_HIDDEN = 32  # CLIP hidden size = FLUX pooled_projection_dim; T5 d_model = FLUX joint_attention_dim


def _tiny_clip_tokenizer() -> CLIPTokenizer:
    # Byte-level BPE without merges: every byte is a token, so any text encodes and nothing is read from disk.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    pieces = alphabet + [c + "</w>" for c in alphabet]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    # End token gets the highest id, as in the real CLIP vocabulary, so argmax pooling also finds it.
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def _tiny_t5_tokenizer(max_length: int) -> T5Tokenizer:
    # Unigram over single printable characters (plus word-start variants); other characters map to <unk>.
    chars = [chr(c) for c in range(33, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def _inference_ready(parts: FluxParts) -> FluxParts:
    """Every part in eval mode; the VAE and text encoders frozen (the trainer freezes the transformer itself)."""
    for module in (parts.transformer, parts.vae, parts.clip_encoder, parts.t5_encoder):
        module.eval()
    for module in (parts.vae, parts.clip_encoder, parts.t5_encoder):
        module.requires_grad_(False)
    return parts


def build_tiny_flux(init_seed: int = 0, t5_max_length: int = 64) -> FluxParts:
    """A FLUX.1-dev-shaped model small enough for a CPU training step in tens of milliseconds."""
    clip_tokenizer = _tiny_clip_tokenizer()
    t5_tokenizer = _tiny_t5_tokenizer(t5_max_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,  # 16 latent channels x 2x2 packing, as in FLUX
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=TINY_HIDDEN,
            pooled_projection_dim=TINY_HIDDEN,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),  # must sum to attention_head_dim
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,  # 4 blocks: 8x downsampling like FLUX's ae
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=4,
            sample_size=256,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        clip_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(clip_tokenizer),
                hidden_size=TINY_HIDDEN,
                intermediate_size=64,
                projection_dim=TINY_HIDDEN,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=CLIP_MAX_LENGTH,
                hidden_act="quick_gelu",
                # Pooling picks the first eos position, so the ids must be the tokenizer's.
                bos_token_id=clip_tokenizer.bos_token_id,
                eos_token_id=clip_tokenizer.eos_token_id,
                pad_token_id=clip_tokenizer.pad_token_id,
            )
        )
        t5_encoder = T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tokenizer),
                d_model=TINY_HIDDEN,
                d_kv=16,
                d_ff=64,
                num_layers=2,
                num_heads=2,
                relative_attention_num_buckets=8,
                feed_forward_proj="gated-gelu",
                dropout_rate=0.0,
                pad_token_id=t5_tokenizer.pad_token_id,
                eos_token_id=t5_tokenizer.eos_token_id,
            )
        )
    return _inference_ready(
        FluxParts(
            transformer=transformer,
            vae=vae,
            clip_tokenizer=clip_tokenizer,
            clip_encoder=clip_encoder,
            t5_tokenizer=t5_tokenizer,
            t5_encoder=t5_encoder,
            vae_identity=f"tiny-flux-vae-seed{init_seed}",
            text_encoders_identity=f"tiny-flux-text-seed{init_seed}-t5len{t5_max_length}",
            t5_max_length=t5_max_length,
        )
    )


# ---------------------------------------------------------------------------------------------------
# FLUX.1-dev from local files.
# ---------------------------------------------------------------------------------------------------


def _file_identity(path: Path) -> str:
    # Size plus the first and last MiB: covers the safetensors header (names, shapes, dtypes) and some
    # weights, without reading 10-24 GB; independent of where the file lives.
    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(str(size).encode())
    with path.open("rb") as handle:
        digest.update(handle.read(1 << 20))
        if size > 2 << 20:
            handle.seek(-(1 << 20), 2)
            digest.update(handle.read())
    return digest.hexdigest()


def _tree_identity(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for root in paths:
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for file in files:
            digest.update(file.name.encode())
            digest.update(_file_identity(file).encode())
    return digest.hexdigest()[:16]


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    # Integer buffers (CLIP position_ids) keep their dtype.
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def load_bfl_transformer(path: Path, config: dict, dtype: torch.dtype) -> FluxTransformer2DModel:
    """A FLUX transformer from a BFL/kohya single file (`double_blocks.*`, `single_blocks.*`), any size."""
    checkpoint = load_file(str(path))
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    # diffusers splits single-block linear1 at FLUX.1's fixed 3072/12288 sizes: hand it empty stand-ins
    # of that shape and split the real tensors here by this config's sizes.
    linear1 = {k: checkpoint.pop(k) for k in [k for k in checkpoint if ".linear1." in k]}
    for key, value in linear1.items():
        checkpoint[key] = torch.empty((21504, 0) if value.ndim == 2 else (21504,), dtype=value.dtype)
    converted = convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    for key, value in linear1.items():
        block = key.removeprefix("model.diffusion_model.").split(".")[1]
        prefix = f"single_transformer_blocks.{block}."
        kind = key.rsplit(".", 1)[1]
        q, k, v, mlp = torch.split(value, [inner, inner, inner, value.shape[0] - 3 * inner], dim=0)
        for name, part in (("attn.to_q", q), ("attn.to_k", k), ("attn.to_v", v), ("proj_mlp", mlp)):
            converted[f"{prefix}{name}.{kind}"] = part
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(config)
    model.load_state_dict(_cast(converted, dtype), strict=True, assign=True)
    return model


def load_bfl_vae(path: Path, config: dict, dtype: torch.dtype) -> AutoencoderKL:
    """FLUX's autoencoder from BFL's `ae.safetensors` (LDM key names)."""
    converted = convert_ldm_vae_checkpoint(load_file(str(path)), config)
    with init_empty_weights():
        model = AutoencoderKL.from_config(config)
    model.load_state_dict(_cast(converted, dtype), strict=True, assign=True)
    return model


def _load_transformers_encoder(model_cls, config, path: Path, dtype: torch.dtype):
    state = load_file(str(path))
    with init_empty_weights():
        model = model_cls(config)
    expected = set(model.state_dict())
    # ComfyUI-style files prefix CLIP keys with "text_model." (sometimes more); transformers 5 does not.
    state = {k.split("text_model.", 1)[-1]: v for k, v in state.items()}
    state = _cast({k: v for k, v in state.items() if k in expected}, dtype)
    missing = expected - set(state) - set(getattr(model, "_tied_weights_keys", None) or {})
    missing -= {name for name, _ in model.named_buffers()}
    if missing:
        raise ValueError(f"{path}: not a {model_cls.__name__} checkpoint; missing {sorted(missing)[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model


def load_flux_dev(
    *,
    transformer: str | None,
    vae: str | None,
    clip_l: str | None,
    t5xxl: str | None,
    diffusers_dir: str | None,
    tokenizer_dir: str | None,
    t5_max_length: int = 512,
    dtype: torch.dtype = torch.bfloat16,
    config_dir: Path = MODEL_CONFIGS,
) -> FluxParts:
    """FLUX.1-dev from local files only; see `missing_flux_dev_files` for which files are read.

    `config_dir` holds `transformer/`, `vae/`, `clip_l/`, `t5xxl/` config folders (FLUX.1-dev's by default).
    """
    missing = missing_flux_dev_files(
        transformer=transformer,
        vae=vae,
        clip_l=clip_l,
        t5xxl=t5xxl,
        diffusers_dir=diffusers_dir,
        tokenizer_dir=tokenizer_dir,
    )
    if missing:
        raise ModelFilesMissing("; ".join(missing))
    if diffusers_dir is not None:
        parts = _load_diffusers_folder(Path(diffusers_dir), dtype)
        root = Path(diffusers_dir)
        vae_id = _tree_identity([root / "vae"])
        text_id = _tree_identity([root / s for s in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")])
    else:
        configs = {
            name: json.loads((config_dir / name / "config.json").read_text())
            for name in ("transformer", "vae", "clip_l", "t5xxl")
        }
        tok_root = Path(tokenizer_dir)
        clip_tok_dir = find_tokenizer_dir(tok_root, CLIP_TOKENIZER_SUBDIRS)
        t5_tok_dir = find_tokenizer_dir(tok_root, T5_TOKENIZER_SUBDIRS)
        parts = (
            load_bfl_transformer(Path(transformer), configs["transformer"], dtype),
            load_bfl_vae(Path(vae), configs["vae"], dtype),
            CLIPTokenizer.from_pretrained(clip_tok_dir, local_files_only=True),
            _load_transformers_encoder(CLIPTextModel, CLIPTextConfig.from_dict(configs["clip_l"]), Path(clip_l), dtype),
            T5TokenizerFast.from_pretrained(t5_tok_dir, local_files_only=True),
            _load_transformers_encoder(T5EncoderModel, T5Config.from_dict(configs["t5xxl"]), Path(t5xxl), dtype),
        )
        vae_id = _tree_identity([Path(vae)])
        text_id = _tree_identity([Path(clip_l), Path(t5xxl), clip_tok_dir, t5_tok_dir])
    model, autoencoder, clip_tokenizer, clip_encoder, t5_tokenizer, t5_encoder = parts
    return _inference_ready(
        FluxParts(
            transformer=model,
            vae=autoencoder,
            clip_tokenizer=clip_tokenizer,
            clip_encoder=clip_encoder,
            t5_tokenizer=t5_tokenizer,
            t5_encoder=t5_encoder,
            vae_identity=f"flux-vae-{vae_id}",
            text_encoders_identity=f"flux-text-{text_id}-t5len{t5_max_length}",
            t5_max_length=t5_max_length,
        )
    )


def _load_diffusers_folder(root: Path, dtype: torch.dtype):
    local = {"local_files_only": True}
    return (
        FluxTransformer2DModel.from_pretrained(root, subfolder="transformer", torch_dtype=dtype, **local),
        AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=dtype, **local),
        CLIPTokenizer.from_pretrained(root / "tokenizer", **local),
        CLIPTextModel.from_pretrained(root / "text_encoder", dtype=dtype, **local),
        T5TokenizerFast.from_pretrained(root / "tokenizer_2", **local),
        T5EncoderModel.from_pretrained(root / "text_encoder_2", dtype=dtype, **local),
    )


# ---------------------------------------------------------------------------------------------------
# Encoders, as FluxPipeline uses them.
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_prompts(parts: FluxParts, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled CLIP [B, pooled_dim], T5 sequence [B, t5_max_length, joint_dim]), unmasked like FluxPipeline."""
    clip_ids = parts.clip_tokenizer(
        prompts, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids
    pooled = parts.clip_encoder(clip_ids.to(parts.clip_encoder.device), output_hidden_states=False).pooler_output
    t5_ids = parts.t5_tokenizer(
        prompts, padding="max_length", max_length=parts.t5_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    sequence = parts.t5_encoder(t5_ids.to(parts.t5_encoder.device), output_hidden_states=False)[0]
    return pooled, sequence


@torch.no_grad()
def encode_images(parts: FluxParts, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pixels [B,3,H,W] in [-1,1] -> normalised latents [B,16,H/8,W/8], sampled from the posterior like kohya."""
    vae = parts.vae
    latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample(generator)
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(parts: FluxParts, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents [B,16,h,w] -> pixels [B,3,8h,8w] in [-1,1]."""
    vae = parts.vae
    latents = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    return vae.decode(latents).sample.clamp(-1, 1)
