"""Every ablation cell changes what the native engine trains: with one seed, each cell's loss curve
differs from baseline's. A cell that silently did nothing would give baseline's curve bit for bit."""

from __future__ import annotations

import pytest

from flux_lora.compose import CONF_DIR
from flux_lora.engines.native.engine import native_config_from_run
from flux_lora.engines.native.train import run_training
from tests.conftest import ABLATIONS as ALL_ABLATIONS
from tests.engines.native.native_tiny_run import make_dataset

ABLATIONS = ALL_ABLATIONS[1:]  # each cell against baseline


def test_the_ablation_sweep_runs_every_ablation_file():
    import yaml

    sweep = yaml.safe_load((CONF_DIR / "sweep" / "ablation.yaml").read_text())
    assert sweep["hydra"]["sweeper"]["params"]["ablation"].split(",") == ["baseline", *ABLATIONS]


@pytest.fixture(scope="module")
def curves(tmp_path_factory):
    from flux_lora.compose import load_run
    from tests.conftest import compose_config

    root = tmp_path_factory.mktemp("ablation")
    dataset = make_dataset(root / "ds", count=2)
    small = [
        "profile.max_train_steps=6",
        "profile.resolution=64",
        "profile.save_every_n_steps=0",
        "profile.sample_every_n_steps=0",
        "profile.lr_warmup_steps=0",
        "dataset.min_bucket_reso=64",
        "dataset.max_bucket_reso=128",
        "dataset.bucket_reso_steps=32",
        f"dataset.path={dataset}",
        f"paths.cache={root / 'cache'}",
    ]
    result = {}
    for cell in ["baseline", *ABLATIONS]:
        run = load_run(compose_config([f"ablation={cell}", *small]))
        result[cell] = run_training(native_config_from_run(run, root / cell)).losses
    return result


@pytest.mark.parametrize("cell", ABLATIONS)
def test_each_ablation_changes_the_loss_curve(curves, cell):
    baseline, changed = curves["baseline"], curves[cell]
    assert len(changed) == len(baseline) == 6
    assert max(abs(a - b) for a, b in zip(changed, baseline)) > 1e-6, f"{cell} trained exactly like baseline"
