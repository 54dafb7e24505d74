"""Training engines behind one interface (base.Engine); nothing outside knows their flag names."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the training job imports this package and must not load the schema (and Hydra)
    from flux_lora.engines.base import Engine


def get_engine(name: str) -> Engine:
    # Imported on demand: the native engine pulls in torch and diffusers, sd-scripts needs neither.
    if name == "native":
        from flux_lora.engines.native.engine import NativeEngine

        return NativeEngine()
    if name == "sd_scripts":
        from flux_lora.engines.sd_scripts import SdScriptsEngine

        return SdScriptsEngine()
    raise ValueError(f"engine={name}: unknown engine; choose engine=native or engine=sd_scripts")
