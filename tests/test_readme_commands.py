"""Every `python launch.py` command in the README, as written: each run (each cell of a sweep) composes and passes
the checks of a dry run, in this process (real Hydra composition, rules, the dataset check on the sample photos).

What a reader must supply is said in the command itself (a `<dir>` or `...` placeholder: skipped here) or is what
a dry run reports and a real launch refuses: FLUX.1-dev weight files and a GPU (`model=flux_dev`, `gpu=h100`), a
cluster (`hydra/launcher=slurm`), conf/local/default.yaml. The two sd-scripts cells the README says are refused
(a2 noise offset, a6 min-SNR: sd-scripts ignores both for FLUX) are the only refusals allowed.
"""

from __future__ import annotations

import re
import shlex

import pytest

from flux_lora.check import check_run
from flux_lora.compose import PROJECT_ROOT, load_run
from flux_lora.engines import get_engine
from tests.conftest import compose_config

# Refused on purpose, and said so in the README: sd-scripts ignores these two ablations' keys for FLUX.
REFUSED_AS_DOCUMENTED = {("sd_scripts", "a2_noise_offset"), ("sd_scripts", "a6_min_snr")}


def readme_launch_commands() -> list[str]:
    """`python launch.py ...` lines of the README's bash blocks, comments and line continuations removed."""
    blocks = re.findall(r"```bash\n(.*?)```", (PROJECT_ROOT / "README.md").read_text(encoding="utf-8"), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("python launch.py"):
                    commands.append(part)
    return list(dict.fromkeys(commands))


def needs_the_reader(command: str) -> bool:
    return "<" in command or "..." in command


def expand_multirun(overrides: list[str]) -> list[list[str]]:
    """The cells Hydra's basic sweeper would run: a sweep config's params and any `key=a,b` on the command line.
    Cells that differ only in profile.seed are checked once (the seed changes nothing a check looks at)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    swept = [o for o in overrides if "," in o.split("=", 1)[1] and not o.split("=", 1)[1].startswith("[")]
    config = compose_config([o for o in overrides if o not in swept], with_hydra=True)
    params = config.hydra.sweeper.get("params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()] + [o for o in overrides if o not in swept] + swept
    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(arguments), None)
    cells = {tuple(o for o in cell if not o.startswith("profile.seed=")) for batch in batches for cell in batch}
    return [list(cell) for cell in sorted(cells)]


COMMANDS = readme_launch_commands()


def test_the_readme_shows_launch_commands() -> None:
    assert "python launch.py sweep=ablation profile=fast gpu=h100 engine=sd_scripts model=flux_dev" in COMMANDS
    assert len([c for c in COMMANDS if not needs_the_reader(c)]) >= 12


@pytest.mark.parametrize("command", [c for c in COMMANDS if not needs_the_reader(c)])
def test_each_readme_launch_command_composes_and_passes_a_dry_runs_checks(
    command: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    work = tmp_path_factory.getbasetemp() / "readme-commands"  # one dataset-analysis cache for every command
    arguments = shlex.split(command)[2:]
    multirun = "-m" in arguments or any(a.startswith("sweep=") for a in arguments)
    overrides = [a for a in arguments if a != "-m"] + [
        f"paths.outputs={work / 'outputs'}",
        f"paths.cache={work / 'cache'}",
    ]
    cells = expand_multirun(overrides) if multirun else [overrides]
    assert cells, command
    for cell in cells:
        run = load_run(compose_config(cell))
        report = check_run(run, get_engine(run.engine.name.value), dry_run=True)
        if (run.engine.name.value, run.ablation.name) in REFUSED_AS_DOCUMENTED:
            assert report.refusal and "launch.allow_noop_ablation=true" in report.refusal, (
                command,
                cell,
                report.refusal,
            )
            continue
        assert report.errors == [] and not report.refusal, (command, cell, report.errors, report.refusal)
