"""A packed job (launch.pack): runs that share a base train as one adapter each on one frozen model, and each equals
its separate run bit for bit on the CPU in fp32 (the same kernels on the same shapes, the same random streams): every
step's loss, every LoRA tensor, every state. Real training steps on the tiny model; nothing is mocked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flux_lora.engines.native.train import run_packed, run_training
from tests.engines.native.native_tiny_run import make_dataset, tiny_config

pytestmark = pytest.mark.slow

# Three cells of one pack key: they differ in what packing keeps per run (alpha, dropout, noise offset, loss
# weighting, optimizer, seed, length) and share the base, the data and the batch structure.
CELLS = {
    "baseline": {},
    "offset_dropout": {"noise_offset": 0.05, "network_dropout": 0.1, "network_alpha": 1.0},
    "adafactor_snr": {
        "optimizer": "adafactor",
        "optimizer_args": {"relative_step": False, "scale_parameter": False, "warmup_init": False},
        "min_snr_gamma": 5.0,
        "seed": 7,
        "max_train_steps": 6,
        "save_every_n_steps": 2,
    },
}
FP32 = {"mixed_precision": "no", "optimizer": "adamw", "sample_prompts": [{"text": "TOK woman, portrait", "seed": 5}]}


def configs(root: Path, dataset: Path, prefix: str, cells: dict[str, dict] = CELLS, **extra):
    return [
        tiny_config(root, dataset, f"{prefix}-{name}", **{**FP32, **values, **extra}) for name, values in cells.items()
    ]


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_tensors(a: Path, b: Path) -> None:
    left, right = tensors(a), tensors(b)
    assert left.keys() == right.keys()
    different = [key for key in left if not torch.equal(left[key], right[key])]
    assert not different, (a, b, different[:3])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    dataset = make_dataset(root / "ds", count=3)
    separate = [run_training(config) for config in configs(root, dataset, "separate")]
    packed = run_packed(configs(root, dataset, "packed"))
    return root, dataset, separate, packed


def test_each_packed_run_equals_its_separate_run_bit_for_bit(trained) -> None:
    root, _, separate, packed = trained
    for name, alone, together in zip(CELLS, separate, packed):
        assert together is not None and together.stop_reason is None
        assert together.losses == alone.losses, name  # every step's loss, exactly
        assert together.steps == alone.steps == CELLS[name].get("max_train_steps", 8)
        assert_same_tensors(Path(alone.lora_path), Path(together.lora_path))
        for state in sorted(Path(alone.output_dir).glob("*-state")):  # the states too: LoRA, optimizer, streams
            twin = Path(together.output_dir) / state.name
            assert_same_tensors(state / "lora_weights.safetensors", twin / "lora_weights.safetensors")
            for name_ in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
                a = torch.load(state / name_, weights_only=False)
                b = torch.load(twin / name_, weights_only=False)
                assert repr(a) == repr(b), (state, name_)
        summaries = [json.loads((Path(r.output_dir) / "train_summary.json").read_text()) for r in (alone, together)]
        for summary in summaries:
            for key in (
                "seconds",
                "step_seconds",
                "save_seconds",
                "sample_image_seconds",
                "peak_memory_gb",
                "stop_lead_s",
            ):
                summary.pop(key, None)
            summary.pop("lora_path", None), summary.pop("output_dir", None), summary.pop("sample_paths", None)
            summary.pop("last_state", None)
        assert summaries[0] == summaries[1], name
        # Its own samples, in its own folder, of its own LoRA.
        assert [Path(p).parent for p in together.sample_paths] == [Path(together.output_dir) / "sample"] * len(
            together.sample_paths
        )
        assert together.sample_paths and len(together.sample_paths) == len(alone.sample_paths)


def test_a_packed_job_resumed_from_its_states_equals_the_uninterrupted_one(trained) -> None:
    """Every run of the pack resumed from its step-4 state (step 4 for the 6-step cell, saved every 2), as after a
    stop; and a packed run's state resumed by a separate run: the same final LoRAs."""
    root, dataset, _, packed = trained
    resumed = run_packed(
        [
            tiny_config(root, dataset, f"resumed-{name}", **{**FP32, **values}, resume_from=str(state))
            for (name, values), result in zip(CELLS.items(), packed)
            for state in [Path(result.output_dir) / "flux-lora-step00000004-state"]
        ]
    )
    for name, uninterrupted, again in zip(CELLS, packed, resumed):
        assert again is not None and again.first_step == 5 and again.steps == uninterrupted.steps, name
        assert again.losses == uninterrupted.losses[4:], name
        assert_same_tensors(Path(uninterrupted.lora_path), Path(again.lora_path))
    name, values = "offset_dropout", CELLS["offset_dropout"]
    state = Path(packed[1].output_dir) / "flux-lora-step00000004-state"
    alone = run_training(tiny_config(root, dataset, "alone-from-packed", **{**FP32, **values}, resume_from=str(state)))
    assert_same_tensors(Path(packed[1].lora_path), Path(alone.lora_path))


def test_a_nan_in_one_adapter_fails_that_run_only(trained) -> None:
    root, dataset, separate, _ = trained
    cells = {"baseline": CELLS["baseline"], "blows_up": {"learning_rate": 1e12}}
    good, bad = run_packed(configs(root, dataset, "nan", cells))
    assert good is not None and bad is not None
    assert good.stop_reason is None and good.losses == separate[0].losses
    assert_same_tensors(Path(separate[0].lora_path), Path(good.lora_path))
    assert bad.stop_reason == "nonfinite_loss" and bad.lora_path is None and bad.exit_code == 3
    summary = json.loads((Path(bad.output_dir) / "train_summary.json").read_text())
    assert summary["stop_reason"] == "nonfinite_loss"
    assert not list(Path(bad.output_dir).glob("flux-lora.safetensors"))  # nothing saved from the broken weights
