"""Images for likeness, diversity and grids: each prompt x (no LoRA + each strength) x each seed.

Sampling is the native engine's own (Euler over FLUX's shifted schedule, embedded guidance 3.5, start
noise from a CPU generator per seed), so the same seed gives the same start for every row and run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from flux_lora.engines.native.models import FluxParts, decode_latents
from flux_lora.engines.native.train import sample_latents
from flux_lora.eval.base_model import TextEmbedding, lora_strength

# Held out from every caption and sample prompt: new settings, clothes and angles for the same person.
HELDOUT_PROMPTS: tuple[str, ...] = (
    "{trigger}, wearing a red knitted sweater in a cosy cafe, warm window light",
    "{trigger}, in a business suit at a conference podium, looking into the camera",
    "{trigger}, hiking on a snowy mountain ridge in a winter jacket, overcast sky",
    "{trigger}, seen in profile from the left, city street at night with neon signs",
)
SAMPLE, HELDOUT = "sample", "heldout"


@dataclass(frozen=True)
class EvalPrompt:
    key: str  # "sample-00", "heldout-01": names its image folder and grid
    set: str  # SAMPLE (the run's sample prompts) or HELDOUT
    text: str


@dataclass(frozen=True)
class GeneratedImage:
    prompt: EvalPrompt
    strength: float | None  # None: the base model without the LoRA
    seed: int
    path: Path


def eval_prompts(dataset: dict, heldout: bool, limit: int | None) -> list[EvalPrompt]:
    """The run's sample prompts (dataset.sample_prompts) and the held-out set, at most `limit` of each."""
    sample = [p["text"] if isinstance(p, dict) else str(p) for p in dataset.get("sample_prompts") or []]
    trigger = dataset.get("trigger") or dataset.get("class_tokens") or ""
    held = [t.format(trigger=trigger).lstrip(", ") for t in HELDOUT_PROMPTS] if heldout else []
    prompts = []
    for name, texts in ((SAMPLE, sample), (HELDOUT, held)):
        prompts += [EvalPrompt(f"{name}-{i:02d}", name, text) for i, text in enumerate(texts[:limit])]
    return prompts


def row_label(strength: float | None) -> str:
    return "no LoRA" if strength is None else f"LoRA x{strength:g}"


def row_slug(strength: float | None) -> str:
    return "base" if strength is None else f"strength{strength:g}"


def to_uint8(pixels: torch.Tensor):
    """[3, H, W] in [-1, 1] -> [H, W, 3] uint8."""
    return ((pixels.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


@torch.no_grad()
def generate_images(
    parts: FluxParts,
    prompts: list[EvalPrompt],
    embeddings: dict[str, TextEmbedding],
    strengths: list[float | None],
    seeds: list[int],
    *,
    resolution: int,
    steps: int,
    out_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    log: Callable[[str], None] = lambda _: None,
) -> list[GeneratedImage]:
    images = []
    for number, prompt in enumerate(prompts, start=1):
        log(f"eval: prompt {number}/{len(prompts)} ({prompt.key}): {prompt.text}")
        pooled, t5 = embeddings[prompt.text]
        folder = out_dir / prompt.key
        folder.mkdir(parents=True, exist_ok=True)
        for strength in strengths:
            with lora_strength(parts.transformer, strength):
                for seed in seeds:
                    latents = sample_latents(
                        parts.transformer,
                        pooled,
                        t5,
                        seed=seed,
                        width=resolution,
                        height=resolution,
                        steps=steps,
                        device=device,
                        dtype=dtype,
                    )
                    path = folder / f"{row_slug(strength)}_seed{seed}.png"
                    Image.fromarray(to_uint8(decode_latents(parts, latents)[0])).save(path)
                    images.append(GeneratedImage(prompt, strength, seed, path))
    return images
