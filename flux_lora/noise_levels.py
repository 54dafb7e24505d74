"""Noise levels (sigma) of FLUX flow-matching training, without torch: the shift formulas, sd-scripts'
timestep_sampling modes drawn with numpy, and the min-SNR weights.

The shift formulas are plain arithmetic, so the training job's flow.py uses these very functions on
tensors; the launcher uses the numpy sampler to say at check time what a recipe does to the loss.
"""

from __future__ import annotations

import math

import numpy as np

NUM_TRAIN_TIMESTEPS = 1000  # sd-scripts' FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)


def flux_shift_mu(image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift: linear in the packed sequence length, 0.5 at 256 and 1.15 at 4096 tokens."""
    slope = (max_shift - base_shift) / (4096 - 256)
    return base_shift + slope * (image_seq_len - 256)


def time_shift(mu: float, sigma):
    """exp(mu) / (exp(mu) + (1/sigma - 1)): moves sigma towards 1 (more noise) for larger images."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / sigma - 1.0))


def discrete_shift(sigma, shift: float):
    """SD3-style shift: shift * sigma / (1 + (shift - 1) * sigma)."""
    return sigma * shift / (1.0 + (shift - 1.0) * sigma)


def sample_sigmas_np(
    mode: str,
    count: int,
    latent_height: int,
    latent_width: int,
    *,
    sigmoid_scale: float = 1.0,
    discrete_flow_shift: float = 1.0,
    rng: np.random.Generator,
) -> np.ndarray:
    """The distribution flow.sample_sigmas draws (same modes and formulas), from a numpy generator."""

    def sigmoid_normal() -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-sigmoid_scale * rng.standard_normal(count)))

    if mode == "uniform":
        return rng.random(count)
    if mode == "sigmoid":
        return sigmoid_normal()
    if mode == "shift":
        return discrete_shift(sigmoid_normal(), discrete_flow_shift)
    if mode == "flux_shift":
        return time_shift(flux_shift_mu((latent_height // 2) * (latent_width // 2)), sigmoid_normal())
    if mode == "sigma":
        index = np.floor(rng.random(count) * NUM_TRAIN_TIMESTEPS)
        return discrete_shift((NUM_TRAIN_TIMESTEPS - index) / NUM_TRAIN_TIMESTEPS, discrete_flow_shift)
    raise ValueError(f"unknown timestep_sampling {mode!r}")


def min_snr_weight_np(sigmas: np.ndarray, gamma: float, variant: str = "flow_min_snr") -> np.ndarray:
    """flow.min_snr_weight in numpy: flow_min_snr min((1-sigma)^2, gamma*sigma^2); clamp min(1, gamma*sigma^2)."""
    if variant == "flow_min_snr":
        return np.minimum((1.0 - sigmas) ** 2, gamma * sigmas**2)
    if variant == "clamp":
        return np.minimum(1.0, gamma * sigmas**2)
    raise ValueError(f"unknown min_snr_variant {variant!r}")


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The value below which half of the total weight lies."""
    order = np.argsort(values)
    cumulative = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cumulative, cumulative[-1] / 2)])
