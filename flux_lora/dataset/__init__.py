"""Dataset preflight and preparation: analyse, gate, prepare and fingerprint a captioned image folder.

Stands alone: nothing here imports Hydra or the rest of flux_lora.
"""

import importlib

# Name -> submodule. Each loads on first use, so a launch whose analysis is all cache hits never
# imports the measuring stack (cv2, imagehash) or the report table (rich.table).
_EXPORTS = {
    "AnalysisSettings": "analyze",
    "analyze_dataset": "analyze",
    "write_contact_sheet": "contact_sheet",
    "DatasetError": "discover",
    "fingerprint_dataset": "fingerprint",
    "GateResult": "gate",
    "GateSettings": "gate",
    "evaluate_gate": "gate",
    "PrepareSettings": "prepare",
    "parse_aspect": "prepare",
    "prepare_dataset": "prepare",
    "DatasetReport": "report",
    "ImageRecord": "report",
    "print_report": "report_table",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
