"""Training data: image + caption files, aspect buckets, and content-keyed latent and text caches on disk.

Caches live under `cache_dir` and are shared by every run that points there (an ablation sweep
encodes its dataset once). An entry's key is a hash of everything that decides its content:
    latents: image file bytes, bucket size, VAE identity
    text:    caption text, text-encoder identity (weights, tokenizers), T5 max token length
so an edited image or caption, another bucket, or another model gets a new entry, never a stale one.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import blake3
import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file

from flux_lora.buckets import bucket_sizes, nearest_bucket
from flux_lora.dataset.discover import SUPPORTED_IMAGE_EXTENSIONS
from flux_lora.dataset.training_set import TrainingSet, training_set_from_folder

# Bump when the way an entry is computed changes (resize filter, crop), so old entries are never read.
CACHE_FORMAT = "1"
# FLUX packs 2x2 latent patches of an 8x-downsampled image: image sides must be multiples of 16.
SIDE_MULTIPLE = 16


@dataclass
class ImageCaption:
    image: Path
    caption: str
    repeats: int = 1
    is_class: bool = False  # a class (regularization) image


@dataclass
class TrainItem:
    """One cached training example, held in memory for the whole run."""

    latents: torch.Tensor  # [16, h, w]
    pooled: torch.Tensor  # [D_clip]
    t5: torch.Tensor  # [L, D_t5]
    bucket: tuple[int, int]  # (width, height) in pixels
    source: str
    repeats: int | None = None  # times per epoch; None: the dataset's num_repeats
    is_class: bool = False  # a class (regularization) image
    loss_weight: float = 1.0  # the class images': dataset.prior_loss_weight


@dataclass
class CacheStats:
    latent_hits: int = 0
    latent_misses: int = 0
    text_hits: int = 0
    text_misses: int = 0


def find_examples(config) -> list[ImageCaption]:
    """The pairs that train: the run's frozen training set, or the same selection made from the folder. Class images
    follow the subject's, each with the times it trains per epoch by kohya's rule (those it never reaches left out)."""
    if config.training_set_file:
        training_set = TrainingSet.read_json(Path(config.training_set_file))
    else:
        training_set = training_set_from_folder(
            Path(config.dataset_path), config.caption_extension, config.class_tokens, config.num_repeats
        )
    if not training_set.examples:
        raise FileNotFoundError(
            f"{training_set.root}: no image to train on ({', '.join(sorted(SUPPORTED_IMAGE_EXTENSIONS))})"
        )
    subject = [ImageCaption(training_set.image_path(e), e.caption, e.repeats) for e in training_set.examples]
    classes = [
        ImageCaption(training_set.reg_image_path(e), e.caption, n, is_class=True)
        for e, n in training_set.reg_epoch_plan()
        if n
    ]
    return subject + classes


def class_images_with_repeats(config) -> int:
    """What sd-scripts records as ss_num_reg_images: the class images times their repeats, before an epoch's places
    are shared out (train_util.py counts `num_repeats * len(img_paths)` per `is_reg` subset)."""
    if not config.training_set_file:
        return 0
    return sum(e.repeats for e in TrainingSet.read_json(Path(config.training_set_file)).regularization)


def load_pixels(data: bytes, bucket: tuple[int, int]) -> torch.Tensor:
    """Image bytes -> [3, h, w] in [-1, 1]: resized to cover the bucket, centre-cropped (sd-scripts' default)."""
    width, height = bucket
    with Image.open(io.BytesIO(data)) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    scale = max(width / image.width, height / image.height)
    resized = (max(width, math.ceil(image.width * scale)), max(height, math.ceil(image.height * scale)))
    image = image.resize(resized, Image.Resampling.LANCZOS)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    image = image.crop((left, top, left + width, top + height))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def latent_key(image_bytes: bytes, bucket: tuple[int, int], vae_identity: str) -> str:
    hasher = blake3.blake3(image_bytes)
    hasher.update(f"|latents|{CACHE_FORMAT}|{bucket[0]}x{bucket[1]}|{vae_identity}".encode())
    return hasher.hexdigest()


def text_key(caption: str, text_encoders_identity: str, max_length: int) -> str:
    payload = f"text|{CACHE_FORMAT}|{text_encoders_identity}|{max_length}|{caption}"
    return blake3.blake3(payload.encode("utf-8")).hexdigest()


class TensorCache:
    """One safetensors file per key under root/<kind>/<key[:2]>/; writes are atomic renames, so
    concurrent runs sharing the folder at worst compute the same entry twice."""

    def __init__(self, root: str | Path, kind: str) -> None:
        self.root = Path(root) / kind

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        try:
            return load_file(str(self.path(key)))
        except (OSError, ValueError, RuntimeError):
            return None  # absent or truncated: recompute

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".safetensors")
        os.close(handle)
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, temporary)
            os.replace(temporary, target)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)


def cached_text_embeddings(parts, captions: list[str], cache: TensorCache, stats: CacheStats) -> dict[str, tuple]:
    """caption -> (pooled, t5 sequence), encoding only the captions not in the cache."""
    from flux_lora.engines.native.models import encode_prompts

    result: dict[str, tuple] = {}
    for caption in dict.fromkeys(captions):
        key = text_key(caption, parts.text_encoders_identity, parts.t5_max_length)
        entry = cache.get(key)
        if entry is None:
            stats.text_misses += 1
            pooled, sequence = encode_prompts(parts, [caption])
            entry = {"pooled": pooled[0], "t5": sequence[0]}
            cache.put(key, entry)
        else:
            stats.text_hits += 1
        result[caption] = (entry["pooled"], entry["t5"])
    return result


def cached_latents(
    parts, examples: list[ImageCaption], buckets: list[tuple[int, int]], cache: TensorCache, stats: CacheStats
) -> list[torch.Tensor]:
    """Latents [16, h/8, w/8] per example, encoding only images not in the cache."""
    from flux_lora.engines.native.models import encode_images

    result = []
    for example, bucket in zip(examples, buckets):
        data = example.image.read_bytes()
        key = latent_key(data, bucket, parts.vae_identity)
        entry = cache.get(key)
        if entry is None:
            stats.latent_misses += 1
            # The posterior sample is seeded by the key, so an entry is the same whoever computes it.
            generator = torch.Generator(device=parts.vae.device).manual_seed(int(key[:15], 16))
            latents = encode_images(parts, load_pixels(data, bucket)[None], generator=generator)[0]
            entry = {"latents": latents}
            cache.put(key, entry)
        else:
            stats.latent_hits += 1
        result.append(entry["latents"])
    return result


def image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as opened:
        return ImageOps.exif_transpose(opened).size


def build_train_items(config, parts) -> tuple[list[TrainItem], CacheStats]:
    """Every training example with its latents and text embeddings, from the caches (filled as needed)."""
    examples = find_examples(config)
    if config.enable_bucket:
        sizes = bucket_sizes(
            config.resolution, config.bucket_reso_steps, config.min_bucket_reso, config.max_bucket_reso
        )
        if not sizes:
            raise ValueError(
                f"no bucket fits resolution {config.resolution} within [{config.min_bucket_reso}, {config.max_bucket_reso}]"
            )
        buckets = [nearest_bucket(*image_size(e.image), sizes) for e in examples]
    else:
        side = config.resolution // SIDE_MULTIPLE * SIDE_MULTIPLE
        buckets = [(side, side)] * len(examples)
    stats = CacheStats()
    latents = cached_latents(parts, examples, buckets, TensorCache(config.cache_dir, "latents"), stats)
    texts = cached_text_embeddings(parts, [e.caption for e in examples], TensorCache(config.cache_dir, "text"), stats)
    items = [
        TrainItem(
            latents=lat,
            pooled=texts[e.caption][0],
            t5=texts[e.caption][1],
            bucket=b,
            source=e.image.name,
            repeats=e.repeats,
            is_class=e.is_class,
            loss_weight=config.prior_loss_weight if e.is_class else 1.0,
        )
        for e, b, lat in zip(examples, buckets, latents)
    ]
    return items, stats


def epoch_batches(
    items: list[TrainItem], num_repeats: int, batch_size: int, generator: torch.Generator
) -> list[list[int]]:
    """One epoch as lists of item indices: each item its repeats (else num_repeats) times, batches within one bucket, order shuffled."""
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index, item in enumerate(items):
        by_bucket.setdefault(item.bucket, []).extend([index] * (item.repeats or num_repeats))
    batches = []
    for bucket in sorted(by_bucket):
        indices = by_bucket[bucket]
        order = torch.randperm(len(indices), generator=generator).tolist()
        shuffled = [indices[i] for i in order]
        batches += [shuffled[i : i + batch_size] for i in range(0, len(shuffled), batch_size)]
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]


def collate(items: list[TrainItem], indices: list[int]) -> dict[str, torch.Tensor]:
    chosen = [items[i] for i in indices]
    return {
        "latents": torch.stack([i.latents for i in chosen]),
        "pooled": torch.stack([i.pooled for i in chosen]),
        "t5": torch.stack([i.t5 for i in chosen]),
        "loss_weights": torch.tensor([i.loss_weight for i in chosen], dtype=torch.float32),
    }
