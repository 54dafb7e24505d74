"""Hydra loads launchers only from its plugin namespace: flux-lora's launchers (flux_lora/cluster.py) under names
it accepts, and the `hydra/launcher=local_gpus` option with its one extra key, `devices`."""

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore

from flux_lora import cluster
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf


class SlurmLauncher(cluster.SlurmLauncher):
    """flux_lora.cluster.SlurmLauncher (all of it lives there)."""


class LocalGpuPoolLauncher(cluster.LocalGpuPoolLauncher):
    """flux_lora.cluster.LocalGpuPoolLauncher (all of it lives there)."""


@dataclass
class LocalGpuPoolConf(LocalQueueConf):
    _target_: str = "hydra_plugins.flux_lora_launcher.LocalGpuPoolLauncher"
    submitit_folder: str = "${hydra.sweep.dir}/.submitit"
    gpus_per_node: int | None = "${gpu.num_gpus}"  # type: ignore[assignment]  # GPUs per cell, from the tier
    timeout_min: int = 10080
    # Device ids to share among the cells; null: every GPU NVML sees here.
    devices: list[int] | None = None


ConfigStore.instance().store(group="hydra/launcher", name="local_gpus", node=LocalGpuPoolConf, provider="flux_lora")
