"""Evaluate a finished (or failed) run from its directory: validation loss over checkpoints, identity
likeness, diversity, load and key checks, grids. `python -m flux_lora.eval RUN_DIR` or `evaluate_run`."""

from flux_lora.eval.evaluation import EVAL_FILE, SCHEMA_VERSION, evaluate_run
from flux_lora.eval.run_record import EVAL_DIR
from flux_lora.eval.settings import EvalSettings

__all__ = ["EVAL_DIR", "EVAL_FILE", "SCHEMA_VERSION", "EvalSettings", "evaluate_run"]
