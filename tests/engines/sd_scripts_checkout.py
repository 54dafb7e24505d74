"""sd-scripts checkouts for tests: the real one when the machine has it, the stand-in otherwise.

A real checkout at the pinned commit is used when SD_SCRIPTS_DIR names it and SD_SCRIPTS_PYTHON names
the interpreter of its own venv (sd-scripts' requirements); CI has neither, so it gets the stand-in:
tests/engines/sd_scripts_standin.py as flux_train_network.py plus stand-ins of the `library` modules
that sd-scripts' pre-training checks use. Tests say which ran (`Checkout.kind`).
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
STANDIN = HERE / "sd_scripts_standin.py"
# Stand-ins of the sd-scripts `library` modules the pre-training checks import, stored under names of their own
# (they are not sd-scripts code) and copied into a fake checkout under the names sd-scripts uses.
STANDIN_LIBRARY = HERE / "sd_scripts_standin_library"
STANDIN_MODULES = {
    "standin_train_util.py": "train_util.py",
    "standin_config_util.py": "config_util.py",
    "standin_strategy_base.py": "strategy_base.py",
    "standin_library_init.py": "__init__.py",
}


@dataclass(frozen=True)
class Checkout:
    path: Path
    python: str
    kind: str  # "real" or "stand-in"


def standin_checkout(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(STANDIN, root / "flux_train_network.py")
    (root / "library").mkdir(exist_ok=True)
    for ours, theirs in STANDIN_MODULES.items():
        shutil.copy(STANDIN_LIBRARY / ours, root / "library" / theirs)
    return root


def real_checkout() -> Checkout | None:
    path, python = os.environ.get("SD_SCRIPTS_DIR"), os.environ.get("SD_SCRIPTS_PYTHON")
    if path and python and (Path(path) / "flux_train_network.py").is_file() and Path(python).is_file():
        return Checkout(Path(path), python, "real")
    return None


def checkout_for_tests(root: Path) -> Checkout:
    return real_checkout() or Checkout(standin_checkout(root), sys.executable, "stand-in")


def sd_scripts_run_args(tmp_path: Path) -> list[str]:
    """A 4-step sd-scripts run on the CPU tier (final profile at 256 px, a state every 2 steps), over a model folder
    of real FLUX.1-dev headers on sparse holes: the launch checks them, the stand-in loads no weights."""
    from tests.models.model_stubs import write_model_folder

    models = tmp_path / "models"
    write_model_folder(models)
    return [
        "engine=sd_scripts",
        "model=flux_dev",
        f"paths.models={models}",
        "profile=final",
        "gpu=cpu",
        "profile.resolution=256",
        "profile.max_train_steps=4",
        "profile.lr_warmup_steps=1",
        "profile.save_every_n_steps=2",
    ]
