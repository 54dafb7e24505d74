"""Flow-matching math: each timestep_sampling mode as sd-scripts defines it, the noisy input and target,
packing, and the flow versions of noise offset and min-SNR."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from flux_lora.engines.native import flow


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_sigmoid_uniform_and_shift_modes_follow_sd_scripts():
    n = 4096
    uniform = flow.sample_sigmas("uniform", n, 64, 64, generator=gen())
    assert torch.equal(uniform, torch.rand(n, generator=gen()))
    sigmoid = flow.sample_sigmas("sigmoid", n, 64, 64, sigmoid_scale=2.0, generator=gen())
    assert torch.allclose(sigmoid, torch.sigmoid(2.0 * torch.randn(n, generator=gen())))
    shifted = flow.sample_sigmas("shift", n, 64, 64, sigmoid_scale=1.0, discrete_flow_shift=3.0, generator=gen())
    base = torch.sigmoid(torch.randn(n, generator=gen()))
    assert torch.allclose(shifted, 3.0 * base / (1 + 2.0 * base))
    assert shifted.mean() > base.mean()  # shift > 1 moves towards noise


def test_flux_shift_depends_on_resolution():
    # mu is linear in the packed token count: 0.5 at 256 tokens (256 px), 1.15 at 4096 (1024 px).
    assert flow.flux_shift_mu(256) == pytest.approx(0.5)
    assert flow.flux_shift_mu(4096) == pytest.approx(1.15)
    small = flow.sample_sigmas("flux_shift", 2048, 32, 32, generator=gen())  # 256 px
    large = flow.sample_sigmas("flux_shift", 2048, 128, 128, generator=gen())  # 1024 px
    base = torch.sigmoid(torch.randn(2048, generator=gen()))
    expected = math.exp(1.15) / (math.exp(1.15) + (1 / base - 1))
    assert torch.allclose(large, expected)
    assert (large > small).all()


@pytest.mark.parametrize("shift", [1.0, 3.1582])
def test_sigma_mode_draws_the_scheduler_training_sigmas(shift):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    table = scheduler.sigmas  # 1000 training sigmas, 1.0 down to 0.001
    sigmas = flow.sample_sigmas("sigma", 512, 64, 64, discrete_flow_shift=shift, generator=gen())
    index = (torch.rand(512, generator=gen()) * 1000).long()
    assert torch.allclose(sigmas, table[index].float(), atol=1e-6)


def test_noisy_input_target_and_prediction_types():
    x0, noise = torch.randn(2, 16, 4, 4, generator=gen(1)), torch.randn(2, 16, 4, 4, generator=gen(2))
    sigmas = torch.tensor([0.0, 1.0])
    noisy = flow.noisy_latents(x0, noise, sigmas)
    assert torch.equal(noisy[0], x0[0]) and torch.equal(noisy[1], noise[1])
    assert torch.equal(flow.velocity_target(x0, noise), noise - x0)
    pred = torch.randn_like(x0)
    assert torch.equal(flow.apply_prediction_type("raw", pred, noisy, sigmas), pred)
    assert torch.equal(flow.apply_prediction_type("additive", pred, noisy, sigmas), pred + noisy)
    scaled = flow.apply_prediction_type("sigma_scaled", pred, noisy, sigmas)
    assert torch.allclose(scaled, -sigmas.view(-1, 1, 1, 1) * pred + noisy)


def test_noise_offset_shifts_each_channel_by_one_constant():
    noise = torch.randn(2, 16, 8, 8, generator=gen())
    assert flow.offset_noise(noise, 0.0) is noise
    shifted = flow.offset_noise(noise, 0.1, gen(5))
    delta = shifted - noise
    assert torch.allclose(delta, delta[:, :, :1, :1].expand_as(delta), atol=1e-6)
    assert torch.allclose(delta[:, :, 0, 0], 0.1 * torch.randn(2, 16, generator=gen(5)), atol=1e-6)


def test_min_snr_weight_is_sigma_squared_times_clamped_snr():
    sigmas = torch.linspace(0.01, 0.99, 99)
    snr = ((1 - sigmas) / sigmas) ** 2
    expected = sigmas**2 * torch.clamp(snr, max=5.0)
    assert torch.allclose(flow.min_snr_weight(sigmas, 5.0), expected, atol=1e-6)
    pred, target = torch.zeros(99, 1, 2, 2), torch.ones(99, 1, 2, 2)
    weighted = flow.per_sample_loss(pred, target, sigmas, min_snr_gamma=5.0)
    assert torch.allclose(weighted, expected, atol=1e-6)
    assert torch.equal(flow.per_sample_loss(pred, target, sigmas), torch.ones(99))


@pytest.mark.parametrize("loss_type", ["l1", "huber", "smooth_l1"])
def test_other_loss_types(loss_type):
    pred, target = torch.zeros(3, 1, 2, 2), torch.full((3, 1, 2, 2), 0.5)
    loss = flow.per_sample_loss(
        pred, target, torch.tensor([0.2, 0.5, 0.8]), loss_type=loss_type, huber_schedule="constant"
    )
    assert loss.shape == (3,) and (loss > 0).all()


def test_pack_unpack_and_position_ids():
    latents = torch.randn(2, 16, 6, 8)
    tokens = flow.pack_latents(latents)
    assert tokens.shape == (2, 12, 64)
    assert torch.equal(flow.unpack_latents(tokens, 6, 8), latents)
    assert torch.equal(tokens[0, 1], latents[0, :, 0:2, 2:4].reshape(-1))  # token (row 0, col 1): channel-major 2x2
    ids = flow.image_ids(6, 8)
    assert ids.shape == (12, 3) and ids[5].tolist() == [0.0, 1.0, 1.0]
    assert not flow.text_ids(7).any()


def test_euler_schedule_runs_from_one_to_zero():
    sigmas = flow.euler_sigmas(8, 1024)
    assert len(sigmas) == 9 and sigmas[0] == pytest.approx(1.0) and sigmas[-1] == 0.0
    assert all(a > b for a, b in zip(sigmas, sigmas[1:]))


@pytest.mark.parametrize(
    ("mode", "options"),
    [
        ("uniform", {}),
        ("sigmoid", {"sigmoid_scale": 2.0}),
        ("shift", {"discrete_flow_shift": 3.0}),
        ("flux_shift", {}),
        ("sigma", {"discrete_flow_shift": 3.1582}),
    ],
)
def test_the_launchers_numpy_sampler_draws_what_the_job_draws(mode, options):
    import numpy as np

    from flux_lora.noise_levels import sample_sigmas_np

    n = 20_000
    job = flow.sample_sigmas(mode, n, 96, 96, generator=gen(), **options).numpy()  # 768 px latents
    launcher = sample_sigmas_np(mode, n, 96, 96, rng=np.random.default_rng(0), **options)
    quantiles = np.linspace(0.05, 0.95, 19)
    assert np.abs(np.quantile(job, quantiles) - np.quantile(launcher, quantiles)).max() < 0.02


@pytest.mark.parametrize("variant", ["flow_min_snr", "clamp"])
def test_min_snr_variants_and_their_numpy_twin(variant):
    import numpy as np

    from flux_lora.noise_levels import min_snr_weight_np

    sigmas = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    expected = (
        torch.clamp(5.0 * sigmas**2, max=1.0)
        if variant == "clamp"
        else sigmas**2 * torch.clamp(((1 - sigmas) / sigmas) ** 2, max=5.0)
    )
    weights = flow.min_snr_weight(sigmas, 5.0, variant)
    assert torch.allclose(weights, expected)
    assert np.allclose(min_snr_weight_np(sigmas.numpy(), 5.0, variant), weights.numpy())
    pred, target = torch.zeros(99, 1, 2, 2), torch.ones(99, 1, 2, 2)
    loss = flow.per_sample_loss(pred, target, sigmas.float(), min_snr_gamma=5.0, min_snr_variant=variant)
    assert torch.allclose(loss, expected.float(), atol=1e-6)
    if variant == "clamp":  # high-noise samples keep their full weight, unlike flow_min_snr
        assert weights[-1] == 1.0 and flow.min_snr_weight(sigmas, 5.0)[-1] < 1e-3
    with pytest.raises(ValueError):
        flow.min_snr_weight(sigmas, 5.0, "clip")
