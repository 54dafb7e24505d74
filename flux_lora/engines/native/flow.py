"""Rectified-flow training math for FLUX, with sd-scripts' meaning for every option.

Notation: x0 the clean latents, eps the noise, sigma in (0, 1) the noise level of each sample.

    noisy  x_sigma = (1 - sigma) * x0 + sigma * eps
    target v       = eps - x0                      (the model predicts the velocity)
    model input    timestep = sigma (diffusers' FluxTransformer2DModel multiplies it by 1000)

Two options that sd-scripts accepts but ignores for FLUX are defined here for flow matching:

noise offset (strength o): eps' = eps + o * delta, delta ~ N(0, 1) of shape [B, C, 1, 1], one
    value per sample and latent channel; eps' replaces eps in both the noisy input and the target,
    so the path starts from noise whose per-channel mean is shifted and the model learns to move
    the global brightness/colour of an image (the SD noise-offset idea, carried over unchanged).

min-SNR-gamma (Hang et al. 2023): along the flow path the signal-to-noise ratio is
    SNR(sigma) = ((1 - sigma) / sigma)^2.
    Min-SNR weights the x0-space error by min(SNR, gamma). Because x0 = x_sigma - sigma * v, the
    velocity error equals the x0 error divided by sigma^2, so the velocity loss of each sample is
    multiplied by
        w(sigma) = sigma^2 * min(SNR, gamma) = min((1 - sigma)^2, gamma * sigma^2),
    the flow-matching analogue of the paper's v-prediction weight min(SNR, gamma) / (SNR + 1)
    (min_snr_variant flow_min_snr). The clamp variant only caps the weight of low-noise samples,
    w(sigma) = min(1, gamma * sigma^2), and leaves high-noise samples at weight 1.

The shift formulas live in flux_lora.noise_levels (torch-free), so the launcher's check-time summary
of a recipe uses the same ones.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flux_lora.noise_levels import (  # noqa: F401 (part of this module's math)
    NUM_TRAIN_TIMESTEPS,
    discrete_shift,
    flux_shift_mu,
    time_shift,
)


def sample_sigmas(
    mode: str,
    batch_size: int,
    latent_height: int,
    latent_width: int,
    *,
    sigmoid_scale: float = 1.0,
    discrete_flow_shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Noise levels [B] as sd-scripts' get_noisy_model_input_and_timesteps draws them (weighting_scheme none).

    - uniform:    sigma ~ U(0, 1)
    - sigmoid:    sigma = sigmoid(sigmoid_scale * n), n ~ N(0, 1)
    - shift:      sigma = discrete_shift(sigmoid(sigmoid_scale * n), discrete_flow_shift)
    - flux_shift: sigma = time_shift(mu, sigmoid(sigmoid_scale * n)), mu = flux_shift_mu((h/2) * (w/2))
                  with h, w the latent size (so (h/2)*(w/2) is the packed token count)
    - sigma:      i ~ U{0..999}; sigma = discrete_shift((1000 - i) / 1000, discrete_flow_shift), the
                  training sigmas of FlowMatchEulerDiscreteScheduler(shift=discrete_flow_shift)
    """

    def randn() -> Tensor:
        return torch.randn(batch_size, generator=generator, device=device)

    if mode == "uniform":
        return torch.rand(batch_size, generator=generator, device=device)
    if mode == "sigmoid":
        return torch.sigmoid(sigmoid_scale * randn())
    if mode == "shift":
        return discrete_shift(torch.sigmoid(sigmoid_scale * randn()), discrete_flow_shift)
    if mode == "flux_shift":
        mu = flux_shift_mu((latent_height // 2) * (latent_width // 2))
        return time_shift(mu, torch.sigmoid(sigmoid_scale * randn()))
    if mode == "sigma":
        u = torch.rand(batch_size, generator=generator, device=device)
        index = (u * NUM_TRAIN_TIMESTEPS).long()
        unshifted = (NUM_TRAIN_TIMESTEPS - index).float() / NUM_TRAIN_TIMESTEPS
        return discrete_shift(unshifted, discrete_flow_shift)
    raise ValueError(f"unknown timestep_sampling {mode!r}")


def offset_noise(noise: Tensor, strength: float, generator: torch.Generator | None = None) -> Tensor:
    """eps + strength * delta, delta ~ N(0, 1) per sample and channel (see the module docstring)."""
    if not strength:
        return noise
    delta = torch.randn(
        noise.shape[0], noise.shape[1], 1, 1, generator=generator, device=noise.device, dtype=noise.dtype
    )
    return noise + strength * delta


def noisy_latents(x0: Tensor, noise: Tensor, sigmas: Tensor) -> Tensor:
    s = sigmas.view(-1, 1, 1, 1).to(x0.dtype)
    return (1.0 - s) * x0 + s * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    return noise - x0


def apply_prediction_type(kind: str, prediction: Tensor, noisy: Tensor, sigmas: Tensor) -> Tensor:
    """sd-scripts' model_prediction_type: raw (as is), additive (+ noisy input), sigma_scaled (-sigma * pred + noisy).

    sigma_scaled turns the prediction into an estimate of x0 and then compares it with the velocity target:
    wrong for FLUX, so the launcher refuses it (rules.py); it stays here to mirror sd-scripts.
    """
    if kind == "raw":
        return prediction
    if kind == "additive":
        return prediction + noisy
    if kind == "sigma_scaled":
        return prediction * (-sigmas.view(-1, 1, 1, 1)) + noisy
    raise ValueError(f"unknown model_prediction_type {kind!r}")


def min_snr_weight(sigmas: Tensor, gamma: float, variant: str = "flow_min_snr") -> Tensor:
    """Min-SNR-gamma for a velocity target (module docstring): flow_min_snr min((1-sigma)^2, gamma*sigma^2),
    clamp min(1, gamma*sigma^2)."""
    if variant == "flow_min_snr":
        return torch.minimum((1.0 - sigmas) ** 2, gamma * sigmas**2)
    if variant == "clamp":
        return torch.clamp(gamma * sigmas**2, max=1.0)
    raise ValueError(f"unknown min_snr_variant {variant!r}")


def huber_c_for(sigmas: Tensor, schedule: str, huber_c: float) -> Tensor:
    """sd-scripts' Huber threshold; its 'snr' schedule (which crashes for FLUX there) uses the flow path's
    noise-to-signal ratio sigma / (1 - sigma) in place of the DDPM one: (1 - c) / (1 + nsr)^2 + c."""
    if schedule == "constant":
        return torch.full_like(sigmas, huber_c)
    if schedule == "exponential":
        alpha = -math.log(huber_c) / NUM_TRAIN_TIMESTEPS
        return torch.exp(-alpha * sigmas * NUM_TRAIN_TIMESTEPS)
    if schedule == "snr":
        nsr = sigmas / (1.0 - sigmas).clamp_min(1e-6)
        return (1.0 - huber_c) / (1.0 + nsr) ** 2 + huber_c
    raise ValueError(f"unknown huber_schedule {schedule!r}")


def per_sample_loss(
    prediction: Tensor,
    target: Tensor,
    sigmas: Tensor,
    *,
    loss_type: str = "l2",
    huber_schedule: str = "snr",
    huber_c: float = 0.1,
    min_snr_gamma: float | None = None,
    min_snr_variant: str = "flow_min_snr",
) -> Tensor:
    """Loss per sample [B]: element loss (sd-scripts' conditional_loss), mean over C,H,W, times min-SNR weight."""
    prediction, target = prediction.float(), target.float()
    if loss_type == "l2":
        element = (prediction - target) ** 2
    elif loss_type == "l1":
        element = (prediction - target).abs()
    elif loss_type in ("huber", "smooth_l1"):
        c = huber_c_for(sigmas.float(), huber_schedule, huber_c).view(-1, 1, 1, 1)
        root = torch.sqrt((prediction - target) ** 2 + c**2) - c
        element = 2 * c * root if loss_type == "huber" else 2 * root
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    loss = element.mean(dim=(1, 2, 3))
    if min_snr_gamma:
        loss = loss * min_snr_weight(sigmas.float(), min_snr_gamma, min_snr_variant)
    return loss


def pack_latents(latents: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, (H/2)*(W/2), C*4]: FLUX's 2x2 patches as tokens."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of pack_latents for latents of size height x width."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(
    height: int, width: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Tensor:
    """Position ids [(H/2)*(W/2), 3] of the packed latent tokens: (0, row, column)."""
    ids = torch.zeros(height // 2, width // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(height // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(width // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


def text_ids(length: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """Position ids [L, 3] of the T5 tokens: all zero, as in FLUX."""
    return torch.zeros(length, 3, device=device, dtype=dtype)


def euler_sigmas(num_steps: int, image_seq_len: int) -> list[float]:
    """Sampling schedule 1 -> 0 with FLUX's resolution shift (num_steps + 1 values, last 0)."""
    mu = flux_shift_mu(image_seq_len)
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1)
    shifted = torch.cat([time_shift(mu, sigmas[:-1]), sigmas[-1:]])
    return shifted.tolist()
