"""The native training loop on CPU: it learns, it is deterministic, it resumes exactly, and it writes
sd-scripts-named outputs whose metadata says what was applied."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from flux_lora.checkpoint_files import state_problem
from flux_lora.engines.native.lora import add_flux_lora
from flux_lora.engines.native.models import build_tiny_flux, encode_prompts
from flux_lora.engines.native.train import flow_matching_loss, run_training
from tests.engines.native.native_tiny_run import make_dataset, tiny_config

PROMPTS = [{"text": "TOK woman, portrait", "seed": 1001}]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An 8-step run (dropout on, so the RNG path is covered), its twin, and a resume from its step-4 state."""
    root = tmp_path_factory.mktemp("native")
    dataset = make_dataset(root / "ds", count=3)
    common = dict(network_dropout=0.1, sample_prompts=PROMPTS, sample_every_n_steps=4)
    first = run_training(tiny_config(root, dataset, "first", **common))
    twin = run_training(tiny_config(root, dataset, "twin", **common))
    state = root / "first" / "output" / "flux-lora-step00000004-state"
    resumed = run_training(tiny_config(root, dataset, "resumed", resume_from=str(state), **common))
    return root, first, twin, resumed


def test_loss_falls_on_a_fixed_batch(tmp_path):
    torch.manual_seed(0)
    parts = build_tiny_flux()
    pooled, t5 = encode_prompts(parts, ["TOK woman"])
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(1, 16, 8, 8, generator=generator), torch.randn(1, 16, 8, 8, generator=generator)
    sigmas = torch.tensor([0.6])
    transformer = parts.transformer.requires_grad_(False)
    params = add_flux_lora(transformer, rank=8, alpha=8, dropout=None)
    transformer.train()
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    config = tiny_config(tmp_path, tmp_path)
    assert (config.loss_type, config.model_prediction_type, config.guidance_scale) == ("l2", "raw", 1.0)
    losses = []
    for _ in range(20):
        loss = flow_matching_loss(transformer, config, latents, noise, sigmas, pooled, t5, torch.float32)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_same_seed_gives_the_same_loss_curve_bit_for_bit(runs):
    _, first, twin, _ = runs
    assert first.losses == twin.losses
    a, b = load_file(first.lora_path), load_file(twin.lora_path)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_continues_at_the_saved_step_and_ends_where_the_uninterrupted_run_ends(runs):
    _, first, _, resumed = runs
    assert resumed.first_step == 5 and resumed.steps == 8
    assert resumed.losses == first.losses[4:]
    a, b = load_file(first.lora_path), load_file(resumed.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_outputs_have_sd_scripts_names(runs):
    root, first, _, _ = runs
    output = root / "first" / "output"
    assert sorted(p.name for p in output.glob("*.safetensors")) == [
        "flux-lora-step00000004.safetensors",
        "flux-lora.safetensors",
    ]
    for state, step in (("flux-lora-step00000004-state", 4), ("flux-lora-state", 8)):
        record = json.loads((output / state / "train_state.json").read_text())
        assert record["current_step"] == step and "current_epoch" in record
        assert (output / state / "optimizer.bin").is_file()
    samples = sorted(p.name for p in (output / "sample").iterdir())
    assert len(samples) == 2
    assert all(re.fullmatch(r"flux-lora_0000(04|08)_00_\d{14}_1001\.png", name) for name in samples)
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["steps"] == 8 and summary["final_loss"] == first.losses[-1]
    assert set(summary) == {
        "final_loss",
        "average_loss",
        "steps",
        "seconds",
        "peak_memory_gb",
        "max_train_steps",
        "first_step",
        "stop_reason",
        "stop_lead_s",
    }
    assert (summary["max_train_steps"], summary["first_step"], summary["stop_reason"]) == (8, 1, None)
    for state in ("flux-lora-step00000004-state", "flux-lora-state"):
        assert state_problem(output / state) is None  # complete, with a manifest
    assert not [p.name for p in output.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_tensorboard_scalars(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, first, _, _ = runs
    events = EventAccumulator(str(root / "first" / "logs"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/current", "loss/average", "lr/unet", "perf/peak_memory_gb", "perf/seconds_per_step"} <= tags
    current = [e.value for e in events.Scalars("loss/current")]
    assert [e.step for e in events.Scalars("loss/current")] == list(range(1, 9))
    assert current == pytest.approx(first.losses)


def _metadata(path) -> dict[str, str]:
    with safe_open(path, framework="pt") as handle:
        return handle.metadata()


def test_metadata_states_what_was_applied(runs, tmp_path):
    _, first, _, _ = runs
    meta = _metadata(first.lora_path)
    assert meta["modelspec.architecture"] == "flux-1/lora"
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "8.0"
    assert meta["ss_network_dropout"] == "0.1" and meta["ss_steps"] == "8"
    assert meta["ss_fp8_base"] == "False"
    assert "ss_noise_offset" not in meta and "ss_min_snr_gamma" not in meta
    assert json.loads(meta["ss_bucket_info"]) == {"buckets": ["64x64"]}

    dataset = make_dataset(tmp_path / "ds", count=1)
    applied = run_training(
        tiny_config(
            tmp_path,
            dataset,
            max_train_steps=2,
            save_every_n_steps=0,
            noise_offset=0.05,
            min_snr_gamma=5.0,
            min_snr_variant="clamp",
            fp8_base=True,
        )
    )
    meta = _metadata(applied.lora_path)
    assert meta["ss_noise_offset"] == "0.05" and meta["ss_min_snr_gamma"] == "5.0"
    assert meta["ss_min_snr_variant"] == "clamp" and meta["ss_min_snr_kind"] == "flow: loss * min(1, gamma*sigma^2)"
    assert meta["ss_fp8_base"] == "True" and "ss_network_dropout" not in meta
