"""The frozen input of the native training job: one plain dataclass, written as JSON into the run directory.

The job reads nothing else (no Hydra, no config groups): `engine.py` builds this from the composed
run at launch time, and `train.py` reads it back inside `accelerate launch`. No field has a default: schema.py owns
every default and `native_config_from_run` sets every field, so the two cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

# The file in the run directory that the job reads, and nothing else of the launcher's.
CONFIG_FILE = "native_config.json"


@dataclass
class NativeTrainConfig:
    # Model: "tiny" (drawn in code from init_seed) or "flux_dev" (local files only).
    model_kind: str
    init_seed: int
    transformer_path: str | None
    vae_path: str | None
    clip_l_path: str | None
    t5xxl_path: str | None
    diffusers_dir: str | None
    tokenizer_dir: str | None
    t5_max_length: int

    # Dataset: image files with captions beside them (same stem, caption_extension).
    dataset_path: str
    caption_extension: str
    num_repeats: int
    trigger: str  # written to the LoRA metadata (modelspec.trigger_phrase)
    class_tokens: str  # caption of an image without a caption file, as in sd-scripts
    # A class image's loss against a subject image's (the training set's `regularization`; kohya's --prior_loss_weight).
    prior_loss_weight: float
    # The run's training_set.json (the pairs the preflight passed); None: select from dataset_path the same way.
    training_set_file: str | None
    enable_bucket: bool
    min_bucket_reso: int
    max_bucket_reso: int
    bucket_reso_steps: int
    resolution: int
    sample_prompts: list[dict]  # [{"text": str, "seed": int}]

    # Recipe.
    max_train_steps: int
    network_dim: int
    network_alpha: float
    network_dropout: float | None
    learning_rate: float
    lr_scheduler: str
    lr_warmup_steps: int
    lr_scheduler_num_cycles: int
    noise_offset: float
    min_snr_gamma: float | None
    min_snr_variant: str  # "flow_min_snr" or "clamp" (flow.min_snr_weight)
    loss_type: str
    huber_schedule: str
    huber_c: float  # no schema key: engine.HUBER_C
    guidance_scale: float
    timestep_sampling: str
    sigmoid_scale: float
    discrete_flow_shift: float
    model_prediction_type: str
    max_grad_norm: float
    seed: int

    # Memory and throughput.
    mixed_precision: str
    gradient_checkpointing: bool
    batch_size: int
    gradient_accumulation_steps: int
    blocks_to_swap: int
    fp8_base: bool
    use_cpu: bool

    # Optimizer: name in {adamw, adamw8bit, adafactor}; args are passed to its constructor.
    optimizer: str
    optimizer_args: dict

    # Outputs.
    save_every_n_steps: int
    save_precision: str  # sd-scripts' names: float, fp16, bf16
    sample_every_n_steps: int
    sample_steps: int
    cache_dir: str
    run_dir: str
    output_dir: str
    logging_dir: str
    output_name: str
    resume_from: str | None
    init_lora: str | None  # a kohya LoRA file the LoRA starts from (launch.init_lora)
    keep_last_states: int  # step states kept on disk, the newest; 0 keeps all
    # Values copied into the LoRA metadata as-is (run name, ablation cell); never read by the loop.
    record: dict

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, path: str | Path) -> NativeTrainConfig:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        known = {f.name for f in fields(cls)}
        # A frozen file from another version of the engine: refuse rather than train something else.
        unknown, missing = sorted(set(data) - known), sorted(known - set(data))
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}")
        if missing:
            raise ValueError(f"{path}: missing keys {missing}")
        return cls(**data)


# launch.pack: the fields each run of a packed job keeps to itself (its adapter, noise, loss, optimizer, schedule,
# length, outputs). Every other field is what the runs share (the base, the data, the batch and accumulation
# structure, the precision) and must be equal for them to share a job; a new field is shared until it is listed here,
# so a field nobody thought about can never be silently trained with another run's value.
PER_RUN_FIELDS = frozenset(
    {
        "trigger",
        "sample_prompts",
        "max_train_steps",
        "network_dim",
        "network_alpha",
        "network_dropout",
        "learning_rate",
        "lr_scheduler",
        "lr_warmup_steps",
        "lr_scheduler_num_cycles",
        "noise_offset",
        "min_snr_gamma",
        "min_snr_variant",
        "loss_type",
        "huber_schedule",
        "huber_c",
        "guidance_scale",
        "timestep_sampling",
        "sigmoid_scale",
        "discrete_flow_shift",
        "model_prediction_type",
        "max_grad_norm",
        "seed",
        "optimizer",
        "optimizer_args",
        "save_every_n_steps",
        "save_precision",
        "sample_every_n_steps",
        "sample_steps",
        "run_dir",
        "output_dir",
        "logging_dir",
        "output_name",
        "resume_from",
        "init_lora",
        "keep_last_states",
        "record",
    }
)
# Packed runs step under one accelerate GradScaler, which every optimizer's step would update: fp16 is never packed.
UNPACKABLE_PRECISION = "fp16"


def pack_key(config: NativeTrainConfig) -> str | None:
    """What runs that can share one job have in common, as a digest; None for a run that trains alone. The training
    set enters by content (each run folder has its own copy)."""
    if config.mixed_precision == UNPACKABLE_PRECISION:
        return None
    shared = {k: v for k, v in asdict(config).items() if k not in PER_RUN_FIELDS}
    if config.training_set_file:
        shared["training_set_file"] = hashlib.sha256(Path(config.training_set_file).read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()[:12]
