"""Compose: the typed schema and the resolvers that `conf/` uses, plus the composed config as data."""

from __future__ import annotations

import dataclasses
import re
from enum import Enum
from pathlib import Path

import yaml
from omegaconf import DictConfig, ListConfig, Node, OmegaConf
from omegaconf.errors import ConfigKeyError
from rich.console import Console
from rich.text import Text
from rich.tree import Tree

from flux_lora.schema import BUCKET_STEP_MULTIPLE, EngineName, RunConfig, register_configs

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"


def _run_name(*parts: object) -> str:
    names = [p.value if isinstance(p, Enum) else str(p) for p in parts]
    # "none" is the ablation of a plain run: leave it out of the readable name.
    return "-".join(n for n in names if n not in ("", "none"))


def _ablation_steps(baseline_steps: int, step_basis: object, gradient_accumulation_steps: int) -> int:
    """A cell's max_train_steps: the baseline's (accumulation 1), or fewer so it sees as many images."""
    basis = step_basis.value if isinstance(step_basis, Enum) else str(step_basis)
    if basis == "images_seen":
        return max(1, round(int(baseline_steps) / int(gradient_accumulation_steps)))
    return int(baseline_steps)


def register() -> None:
    """Idempotent: launch.py, tests and submitit workers all call it before composing."""
    register_configs()
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)
    OmegaConf.register_new_resolver("run_name", _run_name, replace=True)
    OmegaConf.register_new_resolver("ablation_steps", _ablation_steps, replace=True)
    OmegaConf.register_new_resolver(
        "ablation_warmup", lambda steps, share: round(int(steps) * float(share)), replace=True
    )
    # dataset.bucket_reso_steps' default: the step the chosen engine accepts (the fact lives in schema.py).
    OmegaConf.register_new_resolver(
        "engine_bucket_step", lambda engine: BUCKET_STEP_MULTIPLE[EngineName(engine)], replace=True
    )
    # A cluster option for GPUs only when there are some: `--gpus-per-node=0` is an error on GPU clusters.
    OmegaConf.register_new_resolver(
        "gpus_or_none", lambda accelerator, count: int(count) if accelerator == "cuda" else None, replace=True
    )


def resolved_container(cfg: DictConfig) -> dict:
    """The fully resolved config as plain data (enums as their names), without Hydra's node."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]


def _container_children(node: DictConfig | ListConfig) -> list[tuple[str, Node]]:
    if isinstance(node, DictConfig):
        return [(str(key), node._get_node(key)) for key in node.keys()]  # type: ignore[misc]
    return [(str(index), node._get_node(index)) for index in range(len(node))]  # type: ignore[misc]


def raise_on_keys_outside_schema(node: DictConfig | ListConfig, skip: tuple[str, ...] = ("hydra",)) -> None:
    """Raise ConfigKeyError (as OmegaConf does for a typo) at the first key the typed schema does not have.

    Hydra applies `+key=value` with struct mode off (force_add), and OmegaConf.to_object keeps such a
    key as a stray attribute nothing reads: `+profile.max_steps=5` would be frozen while the default
    step count trains. `skip` names top-level keys that are not the run's (Hydra's own node).
    """
    object_type = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
    known = {f.name for f in dataclasses.fields(object_type)} if dataclasses.is_dataclass(object_type) else None
    for key, child in _container_children(node):
        if key in skip:
            continue
        if known is not None and key not in known:
            node._format_and_raise(
                key=key,
                value=None,
                cause=ConfigKeyError(
                    f"Key '{key}' not in '$OBJECT_TYPE' (a `+` override cannot add keys the schema lacks)"
                ),
            )
        if isinstance(child, (DictConfig, ListConfig)) and not child._is_missing() and not child._is_none():
            raise_on_keys_outside_schema(child, skip=())


def load_run(cfg: DictConfig) -> RunConfig:
    """The composed config as a typed, fully resolved `RunConfig` (enums as Enum members); refuses keys outside the schema."""
    raise_on_keys_outside_schema(cfg)
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def describe_config_error(exc: BaseException) -> str:
    """One line naming the key or group option at fault and how to fix it (Hydra's own is a page)."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

    if isinstance(exc, MissingConfigException):
        missing = re.search(r"Could not find '([^']+)'", str(exc))
        where = missing.group(1) if missing else str(exc).splitlines()[0]
        group, _, option = where.rpartition("/")
        options = ", ".join(exc.options or [])
        if group and options:
            return f"{group}={option}: no such option in conf/{group}/; choose one of: {options}"
        return f"{where}: config not found under conf/"
    cause = exc.__cause__ if isinstance(exc.__cause__, OmegaConfBaseException) else exc
    if isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", None) or "config"
        first = str(getattr(cause, "msg", None) or cause).splitlines()[0]
        in_file = re.match(r"In '([^']+)'", str(exc))
        origin = f" (in conf/{in_file.group(1)}.yaml)" if in_file else ""
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
            return f"{key}: unknown key{origin}: {first}; check the spelling (`python launch.py --cfg job` lists every key)"
        if isinstance(cause, ValidationError):
            return f"{key}: wrong value{origin}: {first}"
        return f"{key}{origin}: {first}"
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def print_config_tree(cfg: DictConfig, console: Console | None = None) -> None:
    """The resolved config as a tree, one branch per section, as it will be frozen."""
    console = console or Console()
    tree = Tree("[bold]config[/bold]")
    for section, value in resolved_container(cfg).items():
        branch = tree.add(f"[bold]{section}[/bold]")
        text = (
            yaml.safe_dump(value, sort_keys=False, allow_unicode=True).rstrip()
            if isinstance(value, (dict, list))
            else str(value)
        )
        # Plain text: a YAML highlighter (rich.syntax and pygments' lexers) costs a launch 0.05-0.1 s.
        branch.add(Text(text))
    console.print(tree)
