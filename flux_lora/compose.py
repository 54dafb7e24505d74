"""Compose: the typed schema and the resolvers that `conf/` uses, plus the composed config as data."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from flux_lora.schema import RunConfig, register_configs

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"


def _run_name(*parts: object) -> str:
    names = [p.value if isinstance(p, Enum) else str(p) for p in parts]
    # "none" is the ablation of a plain run: leave it out of the readable name.
    return "-".join(n for n in names if n not in ("", "none"))


def register() -> None:
    """Idempotent: launch.py, tests and submitit workers all call it before composing."""
    register_configs()
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)
    OmegaConf.register_new_resolver("run_name", _run_name, replace=True)


def resolved_container(cfg: DictConfig) -> dict:
    """The fully resolved config as plain data (enums as their names), without Hydra's node."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]


def load_run(cfg: DictConfig) -> RunConfig:
    """The composed config as a typed, fully resolved `RunConfig` (enums as Enum members)."""
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]
