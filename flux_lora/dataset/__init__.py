"""Dataset preflight and preparation: analyse, gate, prepare and fingerprint a captioned image folder.

Stands alone: nothing here imports Hydra or the rest of flux_lora.
"""

from flux_lora.dataset.analyze import AnalysisSettings, analyze_dataset
from flux_lora.dataset.contact_sheet import write_contact_sheet
from flux_lora.dataset.discover import DatasetError
from flux_lora.dataset.fingerprint import fingerprint_dataset
from flux_lora.dataset.gate import GateResult, GateSettings, evaluate_gate
from flux_lora.dataset.prepare import PrepareSettings, parse_aspect, prepare_dataset
from flux_lora.dataset.report import DatasetReport, ImageRecord
from flux_lora.dataset.report_table import print_report

__all__ = [
    "AnalysisSettings",
    "DatasetError",
    "DatasetReport",
    "GateResult",
    "GateSettings",
    "ImageRecord",
    "PrepareSettings",
    "analyze_dataset",
    "evaluate_gate",
    "fingerprint_dataset",
    "parse_aspect",
    "prepare_dataset",
    "print_report",
    "write_contact_sheet",
]
