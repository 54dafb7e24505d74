"""NativeEngine: turns a composed RunConfig into native_config.json and `-m flux_lora.engines.native.train`.

Launcher side only (imports the schema); the job reads the JSON through config.py and never this module.
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import asdict, fields
from enum import Enum
from pathlib import Path

from flux_lora.checkpoint_files import state_problem
from flux_lora.compose import PROJECT_ROOT
from flux_lora.dataset.training_set import TRAINING_SET_FILE
from flux_lora.engines.base import EngineInputs
from flux_lora.engines.native.config import CONFIG_FILE, NativeTrainConfig, pack_key
from flux_lora.schema import Accelerator, ModelKind, OptimizerName, RunConfig

TRAIN_MODULE = "flux_lora.engines.native.train"
# The huber/smooth_l1 loss's c (sd-scripts' --huber_c default): the schema has no key for it, so every run uses this.
HUBER_C = 0.1


def _value(value: object) -> object:
    return value.value if isinstance(value, Enum) else value


def _path(value: str | None) -> str | None:
    return str(Path(value).expanduser().absolute()) if value else None


def optimizer_args(run: RunConfig) -> dict:
    """Constructor arguments of the chosen optimizer (Adafactor has no betas and a two-part eps)."""
    opt = run.optimizer
    if opt.name == OptimizerName.adafactor:
        return {
            "weight_decay": opt.weight_decay,
            "relative_step": opt.relative_step,
            "scale_parameter": opt.scale_parameter,
            "warmup_init": opt.warmup_init,
        }
    return {"weight_decay": opt.weight_decay, "betas": [float(b) for b in opt.betas], "eps": opt.eps}


def unapplied_options(run: RunConfig) -> dict[str, str]:
    """Keys set to an active value that the native engine does not apply, each with the reason."""
    p, gpu = run.profile, run.gpu
    unapplied: dict[str, str] = {}
    if gpu.blocks_to_swap > 0 and gpu.accelerator == Accelerator.cpu:
        unapplied["gpu.blocks_to_swap"] = (
            "block swapping (diffusers group offloading) needs CUDA; nothing to swap on CPU"
        )
    if gpu.cpu_offload_checkpointing:
        unapplied["gpu.cpu_offload_checkpointing"] = "engine=native has no CPU offload of checkpointed activations"
    if p.shuffle_caption:
        unapplied["profile.shuffle_caption"] = (
            "text-encoder outputs are cached, so each caption is encoded once as written"
        )
    if p.caption_dropout_rate > 0:
        unapplied["profile.caption_dropout_rate"] = "text-encoder outputs are cached, so captions are never dropped"
    if not p.cache_latents_to_disk:
        unapplied["profile.cache_latents_to_disk"] = (
            "engine=native always caches latents on disk (content-keyed, shared)"
        )
    if not p.cache_text_encoder_outputs_to_disk:
        unapplied["profile.cache_text_encoder_outputs_to_disk"] = (
            "engine=native always caches text-encoder outputs on disk"
        )
    if not p.network_train_unet_only:
        unapplied["profile.network_train_unet_only"] = "engine=native trains a DiT-only LoRA (no CLIP-L LoRA)"
    if p.network_module != "networks.lora_flux":
        unapplied["profile.network_module"] = "engine=native always builds its own kohya-format FLUX LoRA"
    if p.max_data_loader_n_workers > 0:
        unapplied["profile.max_data_loader_n_workers"] = (
            "cached latents and text embeddings are held in memory; no loader workers"
        )
    return unapplied


# Keys of `unapplied` -> the NativeTrainConfig field that must then carry its inactive value.
_NEUTRAL_VALUES = {"gpu.blocks_to_swap": ("blocks_to_swap", 0)}


def composed_native_config(overrides: list[str], run_dir: Path, **fields: object) -> NativeTrainConfig:
    """The job config a launch with these overrides would freeze (composed from conf/: the job has no defaults of
    its own), with `fields` replaced. For benchmarks that time the job's code outside a launch."""
    from dataclasses import replace

    from hydra import compose, initialize_config_dir

    from flux_lora.compose import CONF_DIR, load_run, register

    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        run = load_run(compose("config", overrides=list(overrides)))
    return replace(native_config_from_run(run, run_dir), **fields)


def native_config_from_run(run: RunConfig, run_dir: Path, unapplied: dict[str, str] | None = None) -> NativeTrainConfig:
    """The frozen job config of a run, every field from the run; options in `unapplied` (default:
    unapplied_options(run)) are not passed on."""
    p, gpu, model, ds = run.profile, run.gpu, run.model, run.dataset
    run_dir = Path(run_dir).absolute()
    config = NativeTrainConfig(
        model_kind=_value(model.kind),
        init_seed=model.init_seed,
        transformer_path=_path(model.transformer),
        vae_path=_path(model.vae),
        clip_l_path=_path(model.clip_l),
        t5xxl_path=_path(model.t5xxl),
        diffusers_dir=_path(model.diffusers_dir),
        tokenizer_dir=_path(model.tokenizer_dir),
        t5_max_length=model.t5xxl_max_token_length,
        dataset_path=_path(ds.path) or "",
        caption_extension=ds.caption_extension,
        num_repeats=ds.num_repeats,
        trigger=ds.trigger,
        class_tokens=ds.class_tokens,
        prior_loss_weight=ds.prior_loss_weight,
        training_set_file=str(run_dir / TRAINING_SET_FILE) if (run_dir / TRAINING_SET_FILE).is_file() else None,
        enable_bucket=ds.enable_bucket,
        min_bucket_reso=ds.min_bucket_reso,
        max_bucket_reso=ds.max_bucket_reso,
        bucket_reso_steps=ds.bucket_reso_steps,
        resolution=p.resolution,
        sample_prompts=[{"text": s.text, "seed": s.seed} for s in ds.sample_prompts],
        max_train_steps=p.max_train_steps,
        network_dim=p.network_dim,
        network_alpha=float(p.network_alpha),
        network_dropout=p.network_dropout,
        learning_rate=p.learning_rate,
        lr_scheduler=_value(p.lr_scheduler),
        lr_warmup_steps=p.lr_warmup_steps,
        lr_scheduler_num_cycles=p.lr_scheduler_num_cycles,
        noise_offset=p.noise_offset,
        min_snr_gamma=p.min_snr_gamma,
        min_snr_variant=_value(p.min_snr_variant),
        loss_type=_value(p.loss_type),
        huber_schedule=_value(p.huber_schedule),
        huber_c=HUBER_C,
        guidance_scale=p.guidance_scale,
        timestep_sampling=_value(p.timestep_sampling),
        sigmoid_scale=p.sigmoid_scale,
        discrete_flow_shift=p.discrete_flow_shift,
        model_prediction_type=_value(p.model_prediction_type),
        max_grad_norm=p.max_grad_norm,
        seed=p.seed,
        mixed_precision=_value(p.mixed_precision),
        gradient_checkpointing=p.gradient_checkpointing,
        batch_size=gpu.batch_size,
        gradient_accumulation_steps=gpu.gradient_accumulation_steps,
        blocks_to_swap=gpu.blocks_to_swap,
        fp8_base=gpu.fp8_base,
        use_cpu=gpu.accelerator == Accelerator.cpu,
        optimizer=_value(run.optimizer.name),
        optimizer_args=optimizer_args(run),
        save_every_n_steps=p.save_every_n_steps,
        save_precision=_value(p.save_precision),
        sample_every_n_steps=p.sample_every_n_steps,
        sample_steps=p.sample_steps,
        cache_dir=_path(run.paths.cache) or "",
        run_dir=str(run_dir),
        output_dir=str(run_dir / "output"),
        logging_dir=str(run_dir / "logs"),
        output_name=run.launch.output_name,
        resume_from=_path(run.launch.resume_from),
        init_lora=_path(run.launch.init_lora),
        keep_last_states=run.launch.keep_last_states,
        record={"run_name": run.name, "ablation": run.ablation.name},
    )
    for key in unapplied_options(run) if unapplied is None else unapplied:
        if key in _NEUTRAL_VALUES:
            name, neutral = _NEUTRAL_VALUES[key]
            setattr(config, name, neutral)
    return config


class NativeEngine:
    name = "native"

    def unapplied_options(self, run: RunConfig) -> dict[str, str]:
        return unapplied_options(run)

    def missing_requirements(self, run: RunConfig) -> list[str]:
        missing = []
        if run.launch.resume_from:
            # A half-written or damaged state would resume something else than what was trained.
            problem = state_problem(Path(run.launch.resume_from).expanduser())
            if problem:
                missing.append(f"launch.resume_from: {problem}")
        if run.model.kind != ModelKind.flux_dev:
            return missing
        from flux_lora.engines.native.model_files import missing_flux_dev_files

        m = run.model
        return missing + missing_flux_dev_files(
            transformer=m.transformer,
            vae=m.vae,
            clip_l=m.clip_l,
            t5xxl=m.t5xxl,
            diffusers_dir=m.diffusers_dir,
            tokenizer_dir=m.tokenizer_dir,
        )

    def warnings(self, run: RunConfig) -> list[str]:
        return []  # the engine's code is this package's, recorded with the git state

    def version_record(self, run: RunConfig) -> dict[str, object]:
        record: dict[str, object] = {"engine": "native"}
        for package in ("diffusers", "peft", "torch", "accelerate", "transformers", "bitsandbytes"):
            try:
                record[package] = importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                record[package] = None
        return record

    def render(self, run: RunConfig, run_dir: Path, unapplied: dict[str, str]) -> EngineInputs:
        config = native_config_from_run(run, run_dir, unapplied)
        # The state to resume from goes on the command line (recorded per attempt), not into the frozen config.
        resume = ["--resume", config.resume_from] if config.resume_from else []
        config.resume_from = None
        return EngineInputs(
            script_argv=["-m", TRAIN_MODULE, str(Path(run_dir).absolute()), *resume],
            files={CONFIG_FILE: config.to_json()},
            # Weights and tokenizers come from local paths only: a hub lookup is a bug, so fail fast instead.
            env={"HF_HUB_OFFLINE": "1"},
            cwd=str(PROJECT_ROOT),
        )

    def preflight(self, run: RunConfig, inputs: EngineInputs) -> dict[str, object]:
        # The job's inputs are built and checked in this process (schema, rules, training set): nothing else to run.
        return {
            "state": "skipped",
            "problem": "engine=native: its inputs are checked by the launcher itself",
            "steps": [],
        }

    def finish_attempt(self, run: RunConfig, run_dir: Path) -> list[str]:
        return []  # the native job names its files by the true step itself

    def pack_key(self, run_dir: Path) -> str | None:
        return pack_key(NativeTrainConfig.from_json(Path(run_dir) / CONFIG_FILE))

    def sweep_pack_key(self, run: RunConfig) -> str | None:
        # No run folder yet: its fields are each run's own, and the training set enters only once it is frozen.
        return pack_key(native_config_from_run(run, Path(run.paths.outputs) / "not-frozen"))

    def check_inputs(self, run: RunConfig, inputs: EngineInputs) -> list[str]:
        """The frozen JSON must read back into exactly the config it was made from."""
        text = inputs.files.get(CONFIG_FILE)
        if text is None:
            return [f"{CONFIG_FILE} missing from the rendered inputs"]
        data = json.loads(text)
        known = {f.name for f in fields(NativeTrainConfig)}
        problems = [f"{CONFIG_FILE}: unknown key {key}" for key in sorted(set(data) - known)]
        problems += [f"{CONFIG_FILE}: missing key {key}" for key in sorted(known - set(data))]
        if not problems and asdict(NativeTrainConfig(**data)) != data:
            problems.append(f"{CONFIG_FILE}: does not round-trip through NativeTrainConfig")
        return problems
