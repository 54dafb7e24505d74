"""The one way tests start the project's CLIs as real subprocesses: `python launch.py ...` (the launcher) or
`python -m flux_lora.<tool> ...` (report, eval, replay, diff, share, watch, models, dataset).

- run_cli(...) waits for it and returns the finished process (stdout and stderr captured, text);
- start_cli(...) returns the running process, for tests that signal it, watch it or wait on a cluster;
- child_env(...) is the environment both give the child; command(...) and in_folder(...) are the argv parts, for the
  few tests that start the CLI their own way (on a pseudo-terminal).

Argument lists only, never a shell string. Timeouts are generous on purpose: a slow shared machine must never fail a test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from flux_lora.compose import PROJECT_ROOT

LAUNCH_PY = PROJECT_ROOT / "launch.py"
# The tiny model's ops take microseconds: a second OpenMP thread only adds barrier waits, which on a shared 2-core
# machine cost milliseconds per op (measured 3.2 ms vs 24 us for one 80x32 linear). Pass as env=ONE_THREAD.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
# Settings of the developer's shell that would change what a test sees: an sd-scripts checkout the test did not choose,
# tracebacks in place of the one-line errors tests read. A test that wants one passes it in `env`.
SHELL_ONLY = ("SD_SCRIPTS_DIR", "FLUX_LORA_TRACEBACK")
MULTIRUN_FLAGS = ("-m", "--multirun")
TIMEOUT_S = 600


def child_env(env: Mapping[str, str] | None = None, drop: Iterable[str] = ()) -> dict[str, str]:
    """This process's environment less SHELL_ONLY and `drop`, with `env` on top."""
    left_out = {*SHELL_ONLY, *drop}
    return {**{k: v for k, v in os.environ.items() if k not in left_out}, **(env or {})}


def command(args: Sequence[str], module: str | None = None) -> list[str]:
    """[python, launch.py, *args], or [python, -m, module, *args] for another tool (module="flux_lora.report")."""
    start = ["-m", module] if module else [str(LAUNCH_PY)]
    return [sys.executable, *start, *args]


def in_folder(args: Sequence[str], folder: Path) -> list[str]:
    """The launcher's args with paths.outputs and paths.cache under folder, so a run writes nowhere else. They go before
    the test's own overrides (a later override wins, so a test can still set either) and after Hydra's -m, which
    argparse wants ahead of the overrides."""
    lead = 1 if args and args[0] in MULTIRUN_FLAGS else 0
    return [*args[:lead], f"paths.outputs={folder / 'outputs'}", f"paths.cache={folder / 'cache'}", *args[lead:]]


def _argv_and_cwd(
    args: Sequence[str], module: str | None, folder: Path | None, cwd: Path | None
) -> tuple[list[str], Path]:
    if folder is not None:
        if module:
            raise ValueError("folder= sets the launcher's paths; pass another tool's paths as its own arguments")
        args = in_folder(args, folder)
    return command(args, module), cwd or folder or PROJECT_ROOT


def run_cli(
    *args: str,
    module: str | None = None,
    folder: Path | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    drop: Iterable[str] = (),
    timeout: float = TIMEOUT_S,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run the launcher (or `module`) to the end. folder: the test's tmp folder, which holds paths.outputs and
    paths.cache and is the working directory unless cwd says otherwise (default: the project root)."""
    argv, where = _argv_and_cwd(args, module, folder, cwd)
    return subprocess.run(
        argv, cwd=where, env=child_env(env, drop), capture_output=True, text=True, timeout=timeout, check=check
    )


def start_cli(
    *args: str,
    module: str | None = None,
    folder: Path | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    drop: Iterable[str] = (),
    merge_stderr: bool = True,
    new_session: bool = False,
) -> subprocess.Popen[str]:
    """Start the launcher (or `module`) and return it running, stdout piped (stderr into it, or piped apart with
    merge_stderr=False). new_session: in a session of its own, so a test can kill its whole tree as a crash would."""
    argv, where = _argv_and_cwd(args, module, folder, cwd)
    return subprocess.Popen(
        argv,
        cwd=where,
        env=child_env(env, drop),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
        text=True,
        start_new_session=new_session,
    )
