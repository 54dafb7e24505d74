"""The frozen input of the native training job: one plain dataclass, written as JSON into the run directory.

The job reads nothing else (no Hydra, no config groups): `engine.py` builds this from the composed
run at launch time, and `train.py` reads it back inside `accelerate launch`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional


# The file in the run directory that the job reads, and nothing else of the launcher's.
CONFIG_FILE = "native_config.json"

@dataclass
class NativeTrainConfig:
    # Model: "tiny" (drawn in code from init_seed) or "flux_dev" (local files only).
    model_kind: str = "tiny"
    init_seed: int = 0
    transformer_path: Optional[str] = None
    vae_path: Optional[str] = None
    clip_l_path: Optional[str] = None
    t5xxl_path: Optional[str] = None
    diffusers_dir: Optional[str] = None
    tokenizer_dir: Optional[str] = None
    t5_max_length: int = 64

    # Dataset: image files with captions beside them (same stem, caption_extension).
    dataset_path: str = ""
    caption_extension: str = ".txt"
    num_repeats: int = 1
    trigger: str = ""  # written to the LoRA metadata (modelspec.trigger_phrase)
    class_tokens: str = ""  # caption of an image without a caption file, as in sd-scripts
    # A class image's loss against a subject image's (the training set's `regularization`; kohya's --prior_loss_weight).
    prior_loss_weight: float = 1.0
    # The run's training_set.json (the pairs the preflight passed); None: select from dataset_path the same way.
    training_set_file: Optional[str] = None
    enable_bucket: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    resolution: int = 256
    sample_prompts: list[dict] = field(default_factory=list)  # [{"text": str, "seed": int}]

    # Recipe.
    max_train_steps: int = 30
    network_dim: int = 8
    network_alpha: float = 8.0
    network_dropout: Optional[float] = None
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 0
    lr_scheduler_num_cycles: int = 1
    noise_offset: float = 0.0
    min_snr_gamma: Optional[float] = None
    min_snr_variant: str = "flow_min_snr"  # or "clamp" (flow.min_snr_weight)
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1  # sd-scripts' default; the schema has no key for it
    guidance_scale: float = 1.0
    timestep_sampling: str = "flux_shift"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 1.0
    model_prediction_type: str = "raw"
    max_grad_norm: float = 1.0
    seed: int = 42

    # Memory and throughput.
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = True
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    blocks_to_swap: int = 0
    fp8_base: bool = False
    use_cpu: bool = False

    # Optimizer: name in {adamw, adamw8bit, adafactor}; args are passed to its constructor.
    optimizer: str = "adamw8bit"
    optimizer_args: dict = field(default_factory=dict)

    # Outputs.
    save_every_n_steps: int = 500
    save_precision: str = "bf16"  # sd-scripts' names: float, fp16, bf16
    sample_every_n_steps: int = 250
    sample_at_first: bool = False
    sample_steps: int = 20
    max_data_loader_n_workers: int = 0
    cache_dir: str = ""
    run_dir: str = ""
    output_dir: str = ""
    logging_dir: str = ""
    output_name: str = "flux-lora"
    resume_from: Optional[str] = None
    init_lora: Optional[str] = None  # a kohya LoRA file the LoRA starts from (launch.init_lora)
    keep_last_states: int = 2  # step states kept on disk, the newest; 0 keeps all
    # Values copied into the LoRA metadata as-is (run name, ablation cell); never read by the loop.
    record: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, path: str | Path) -> "NativeTrainConfig":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            # A frozen file from another version of the engine: refuse rather than train something else.
            raise ValueError(f"{path}: unknown keys {unknown}")
        return cls(**data)
