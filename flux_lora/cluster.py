"""Sweeps on SLURM: hydra-submitit-launcher's launcher, with what a real cluster asks of it.

`hydra/launcher=slurm` selects `SlurmLauncher` below (through hydra_plugins/flux_lora_launcher, since Hydra
loads launchers only from its plugin namespace). Over the plugin's own it:
  - reads job states from `squeue` when the cluster has no accounting daemon (submitit asks `sacct`, warns
    on every poll and never sees a job that died without its result file), saying so in one line;
  - turns a setting sbatch rejects into one line naming the `hydra.launcher.*` key;
  - refuses `nodes > 1` (accelerate's multi-node rendezvous is not set up here);
  - asks for `--requeue`, so a job on a node that fails comes back on another one;
  - saves the rendered sbatch script and the job ids in the sweep folder (`slurm_jobs.json`, `sbatch.sh`);
  - with `launch.detach=true`, returns once the jobs are queued; the last cell to finish writes the report;
  - with `launch.pack=true`, submits the cells that can share a base as one job (`PackedCells`): the job decides
    each cell as it would alone, then trains the waiting ones packed (lifecycle.packing), and a requeued job does
    it again, so each cell resumes where it stopped.
The time limit is handled in the job (lifecycle.job): the trainer saves on SLURM's SIGUSR2, then
submitit's own handler requeues the job and the restarted cell resumes from that state.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from omegaconf import OmegaConf, open_dict

from flux_lora.compose import load_run
from flux_lora.engines import get_engine
from flux_lora.lifecycle.packing import PackQueue, run_waiting
from flux_lora.lifecycle.slurm import JOBS_FILE
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

SCRIPT_FILE = "sbatch.sh"

# What sbatch says about a setting -> the launcher key that holds it.
_REJECTED_KEYS = (
    (re.compile(r"partition", re.I), "partition"),
    (re.compile(r"account", re.I), "account"),
    (re.compile(r"qos", re.I), "qos"),
    (re.compile(r"generic resource|gres", re.I), "gres / gpus_per_node"),
    (re.compile(r"feature|constraint", re.I), "constraint"),
    (re.compile(r"time limit", re.I), "timeout_min"),
    (re.compile(r"memory", re.I), "mem_gb"),
    (re.compile(r"cpu|processor", re.I), "cpus_per_task"),
    (re.compile(r"node", re.I), "nodes"),
)


class ClusterRefusal(RuntimeError):
    """A sweep the cluster (or this launcher) will not run, in one line naming the setting."""


def rejected_setting(stderr: str, params: dict[str, Any]) -> str:
    """One line from sbatch's complaint, naming the hydra.launcher key it is about."""
    lines = [line.removeprefix("sbatch: error:").strip() for line in stderr.strip().splitlines() if line.strip()]
    why = next(
        (line for line in reversed(lines) if "Batch job submission failed" in line),
        lines[-1] if lines else "sbatch failed",
    )
    why = why.replace("Batch job submission failed:", "").strip()
    for pattern, key in _REJECTED_KEYS:
        if pattern.search(why):
            first = key.split(" ")[0]
            value = params.get(first)
            return (
                f"hydra.launcher.{key}{'=' + str(value) if value is not None else ''}: the cluster rejected it ({why}); "
                "set it on the command line or in conf/local/ (see `sinfo`, `sacctmgr show assoc`)"
            )
    return f"hydra.launcher: sbatch rejected the sweep ({why}); check the launcher settings in conf/local/ or on the command line"


_accounting_checked = False


def use_squeue_without_accounting() -> None:
    """Where `sacct` does not work, let submitit read job states from `squeue` (once per process, one line)."""
    global _accounting_checked
    if _accounting_checked:
        return
    _accounting_checked = True
    if shutil.which("sacct") is None:
        reason = "no sacct"
    else:
        done = subprocess.run(["sacct", "-n", "-X", "-j", "1"], capture_output=True, text=True, timeout=30, check=False)
        if done.returncode == 0:
            return
        reason = (done.stderr.strip().splitlines() or ["sacct failed"])[-1]
    from submitit.slurm.slurm import SlurmJob

    SlurmJob.watcher = squeue_watcher()
    print(f"info: SLURM accounting is off here ({reason}): job states come from squeue and the jobs' own files")


def squeue_watcher():
    """submitit's SLURM state watcher, asking squeue (which keeps ended jobs for MinJobAge) instead of sacct.
    Built on first use: Hydra imports every launcher plugin at each start, and submitit is not cheap."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    class SqueueWatcher(SlurmInfoWatcher):
        def _make_command(self) -> list[str] | None:
            to_check = sorted({x.split("_")[0] for x in self._registered - self._finished})
            if not to_check:
                return None
            return ["squeue", "--states=all", "-r", "-h", "-o", "%i|%T|%N", "-j", ",".join(to_check)]

        def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
            text = string.decode() if isinstance(string, bytes) else string
            return super().read_info("JobID|State|NodeList\n" + text)

    return SqueueWatcher(delay_s=600)


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    detached: ClassVar[dict | None] = None  # what a detached launch queued (launch.py prints how to follow it)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from submitit import AutoExecutor
        from submitit.core.utils import FailedJobError

        assert self.config is not None
        params = dict(self.params)
        if (params.get("nodes") or 1) > 1:
            raise ClusterRefusal(
                f"hydra.launcher.nodes={params['nodes']}: one node per cell only (accelerate's multi-node rendezvous is not "
                "set up); use gpu.num_gpus for the GPUs of one node"
            )
        use_squeue_without_accounting()
        # Requeue after a node failure whatever the site's JobRequeue says (submitit does not ask for it); the job
        # comes back as itself, with a higher SLURM_RESTART_COUNT, and takes its run over from the lost node.
        params["additional_parameters"] = {"requeue": True, **(params.get("additional_parameters") or {})}
        executor = AutoExecutor(
            cluster="slurm", folder=params.pop("submitit_folder"), slurm_max_num_timeout=params.pop("max_num_timeout")
        )
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in shared else f"slurm_{k}": v for k, v in params.items()})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        numbers = range(initial_job_idx, initial_job_idx + len(job_overrides))
        cells = [
            (list(overrides), "hydra.sweep.dir", n, f"job_id_for_{n}", Singleton.get_state())
            for n, overrides in zip(numbers, job_overrides)
        ]
        packs = self.packs(job_overrides)
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's complaint; we say it in one line
                if packs is None:
                    jobs = executor.map_array(self, *zip(*cells))
                else:
                    jobs = executor.map_array(PackedCells(self), [[cells[i] for i in pack] for pack in packs])
        except FailedJobError as refused:
            raise ClusterRefusal(rejected_setting(str(refused), self.params)) from None
        record = {
            "jobs": [job.job_id for job in jobs],
            "cells": [" ".join(filter_overrides(o)) for o in job_overrides],
            "detached": bool(OmegaConf.select(self.config, "launch.detach", default=False)),
        }
        if packs is not None:
            record["packs"] = packs  # the cells (by their index in "cells") each job runs
        script = jobs[0].paths.submission_file
        if script.is_file():
            shutil.copyfile(script, sweep_dir / SCRIPT_FILE)
        (sweep_dir / JOBS_FILE).write_text(json.dumps(record, indent=2) + "\n")
        print(
            f"submitted {len(jobs)} cell(s) to SLURM: {', '.join(record['jobs'])} (script: {sweep_dir / SCRIPT_FILE})"
        )
        if record["detached"]:
            SlurmLauncher.detached = {**record, "sweep_dir": str(sweep_dir)}
            return []
        if packs is None:
            return [job.results()[0] for job in jobs]
        returns: dict[int, JobReturn] = {}
        for job, pack in zip(jobs, packs):
            returns.update(zip(pack, job.results()[0]))
        return [returns[i] for i in sorted(returns)]

    def packs(self, job_overrides: Sequence[Sequence[str]]) -> list[list[int]] | None:
        """launch.pack: the cells each SLURM job runs, grouped by the engine's key of the composed cell (the job
        groups the frozen runs again by their full key, the training set's content included, so a pack that turns
        out not to share a base trains as several packs in that job); None when no cell asks for packing."""
        keys = [self._sweep_pack_key(overrides) for overrides in job_overrides]
        if all(key is False for key in keys):
            return None
        packs: dict[str, list[int]] = {}
        alone: list[list[int]] = []
        for index, key in enumerate(keys):
            if isinstance(key, str):
                packs.setdefault(key, []).append(index)
            else:
                alone.append([index])
        return sorted([*packs.values(), *alone])

    def _sweep_pack_key(self, overrides: Sequence[str]) -> str | bool | None:
        """The cell's pack key; None: it packs with nobody; False: it does not ask for packing. A cell that does not
        compose here is left to its job, which says why in one line, as it does for a cell that is not packed."""
        assert self.hydra_context is not None and self.config is not None
        try:
            cell = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            if not OmegaConf.select(cell, "launch.pack", default=False):
                return False
            with open_dict(cell):
                del cell["hydra"]
            run = load_run(cell)
            return get_engine(run.engine.name.value).sweep_pack_key(run)
        except Exception:  # noqa: BLE001 - see the docstring
            return None


class PackedCells:
    """One SLURM job running several cells of a packed sweep: each cell's task (compose, check, freeze, decide)
    in turn, as the job of a cell alone runs it, then the waiting runs as packed jobs (lifecycle.packing)."""

    def __init__(self, launcher: SlurmLauncher) -> None:
        self.launcher = launcher

    def __call__(self, cells: list[tuple]) -> list[JobReturn]:
        PackQueue.runs_here = True
        returns = [self.launcher(*cell) for cell in cells]
        run_waiting(lambda line: print(f"info: {line}"))
        return returns

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Requeued (time limit, preemption): the same cells again; each resumes where it stopped."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


def follow_lines(detached: dict) -> list[str]:
    """How to follow a detached sweep."""
    array = detached["jobs"][0].split("_")[0] if detached["jobs"] else "?"
    return [
        f"queued {len(detached['jobs'])} cell(s) as SLURM job {array}; this command returns now (launch.detach=true)",
        f"  follow:  squeue -j {array}    tail -f {detached['sweep_dir']}/*/train.log",
        f"  report:  written by the last cell to finish, or now: python -m flux_lora.report {detached['sweep_dir']}",
    ]


class LocalGpuPoolLauncher(submitit_launcher.LocalLauncher):
    """`hydra/launcher=local_gpus`: a sweep's cells side by side on one machine, each pinned to its own GPU(s)
    through CUDA_VISIBLE_DEVICES (submitit's local executor); the next cell starts when one ends, and two cells
    never share a GPU. `hydra.launcher.devices` lists the device ids (default: every GPU NVML sees); a cell takes
    `gpu.num_gpus` of them. What each cell got is in the sweep's gpu_pool.json and in its repro.json."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from submitit import LocalExecutor

        assert self.config is not None
        per_cell = int(self.params.get("gpus_per_node") or 1)
        devices = [int(d) for d in (self.params.get("devices") or _visible_gpu_ids())]
        if not devices:
            raise ClusterRefusal(
                "hydra.launcher.devices: no GPU visible on this machine; list the device ids (hydra.launcher.devices=[0,1])"
            )
        slots = [tuple(devices[i : i + per_cell]) for i in range(0, len(devices) - per_cell + 1, per_cell)]
        if not slots:
            raise ClusterRefusal(
                f"gpu.num_gpus={per_cell}: a cell needs more GPUs than hydra.launcher.devices={devices} holds"
            )
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        waiting = list(zip(range(initial_job_idx, initial_job_idx + len(job_overrides)), job_overrides))
        free, running, finished = list(slots), [], {}
        record: list[dict] = []
        try:
            while waiting or running:
                while waiting and free:
                    number, overrides = waiting.pop(0)
                    slot = free.pop(0)
                    executor = LocalExecutor(folder=self.params["submitit_folder"])
                    executor.update_parameters(
                        timeout_min=self.params["timeout_min"], gpus_per_node=len(slot), visible_gpus=slot
                    )
                    job = executor.submit(
                        self, list(overrides), "hydra.sweep.dir", number, f"job_id_for_{number}", Singleton.get_state()
                    )
                    running.append((job, slot, number, time.time()))
                    print(
                        f"cell #{number} on GPU(s) {','.join(map(str, slot))}: {' '.join(filter_overrides(overrides))}"
                    )
                time.sleep(0.5)
                for item in [r for r in running if r[0].done()]:
                    job, slot, number, began = item
                    running.remove(item)
                    free.append(slot)
                    finished[number] = job
                    record.append({"cell": number, "devices": list(slot), "started": began, "ended": time.time()})
        finally:
            for job, *_ in running:
                job.cancel(check=False)
            (sweep_dir / "gpu_pool.json").write_text(
                json.dumps({"slots": [list(s) for s in slots], "cells": record}, indent=2) + "\n"
            )
        return [finished[number].results()[0] for number in sorted(finished)]


def _visible_gpu_ids() -> list[int]:
    from flux_lora.gpu_probe import probe_gpus

    return list(range(len(probe_gpus().gpus)))
