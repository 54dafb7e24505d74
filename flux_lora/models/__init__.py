"""The FLUX.1-dev base-model files: what each must hold (layout), its header read without weights
(header), the verdict on a file (verify), and where it comes from (sources, fetch).

`python -m flux_lora.models check|fetch [overrides]`; the launch check calls `model_file_problems`.
Importing this package loads neither torch nor huggingface_hub.
"""

from flux_lora.models.layout import FLUX_DEV, FluxDims, ModelLayout, flux_layout
from flux_lora.models.verify import FileVerdict, model_file_problems, verify_file

__all__ = ["FLUX_DEV", "FileVerdict", "FluxDims", "ModelLayout", "flux_layout", "model_file_problems", "verify_file"]
