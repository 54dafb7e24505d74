"""How a native run stops: stop requests (signals), the stop every process agrees on, the finite-weights check,
the run's ownership (its lease), write failures and the pruning of old states."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from flux_lora.checkpoint_files import (
    WriteFailed,
)
from flux_lora.lifecycle.job_guard import LEASE_LOST_EXIT_CODE
from flux_lora.lifecycle.lease import LEASE_FILE_ENV, LEASE_TOKEN_ENV, LEASES_ENV, still_holds

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)


# SLURM signals every process of a job at once and the launcher forwards the same stop: copies that arrive
# within this window are one stop. A second stop after it (a second Ctrl-C) ends the process at once.
SAME_STOP_S = 5.0


EXIT_NONFINITE = 3


EXIT_WRITE_FAILED = 4  # a file of the run could not be written (full disk, quota): the states saved before it stay


class StopRequest:
    """SIGTERM/SIGINT/SIGUSR2 ask the loop to stop after the current optimizer step; a second stop, later than
    SAME_STOP_S, ends the process at once (SIGUSR2, a warning, never does)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.first_at = 0.0
        self.previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only (tests may run the job elsewhere)
        for signum in STOP_SIGNALS:
            self.previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        if self.signum is not None and (signum == signal.SIGUSR2 or time.monotonic() - self.first_at < SAME_STOP_S):
            return  # the same stop, delivered by SLURM and by the launcher
        if self.signum is not None:
            self.restore()
            os.kill(os.getpid(), signum)  # the default action now: whoever sends it twice means it
            return
        self.signum, self.first_at = signum, time.monotonic()  # only this: the handler may run in the middle of a print

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}


class RunTakenOver(Exception):
    """A run of a packed job lost its lease: that run stops writing; the job's other runs go on."""


class RunOwnership:
    """The run's lease as the launcher passed it: this job writes into the run folder only while the lease file
    carries its token (without a lease, as in tests that call the trainer directly, it always does). A job of one run
    names its lease in FLUX_LORA_LEASE_FILE / _TOKEN; a packed job names one per run folder in FLUX_LORA_LEASES."""

    def __init__(self, run_dir: str, alone: bool) -> None:
        packed = json.loads(os.environ.get(LEASES_ENV) or "{}")
        if packed:
            self.path, self.token = packed.get(str(Path(run_dir).absolute()), (None, ""))
        else:
            self.path, self.token = os.environ.get(LEASE_FILE_ENV), os.environ.get(LEASE_TOKEN_ENV, "")
        self.alone = alone

    def lost(self) -> bool:
        return bool(self.path) and not still_holds(Path(self.path), self.token)

    def check(self) -> None:
        """Stop writing at once (no summary, no buffered TensorBoard events) when the run was taken over."""
        if self.lost():
            self.leave()

    def leave(self) -> None:
        """A job of one run exits; a packed job's run raises RunTakenOver and the job goes on with the others."""
        print(
            f"the run's lease ({self.path}) carries another token: the run was taken over; stopped without writing",
            flush=True,
        )
        if self.alone:
            os._exit(LEASE_LOST_EXIT_CODE)
        raise RunTakenOver(self.path)


@contextmanager
def writing(path: Path, cleanup: Path | None = None):
    """A write into the run folder: a failure (a full disk, a quota) becomes WriteFailed naming the path and the room
    left, after removing what this write began (`cleanup`, our own temporary); what was saved before stays."""
    try:
        yield
    except (OSError, RuntimeError) as exc:  # torch.save on a full disk raises RuntimeError ("unexpected pos ...")
        if isinstance(exc, WriteFailed):
            raise
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True) if cleanup.is_dir() else cleanup.unlink(missing_ok=True)
        raise WriteFailed(path, exc) from exc


def agreed_stop(accelerator, signum: int, nonfinite: bool, lost: bool = False) -> tuple[int, bool, bool]:
    """What every process saw (max over processes): saving a state is collective, so all stop at the same step."""
    if accelerator.num_processes == 1:
        return signum, nonfinite, lost
    import torch.distributed as dist

    flags = torch.tensor([signum, int(nonfinite), int(lost)], device=accelerator.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return int(flags[0]), bool(flags[1]), bool(flags[2])


def lora_is_finite(params: list[nn.Parameter]) -> bool:
    # One device sync for all parameters.
    return bool(torch.stack([p.detach().isfinite().all() for p in params]).all())


def prune_step_states(output_dir: Path, output_name: str, newest_step: int, keep: int) -> list[Path]:
    """Delete `{output_name}-stepNNNNNNNN-state` folders beyond the newest `keep` (0 keeps all); returns them.

    Called right after the state of newest_step was written complete, so that good state is always among those kept.
    """
    if keep <= 0:
        return []
    pattern = re.compile(re.escape(output_name) + r"-step(\d{8})-state")
    states = sorted(
        (int(match.group(1)), path)
        for path in output_dir.iterdir()
        if path.is_dir() and (match := pattern.fullmatch(path.name)) and int(match.group(1)) <= newest_step
    )
    removed = [path for _, path in states[:-keep]]
    for path in removed:
        shutil.rmtree(path)
    return removed
