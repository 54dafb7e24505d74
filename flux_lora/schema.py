"""Typed config: one dataclass per config group, registered in Hydra's ConfigStore.

The primary config (`conf/config.yaml`) starts from `run_schema`, so every group file merges
into a typed node: an unknown key, a wrong type or a bad enum value fails at compose time.
Each top-level section has one owner group (see `OWNER_GROUPS`); `ablation` files are the one
deliberate exception and list the keys they change in `ablation.changes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from omegaconf import II, MISSING

from flux_lora.dataset import AnalysisSettings, GateSettings
from flux_lora.provenance import EmbedRecord


class LrScheduler(str, Enum):
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"
    cosine = "cosine"
    cosine_with_restarts = "cosine_with_restarts"
    linear = "linear"
    polynomial = "polynomial"


class TimestepSampling(str, Enum):
    sigma = "sigma"
    uniform = "uniform"
    sigmoid = "sigmoid"
    shift = "shift"
    flux_shift = "flux_shift"


class ModelPredictionType(str, Enum):
    raw = "raw"
    additive = "additive"
    sigma_scaled = "sigma_scaled"


class SavePrecision(str, Enum):
    # sd-scripts' --save_precision choices, by name (float is fp32).
    float = "float"
    fp16 = "fp16"
    bf16 = "bf16"


class MinSnrVariant(str, Enum):
    # flow_min_snr: w = min((1-sigma)^2, gamma*sigma^2); clamp: w = min(1, gamma*sigma^2) (engines/native/flow.py).
    flow_min_snr = "flow_min_snr"
    clamp = "clamp"


class MixedPrecision(str, Enum):
    no = "no"
    fp16 = "fp16"
    bf16 = "bf16"


class LossType(str, Enum):
    l2 = "l2"
    l1 = "l1"
    huber = "huber"
    smooth_l1 = "smooth_l1"


class HuberSchedule(str, Enum):
    constant = "constant"
    exponential = "exponential"
    snr = "snr"


class Accelerator(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


class OptimizerName(str, Enum):
    adamw8bit = "adamw8bit"
    adamw = "adamw"
    adafactor = "adafactor"


class EngineName(str, Enum):
    native = "native"
    sd_scripts = "sd_scripts"


# The bucket step each engine accepts: sd-scripts' FLUX trainer first runs the base trainer's
# verify_bucket_reso_steps(64) (train_network.py), then its own (32), so 64 is what passes; the native engine needs
# only FLUX's 16 px latent packing and its buckets use 32. dataset.bucket_reso_steps defaults to it.
BUCKET_STEP_MULTIPLE = {EngineName.sd_scripts: 64, EngineName.native: 32}


class ResumeMode(str, Enum):
    never = "never"
    auto = "auto"


class StepBasis(str, Enum):
    optimizer_steps = "optimizer_steps"
    images_seen = "images_seen"


class ModelKind(str, Enum):
    tiny = "tiny"
    flux_dev = "flux_dev"


@dataclass
class ProfileConfig:
    """The training recipe. Defaults are the FLUX.1-dev settings common to every profile."""

    name: str = MISSING
    resolution: int = MISSING
    max_train_steps: int = MISSING
    network_dim: int = MISSING
    network_alpha: float = MISSING
    network_dropout: float | None = None
    learning_rate: float = 1e-4
    lr_scheduler: LrScheduler = LrScheduler.constant_with_warmup
    lr_warmup_steps: int = 0
    lr_scheduler_num_cycles: int = 1
    noise_offset: float = 0.0
    min_snr_gamma: float | None = None
    min_snr_variant: MinSnrVariant = MinSnrVariant.flow_min_snr
    loss_type: LossType = LossType.l2
    huber_schedule: HuberSchedule = HuberSchedule.snr
    max_grad_norm: float = 1.0
    # FLUX.1-dev LoRA recipe (kohya/ai-toolkit consensus): embedded guidance 1.0, flux_shift, raw prediction.
    guidance_scale: float = 1.0
    timestep_sampling: TimestepSampling = TimestepSampling.flux_shift
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 1.0
    model_prediction_type: ModelPredictionType = ModelPredictionType.raw
    mixed_precision: MixedPrecision = MixedPrecision.bf16
    gradient_checkpointing: bool = True
    cache_latents_to_disk: bool = True
    cache_text_encoder_outputs_to_disk: bool = True
    # Caption augmentations; cached text-encoder outputs make them impossible (rules.py).
    shuffle_caption: bool = False
    caption_dropout_rate: float = 0.0
    seed: int = 42
    save_every_n_steps: int = 500
    save_precision: SavePrecision = SavePrecision.bf16
    sample_every_n_steps: int = 250
    sample_steps: int = 20
    network_module: str = "networks.lora_flux"
    network_train_unet_only: bool = True
    max_data_loader_n_workers: int = 2


@dataclass
class GpuConfig:
    """Memory and throughput knobs of a hardware tier."""

    name: str = MISSING
    accelerator: Accelerator = Accelerator.cuda
    memory_gb: int = MISSING
    num_gpus: int = 1
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_resolution: int = 1024
    blocks_to_swap: int = 0
    fp8_base: bool = False
    cpu_offload_checkpointing: bool = False


@dataclass
class OptimizerConfig:
    name: OptimizerName = MISSING
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # Adafactor with a fixed lr (FLUX LoRA recipes): no relative step, no warmup init, no param scaling.
    relative_step: bool = False
    scale_parameter: bool = False
    warmup_init: bool = False


@dataclass
class AblationConfig:
    """One cell of the ablation matrix; `changes` lists the keys it sets on purpose."""

    name: str = "none"
    description: str = ""
    changes: list[str] = field(default_factory=list)
    # Optimizer steps of the baseline cell (gradient accumulation 1); the cells' step count follows step_basis.
    baseline_steps: int = 500
    # How a cell that accumulates gradients is compared with the baseline: at equal optimizer steps (as the
    # recipe uses accumulation; more images and compute) or at equal images seen (equal compute, fewer updates).
    step_basis: StepBasis = StepBasis.optimizer_steps
    # The cells' learning-rate warmup as a share of their steps: a profile's own warmup (500 steps in final) does not
    # fit the ablation's shorter runs.
    warmup_share: float = 0.1


@dataclass
class EngineConfig:
    name: EngineName = MISSING
    # Interpreter that runs `accelerate launch` for this engine; null = the launcher's own. sd-scripts pins
    # older diffusers/transformers than the native engine, so it usually lives in a venv of its own.
    python: str | None = None
    # sd-scripts only: a checkout of kohya-ss/sd-scripts (flux_train_network.py).
    sd_scripts_dir: str | None = None
    pinned_commit: str | None = None
    tokenizer_cache_dir: str | None = None


@dataclass
class ModelConfig:
    name: str = MISSING
    kind: ModelKind = MISSING
    # flux_dev: the four single files a kohya user has, or one diffusers-format folder.
    transformer: str | None = None
    vae: str | None = None
    clip_l: str | None = None
    t5xxl: str | None = None
    diffusers_dir: str | None = None
    tokenizer_dir: str | None = None
    t5xxl_max_token_length: int = 512
    # tiny: weights are drawn in code from this seed.
    init_seed: int = 0


@dataclass
class SamplePrompt:
    text: str = MISSING
    seed: int = MISSING


# Threshold defaults come from the dataset tools, so `python -m flux_lora.dataset` and the launch preflight
# judge a dataset the same way (their reasons are documented there).
@dataclass
class DatasetAnalysisConfig:
    blur_threshold: float = AnalysisSettings.blur_threshold
    duplicate_max_distance: int = AnalysisSettings.duplicate_max_distance
    detect_faces: bool = AnalysisSettings.detect_faces


@dataclass
class DatasetGateConfig:
    enforce: bool = GateSettings.enforce
    min_images: int = GateSettings.min_images
    max_blurry_share: float = GateSettings.max_blurry_share
    max_duplicate_groups: int = GateSettings.max_duplicate_groups
    max_missing_captions: int = GateSettings.max_missing_captions
    max_missing_trigger: int = GateSettings.max_missing_trigger
    max_unreadable: int = GateSettings.max_unreadable


@dataclass
class DatasetConfig:
    name: str = MISSING
    path: str = MISSING
    trigger: str = MISSING
    class_tokens: str = MISSING
    caption_extension: str = ".txt"
    num_repeats: int = 1
    enable_bucket: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = II("engine_bucket_step:${engine.name}")  # the engine's own step unless set
    sample_prompts: list[SamplePrompt] = field(default_factory=list)
    # Held out from training for the evaluator's validation loss (flux_lora/dataset/training_set.py): a share of
    # the images, the same ones for every run of this dataset (chosen by content hash), or a folder of its own.
    # null: 10% (at least one image) once the dataset has 8 distinct images, none below that; 0: none.
    validation_split: float | None = None
    validation_path: str | None = None
    # Regularization (class) images: photos of the class (any woman, not the subject) trained beside the subject's, so
    # the LoRA keeps what the class looks like (DreamBooth's prior preservation; kohya's `is_reg` subsets). Each epoch
    # they fill as many places as the subject's images with repeats, as kohya fills them (training_set.py). null: none.
    reg_path: str | None = None
    reg_repeats: int = 1  # repeats of each class image; a subfolder named `N_name` sets its own, as for the subject's
    prior_loss_weight: float = 1.0  # a class image's loss against a subject image's (kohya's --prior_loss_weight)
    analysis: DatasetAnalysisConfig = field(default_factory=DatasetAnalysisConfig)
    gate: DatasetGateConfig = field(default_factory=DatasetGateConfig)


@dataclass
class PathsConfig:
    root: str = MISSING
    outputs: str = MISSING
    cache: str = MISSING
    models: str = MISSING


@dataclass
class LaunchConfig:
    dry_run: bool = False
    # hydra/launcher=slurm: return as soon as the jobs are queued (the last cell to finish writes the report).
    detach: bool = False
    # Run an ablation cell even if every change it declares is a no-op for the chosen engine.
    allow_noop_ablation: bool = False
    # Resume from a saved training state folder (an engine's `*-state` directory).
    resume_from: str | None = None
    # Start from the weights of a LoRA file (kohya FLUX format, the same rank) instead of a fresh LoRA. Recorded with
    # its sha256 as the run's lineage, so the run id tells such a run apart from a fresh one.
    init_lora: str | None = None
    output_name: str = "flux-lora"
    # Step states (`*-stepNNNNNNNN-state`) kept on disk: the newest N; 0 keeps all.
    keep_last_states: int = 2
    # A launch whose run id ran before: `auto` skips it if it succeeded and resumes it (in its own folder) if it
    # was interrupted, failed after a checkpoint, or its owner died; `never` always starts a new run.
    # null: `auto` in a multirun (a sweep run again finishes what it started), `never` for a single run.
    resume: ResumeMode | None = None
    # With launch.resume_from: allow recipe keys to differ from the run that saved the state (recorded per key).
    allow_recipe_change: bool = False
    # A run's lease holder that neither this machine nor SLURM can speak for (another host, no SLURM job) is taken
    # for dead once its heartbeat (every 30 s) is older than this many seconds.
    lease_stale_s: float = 600.0
    # What every LoRA file carries in its metadata: `shareable` (the recipe, the dataset's content hash and counts,
    # code and package versions; no absolute paths, host or user names), `full` (the run folder's whole record, for
    # private use) or `none` (kohya's ss_* keys only). The run folder keeps the full record whatever this says.
    embed_record: EmbedRecord = EmbedRecord.shareable
    # A local sweep on engine=native: the cells that can share a base (the same model, data, resolution, batch and
    # accumulation structure and precision; engines/native/config.py PER_RUN_FIELDS says what may differ) train as
    # one job, one adapter each on one frozen model, each equal to its separate run. Each keeps its run folder.
    pack: bool = False


@dataclass
class EvalConfig:
    """`python -m flux_lora.eval` at the end of a run that succeeded (flux_lora/eval, README "Evaluate a run")."""

    enabled: bool = False
    likeness: bool = True  # generate images for likeness, diversity and grids (the slow part)
    lora: str = "final"  # which LoRA generates: final or best (lowest validation loss)
    strengths: list[float] = field(default_factory=lambda: [0.5, 0.8, 1.0, 1.2])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    max_prompts: int | None = None  # at most N sample and N held-out prompts; None: all
    heldout_prompts: bool = True


@dataclass
class RunConfig:
    name: str = MISSING
    profile: ProfileConfig = MISSING
    gpu: GpuConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    ablation: AblationConfig = field(default_factory=AblationConfig)
    engine: EngineConfig = MISSING
    model: ModelConfig = MISSING
    dataset: DatasetConfig = MISSING
    paths: PathsConfig = MISSING
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# The group that owns each top-level section; no other group file may set keys in it.
OWNER_GROUPS: dict[str, str] = {
    "profile": "profile",
    "gpu": "gpu",
    "optimizer": "optimizer",
    "engine": "engine",
    "model": "model",
    "dataset": "dataset",
}

# Sections that describe where and how a run is launched, not what it trains (left out of the run id).
NON_SEMANTIC_KEYS: tuple[str, ...] = (
    "name",
    "paths",
    "launch",
    "eval",
    # A label: what an ablation changes is already in the values it sets.
    "ablation",
    "dataset.path",
    "engine.sd_scripts_dir",
    "engine.tokenizer_cache_dir",
    "engine.python",
)


def register_configs() -> None:
    # Imported here: the job and the lifecycle read this schema without loading Hydra.
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="run_schema", node=RunConfig)
