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


@pytest.mark.parametrize("sweep_seeds", [(42,), (42, 1, 2)])
def test_the_ablation_cells_fall_into_four_packs(tmp_path: Path, sweep_seeds: tuple[int, ...]) -> None:
    """conf/ablation composed as a sweep composes it: baseline, a1 alpha, a2 noise offset, a4 adafactor, a6 min-SNR
    and a7 dropout share a base; a3 (accumulation 4), a5 (fp8 base) and a8 (both) each train alone. Seeds are per run,
    so three seeds of every cell still make four packs (no training here)."""
    from flux_lora.compose import load_run
    from flux_lora.engines.native.config import pack_key
    from flux_lora.engines.native.engine import native_config_from_run
    from tests.conftest import ABLATIONS, compose_config

    packs: dict[str | None, list[str]] = {}
    for ablation in ABLATIONS:
        for seed in sweep_seeds:
            run = load_run(compose_config([f"ablation={ablation}", f"profile.seed={seed}"]))
            config = native_config_from_run(run, tmp_path / f"{ablation}-{seed}")
            packs.setdefault(pack_key(config), []).append(ablation)
    groups = sorted(sorted(set(cells)) for cells in packs.values())
    assert groups == sorted(
        [
            ["a1_alpha", "a2_noise_offset", "a4_adafactor", "a6_min_snr", "a7_dropout", "baseline"],
            ["a3_grad_accum"],
            ["a5_fp8_base"],
            ["a8_all"],
        ]
    ), groups
    assert sum(len(cells) for cells in packs.values()) == len(ABLATIONS) * len(sweep_seeds)


def test_every_per_run_field_is_a_field_and_fp16_never_packs(tmp_path: Path) -> None:
    from dataclasses import fields, replace

    from flux_lora.engines.native.config import PER_RUN_FIELDS, NativeTrainConfig, pack_key

    assert PER_RUN_FIELDS <= {f.name for f in fields(NativeTrainConfig)}
    config = tiny_config(tmp_path, tmp_path)
    assert pack_key(config) is not None and pack_key(replace(config, mixed_precision="fp16")) is None
    assert pack_key(replace(config, seed=1, learning_rate=5.0)) == pack_key(config)  # per run
    assert pack_key(replace(config, resolution=128)) != pack_key(config)  # shared: another pack


def test_a_run_taken_over_in_a_packed_job_stops_writing_and_the_others_go_on(
    trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each run of a packed job names its lease (FLUX_LORA_LEASES). Another launch takes one run's lease after its
    step-2 state: that run writes nothing more (no later state, no LoRA, no summary); the other trains on, equal to
    its separate run."""
    from flux_lora.lifecycle.lease import LEASES_ENV

    root, dataset, separate, _ = trained
    cells = {"baseline": CELLS["baseline"], "taken": {"seed": 3}}
    configs_ = configs(root, dataset, "lease", cells)
    leases = {}
    for config in configs_:
        path = tmp_path / f"{Path(config.run_dir).name}.lease"
        path.write_text(json.dumps({"token": f"token-{path.stem}"}))
        leases[str(Path(config.run_dir).absolute())] = [str(path), f"token-{path.stem}"]
    monkeypatch.setenv(LEASES_ENV, json.dumps(leases))
    taken_dir = Path(configs_[1].output_dir)

    from flux_lora.engines.native import train

    lease_file = Path(leases[str(Path(configs_[1].run_dir).absolute())][0])
    save = train.Checkpointer.save

    def save_then_taken_over(self, step: int, final: bool):
        saved = save(self, step, final)
        if self.output_dir == taken_dir and step == 4:  # another launch takes the run right after this state
            lease_file.write_text(json.dumps({"token": "another launch"}))
        return saved

    monkeypatch.setattr(train.Checkpointer, "save", save_then_taken_over)
    good, taken = run_packed(configs_)
    assert taken is None  # nothing to report: it is not ours any more
    assert not (taken_dir / "flux-lora.safetensors").exists() and not (taken_dir / "train_summary.json").exists()
    assert not (taken_dir / "flux-lora-step00000008-state").exists()
    assert good is not None and good.stop_reason is None and good.losses == separate[0].losses
    assert_same_tensors(Path(separate[0].lora_path), Path(good.lora_path))
