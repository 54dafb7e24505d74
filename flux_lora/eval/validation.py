"""Validation loss: the plain flow-matching MSE on a fixed set of (image, sigma, noise) triples.

Plain means the velocity target eps - x0 with none of the training extras (no min-SNR weight, no noise
offset, no LoRA dropout), so runs trained with different recipes are measured on one scale. The set is
fixed by the images alone: each image's latents are the VAE posterior mean and its noise is drawn from a
seed derived from the image bytes, so every run on the same dataset (and base model) sees the same set.
"""

from __future__ import annotations

from dataclasses import dataclass

import blake3
import torch

from flux_lora.buckets import bucket_sizes, nearest_bucket
from flux_lora.engines.native import flow
from flux_lora.engines.native.data import image_size, load_pixels
from flux_lora.engines.native.models import FluxParts
from flux_lora.eval.base_model import TextEmbedding
from flux_lora.eval.run_record import EvalImage

SIDE_MULTIPLE = 16  # FLUX packs 2x2 patches of 8x-downsampled latents


@dataclass
class ValidationImage:
    source: str  # the image's path relative to its dataset folder
    caption: str
    latents: torch.Tensor  # [16, h, w], CPU float32
    noise: torch.Tensor  # [n_sigmas, 16, h, w], CPU float32


def image_seed(data: bytes) -> int:
    return int(blake3.blake3(data).hexdigest()[:15], 16)


def eval_bucket(width: int, height: int, resolution: int, dataset: dict) -> tuple[int, int]:
    """The run's aspect buckets at the evaluation resolution (the range widened so the square always fits)."""
    steps = int(dataset.get("bucket_reso_steps") or 64)
    low = min(int(dataset.get("min_bucket_reso") or resolution), resolution)
    high = max(int(dataset.get("max_bucket_reso") or resolution), resolution)
    if not dataset.get("enable_bucket", True):
        return resolution, resolution
    w, h = nearest_bucket(width, height, bucket_sizes(resolution, steps, low, high))
    return w // SIDE_MULTIPLE * SIDE_MULTIPLE, h // SIDE_MULTIPLE * SIDE_MULTIPLE


@torch.no_grad()
def posterior_mean_latents(parts: FluxParts, pixels: torch.Tensor) -> torch.Tensor:
    # The mean, not a posterior sample: a sample would depend on the device's random generator.
    vae = parts.vae
    latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
    return ((latents - vae.config.shift_factor) * vae.config.scaling_factor).float().cpu()


def build_validation_set(
    parts: FluxParts, examples: list[EvalImage], resolution: int, dataset: dict, sigmas: tuple[float, ...]
) -> list[ValidationImage]:
    images = []
    for example in examples:
        data = example.image.read_bytes()
        bucket = eval_bucket(*image_size(example.image), resolution, dataset)
        latents = posterior_mean_latents(parts, load_pixels(data, bucket)[None])[0]
        generator = torch.Generator().manual_seed(image_seed(data))
        noise = torch.randn((len(sigmas), *latents.shape), generator=generator)
        images.append(ValidationImage(example.key or example.image.name, example.caption, latents, noise))
    return images


@torch.no_grad()
def image_losses(
    transformer,
    image: ValidationImage,
    embedding: TextEmbedding,
    sigmas: tuple[float, ...],
    *,
    guidance: float,
    prediction_type: str,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> list[float]:
    """MSE of the predicted velocity against eps - x0 at each sigma, for one image."""
    pooled, t5 = embedding
    _, h, w = image.latents.shape
    img_ids, txt_ids = flow.image_ids(h, w, device, dtype), flow.text_ids(t5.shape[0], device, dtype)
    losses: list[float] = []
    for start in range(0, len(sigmas), batch_size):
        s = torch.tensor(sigmas[start : start + batch_size], dtype=torch.float32)
        b = len(s)
        x0 = image.latents[None].expand(b, -1, -1, -1)
        noise = image.noise[start : start + b]
        noisy = flow.noisy_latents(x0, noise, s)
        prediction = transformer(
            hidden_states=flow.pack_latents(noisy).to(device, dtype),
            encoder_hidden_states=t5[None].expand(b, -1, -1).to(device, dtype),
            pooled_projections=pooled[None].expand(b, -1).to(device, dtype),
            timestep=s.to(device, dtype),
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=torch.full((b,), guidance, device=device, dtype=dtype),
            return_dict=False,
        )[0]
        prediction = flow.unpack_latents(prediction.float().cpu(), h, w)
        prediction = flow.apply_prediction_type(prediction_type, prediction, noisy, s)
        loss = flow.per_sample_loss(prediction, flow.velocity_target(x0, noise), s, loss_type="l2")
        losses.extend(loss.tolist())
    return losses


def validation_point(
    transformer,
    images: list[ValidationImage],
    embeddings: dict[str, TextEmbedding],
    sigmas: tuple[float, ...],
    **kwargs,
) -> dict:
    """{"loss": overall mean, "per_sigma": {sigma: mean over images}, "per_image": {file: mean over sigmas}}."""
    table = torch.tensor([image_losses(transformer, im, embeddings[im.caption], sigmas, **kwargs) for im in images])
    return {
        "loss": float(table.mean()),
        "per_sigma": {f"{sigma:g}": float(v) for sigma, v in zip(sigmas, table.mean(dim=0))},
        "per_image": {im.source: float(v) for im, v in zip(images, table.mean(dim=1))},
    }


def summarize_curve(curve: list[dict]) -> dict:
    """Best and final LoRA points of a curve whose first point may be the base model (file None)."""
    trained = [p for p in curve if p["file"] is not None]
    best = min(trained, key=lambda p: p["loss"])
    final = next((p for p in trained if p.get("final")), trained[-1])
    return {
        "best": {"step": best["step"], "file": best["file"], "loss": best["loss"]},
        "final": {"step": final["step"], "file": final["file"], "loss": final["loss"]},
    }
