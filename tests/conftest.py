"""Shared fixtures: real Hydra composition of conf/ through the Compose API."""

from __future__ import annotations

import os
from collections.abc import Callable

# One OpenMP thread for torch in the test processes and every process they start (the CLI, accelerate, the job, a
# SLURM job): the tiny model's ops take microseconds, and beside the other xdist worker a second thread spins in
# OpenMP's barriers for a descheduled partner (the ablation-curve fixture: 142 s with two threads, under 40 s with one).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from flux_lora.compose import CONF_DIR, load_run, register
from flux_lora.schema import RunConfig
from tests.seed_sweep import Sweep, make_seed_sweep

# Cluster fixtures registered once here: imported into each test module, a session fixture would be set up
# (and torn down) per module, and ruff would read each use as a redefinition.
from tests.slurm_cluster import slurm  # noqa: F401
from tests.slurm_two_node import two_node_slurm  # noqa: F401

register()

# The ablation cells, baseline first: read from conf/ablation, so a new cell is tested where the cells are.
ABLATIONS = ("baseline", *sorted(p.stem for p in (CONF_DIR / "ablation").glob("*.yaml") if p.stem != "baseline"))


def compose_config(overrides: list[str] | None = None, *, with_hydra: bool = False) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides or [], return_hydra_config=with_hydra)


@pytest.fixture
def compose_run() -> Callable[..., RunConfig]:
    def _compose(*overrides: str) -> RunConfig:
        return load_run(compose_config(list(overrides)))

    return _compose


@pytest.fixture(scope="session")
def seed_sweep(tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    """A real 3-seed, 2-cell sweep on the tiny model, trained once per test session (tests/seed_sweep.py)."""
    return make_seed_sweep(tmp_path_factory)


@pytest.fixture(scope="session")
def judged_diffusers_lora(tmp_path_factory: pytest.TempPathFactory):
    """A LoRA in diffusers/peft keys built from the tiny model, judged once by `python -m flux_lora.eval --lora FILE
    --dataset data/sample` (tests/eval/test_external.py): (file, its bytes before, the finished process, the folder)."""
    from tests.eval.test_external import diffusers_format_lora, judge

    root = tmp_path_factory.mktemp("external")
    source = diffusers_format_lora(root)
    before = source.read_bytes()
    return source, before, judge(source, root / "judged"), root / "judged"


# Fixtures that train, evaluate or start a cluster: a test that takes one is in the full suite only (it is marked
# `slow`), so `python -m pytest -m "not slow"` is the fast tier. Each is shared by the tests that take it.
TRAINED_OR_CLUSTER_FIXTURES = frozenset(
    {
        "seed_sweep",
        "judged_diffusers_lora",
        "evaluated_sweep",
        "rate_server",
        "tiny_run",
        "evaluated_run",
        "runs",
        "curves",
        "matrix",
        "shared_run",
        "slurm",
        "two_node_slurm",
    }
)


# pytest-xdist (`-n 2 --dist loadgroup`, pyproject.toml): the tests that share a trained fixture or a cluster run on
# one worker, so nothing is trained twice and no two tests drive the one SLURM at once. Session fixtures that build on
# each other share a group; a test taking a module-scoped fixture stays with its module.
SHARED_FIXTURE_GROUPS = {
    "slurm": "slurm",
    "two_node_slurm": "slurm",
    "seed_sweep": "seed_sweep",
    "evaluated_sweep": "seed_sweep",
    "tiny_run": "tiny_run",
    "evaluated_run": "tiny_run",
    "judged_diffusers_lora": "judged_diffusers_lora",
}


def shared_fixture_group(item: pytest.Item) -> str | None:
    names = list(getattr(item, "fixturenames", ()))
    for name in names:
        if name in SHARED_FIXTURE_GROUPS:
            return SHARED_FIXTURE_GROUPS[name]
    definitions = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    if any(defs and defs[-1].scope == "module" for name in names for defs in [definitions.get(name)]):
        return item.nodeid.split("::")[0]
    return None


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if TRAINED_OR_CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        group = shared_fixture_group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config) -> None:
    """Say how many results are the sd-scripts stand-in's (marker `standin`), so that none reads as sd-scripts' own."""
    ran = [
        report
        for outcome in ("passed", "failed")
        for report in terminalreporter.stats.get(outcome, [])
        if report.when == "call" and "standin" in report.keywords
    ]
    if ran:
        failed = sum(report.failed for report in ran)
        tests = "1 test" if len(ran) == 1 else f"{len(ran)} tests"
        terminalreporter.write_line(
            f"{tests} ran against the sd-scripts stand-in (tests/engines/sd_scripts_standin.py), not sd-scripts"
            f"{f' ({failed} of them failed)' if failed else ''}; -m standin selects them"
        )
