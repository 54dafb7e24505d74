"""Hydra loads launchers only from its plugin namespace: flux-lora's SLURM launcher under a name it accepts."""

from flux_lora import cluster


class SlurmLauncher(cluster.SlurmLauncher):
    """flux_lora.cluster.SlurmLauncher (all of it lives there)."""
