"""The one interface between the launcher and a training engine.

Only engines know flag names and file formats. The launcher asks an engine for the options it
would silently ignore, for what is missing before a real launch, and for the frozen inputs of a
run: the script accelerate starts, its arguments and the files the job reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from flux_lora.schema import RunConfig


@dataclass(frozen=True)
class EngineInputs:
    # What follows `accelerate launch <accelerate flags>`: a script path or ["-m", module], then its args.
    script_argv: list[str]
    # Run-directory-relative file name -> text content; written into the run directory before launch.
    files: dict[str, str] = field(default_factory=dict)
    # Environment additions for the job (never secrets: they are recorded in command.json).
    env: dict[str, str] = field(default_factory=dict)
    # Working directory of the job.
    cwd: str = "."


class Engine(Protocol):
    name: str

    def unapplied_options(self, run: RunConfig) -> dict[str, str]:
        """Config keys (dotted, e.g. "profile.noise_offset") set to an active value that this engine
        ignores, each with a one-line reason. Empty when everything set is honoured."""
        ...

    def missing_requirements(self, run: RunConfig) -> list[str]:
        """One line per thing a real launch needs but cannot find (checkout, weight files), naming
        the file and the config key to fix. The launcher refuses a real launch if any; warns in a dry run."""
        ...

    def warnings(self, run: RunConfig) -> list[str]:
        """Anything else worth a warning line before launch (e.g. a checkout off the pinned commit)."""
        ...

    def version_record(self, run: RunConfig) -> dict[str, object]:
        """What identifies the engine's code for the repro record (e.g. the sd-scripts commit)."""
        ...

    def render(self, run: RunConfig, run_dir: Path, unapplied: dict[str, str]) -> EngineInputs:
        """The exact inputs of the job. Options listed in `unapplied` must not be passed on."""
        ...

    def check_inputs(self, run: RunConfig, inputs: EngineInputs) -> list[str]:
        """Problems with rendered inputs (e.g. an argv the pinned parser's table rejects), one line each."""
        ...

    def preflight(self, run: RunConfig, inputs: EngineInputs) -> dict[str, object]:
        """The engine's own checks of the inputs before any weights load: {"state": passed | failed | skipped,
        "problem": one line or None, ...}; recorded in run.json, and a failure refuses the run."""
        ...

    def finish_attempt(self, run: RunConfig, run_dir: Path) -> list[str]:
        """Tidy the job's outputs after it ends, however it ended (e.g. renumber a resumed attempt's files);
        returns what changed. Must be safe to call again."""
        ...

    def pack_key(self, run_dir: Path) -> str | None:
        """launch.pack: runs frozen with the same key can train as one job (one base, an adapter each); None for a
        run that trains alone."""
        ...

    def sweep_pack_key(self, run: RunConfig) -> str | None:
        """pack_key of a composed run before its check and freeze (a SLURM sweep groups its cells into jobs by it on
        the submitting host): equal for runs whose frozen keys may be equal; None for a run that trains alone."""
        ...
