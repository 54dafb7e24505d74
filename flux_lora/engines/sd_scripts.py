"""sd-scripts engine: a frozen run as kohya-ss `flux_train_network.py` command-line flags.

Everything goes on the command line, never into a `--config_file` TOML: argparse type-checks flags
and choices, while sd-scripts copies TOML values in unchecked. The files the job reads are the
`--dataset_config` TOML (strictly validated by sd-scripts) and the sample-prompt file, both written
into the run directory. Flag names, types and choices come from `sd_scripts_flux_args.json`, the
option table of the pinned commit's parser; facts about FLUX no-ops are from
shared/reference/sd-scripts-flux.md (line numbers at the pinned commit).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import tomli_w

from flux_lora.dataset.training_set import TRAINING_SET_FILE, TrainingSet
from flux_lora.engines.base import EngineInputs
from flux_lora.engines.sd_scripts_dataset import build_dataset_view, view_subsets
from flux_lora.engines.sd_scripts_resume import ResumePlan, adopt_resumed_outputs, plan_resume, resume_problem
from flux_lora.schema import HuberSchedule, LossType, LrScheduler, ModelKind, OptimizerName, RunConfig, TimestepSampling

SCRIPT_NAME = "flux_train_network.py"
REFERENCE_JSON = Path(__file__).with_name("sd_scripts_flux_args.json")
DATASET_TOML = "dataset.toml"
SAMPLE_PROMPTS = "sample_prompts.txt"
# Stands in for the checkout in a dry run without one: visibly not a path (a real launch is refused).
UNSET_CHECKOUT = "<engine.sd_scripts_dir unset>"
# FLUX.1-dev's embedded guidance at inference (BFL's and diffusers' default): samples show what a
# user will generate. Training guidance is a different knob (profile.guidance_scale, 1.0 for dev).
SAMPLE_GUIDANCE = 3.5

# Parser defaults that are wrong for a FLUX identity LoRA: always passed explicitly.
UNSAFE_DEFAULT_FLAGS: tuple[str, ...] = (
    "--mixed_precision",  # default "no": full fp32, and fp8_base then fails
    "--caption_extension",  # default ".caption"; our captions are .txt
    "--learning_rate",  # default 2e-6
    "--network_alpha",  # default 1: scales the update down by 1/rank
    "--network_dim",  # default None -> rank 4
)
# Flags the pinned FLUX trainer ignores (sd-scripts-flux.md); never passed.
NOOP_FLAGS: tuple[str, ...] = (
    "--noise_offset",
    "--noise_offset_random_strength",
    "--multires_noise_iterations",
    "--multires_noise_discount",
    "--adaptive_noise_scale",
    "--min_snr_gamma",
    "--debiased_estimation_loss",
    "--scale_v_pred_loss_like_noise_pred",
    "--v_pred_like_loss",
    "--min_timestep",
    "--max_timestep",
    "--sdpa",
    "--xformers",
    "--mem_eff_attn",
    "--sample_sampler",
    "--max_token_length",
    "--clip_skip",
    "--v_parameterization",
    "--zero_terminal_snr",
)
OPTIMIZER_TYPES: dict[OptimizerName, str] = {
    OptimizerName.adamw8bit: "AdamW8bit",
    OptimizerName.adamw: "AdamW",
    OptimizerName.adafactor: "Adafactor",
}
MODEL_FILE_KEYS: tuple[str, ...] = ("transformer", "vae", "clip_l", "t5xxl")
# Timestep samplings that read --discrete_flow_shift: shift directly, sigma through the noise scheduler's shift.
FLOW_SHIFT_SAMPLINGS = (TimestepSampling.shift, TimestepSampling.sigma)
HUBER_LOSSES = (LossType.huber, LossType.smooth_l1)
# Tokenizer folders sd-scripts looks for under --tokenizer_cache_dir before it asks the hub (strategy_base.py:54-71).
TOKENIZER_FOLDERS: tuple[str, ...] = ("openai_clip-vit-large-patch14", "google_t5-v1_1-xxl")
# Runs sd-scripts' own pre-training checks in engine.python (standard library on our side).
PREFLIGHT_JOB = Path(__file__).with_name("sd_scripts_preflight_job.py")
PREFLIGHT_MARKER = "FLUX_LORA_PREFLIGHT_VERDICT "  # same as sd_scripts_preflight_job.VERDICT_MARKER


@dataclass(frozen=True)
class ReferenceOption:
    """One option of the pinned parser, as recorded in the reference JSON."""

    flag: str
    type: str | None  # "int", "float", "str", "Path", "int_or_float" or None (a string)
    choices: list | None
    action: str  # "store" or "store_true"
    nargs: object  # None (one value), 0, "*", "+", "?" or a count


def load_reference_options(path: Path = REFERENCE_JSON) -> dict[str, ReferenceOption]:
    table = json.loads(path.read_text(encoding="utf-8"))
    options: dict[str, ReferenceOption] = {}
    for entry in table["options"]:
        option = ReferenceOption(entry["flag"], entry["type"], entry["choices"], entry["action"], entry["nargs"])
        for name in entry["option_strings"]:
            options[name] = option
    return options


# ---------------------------------------------------------------- what the engine ignores


def unapplied_flux_options(run: RunConfig) -> dict[str, str]:
    """Config keys set to an active value that the pinned FLUX trainer silently ignores."""
    unapplied: dict[str, str] = {}
    if run.profile.noise_offset != 0:
        unapplied["profile.noise_offset"] = (
            "sd-scripts' FLUX trainer draws plain randn noise (flux_train_network.py:326-332); engine=native applies it"
        )
    if run.profile.min_snr_gamma is not None:
        unapplied["profile.min_snr_gamma"] = (
            "sd-scripts' FLUX trainer returns the loss unweighted (post_process_loss, flux_train_network.py:436-437);"
            " engine=native applies it"
        )
    if run.profile.discrete_flow_shift != 1.0 and run.profile.timestep_sampling not in FLOW_SHIFT_SAMPLINGS:
        unapplied["profile.discrete_flow_shift"] = (
            f"read only by timestep_sampling=shift and by the default sigma sampling's scheduler (flux_train_utils.py:486-499,"
            f" flux_train_network.py:302), not by {run.profile.timestep_sampling.value}"
        )
    if run.profile.huber_schedule != HuberSchedule.snr and run.profile.loss_type not in HUBER_LOSSES:
        unapplied["profile.huber_schedule"] = (
            f"read only with loss_type huber or smooth_l1 (train_util.py:6111-6112), not {run.profile.loss_type.value}"
        )
    if run.gpu.cpu_offload_checkpointing and not run.profile.gradient_checkpointing:
        unapplied["gpu.cpu_offload_checkpointing"] = (
            "only read inside gradient checkpointing (train_network.py:716-720);"
            " set profile.gradient_checkpointing=true"
        )
    return unapplied


# ---------------------------------------------------------------- rendering


def _text(value: object) -> str:
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, float):
        return repr(value)  # shortest round-trip form: float() reads back the exact value
    return str(value)


def _absolute(path: str) -> str:
    # The job runs with the checkout as cwd, so a path typed relative to the launcher's cwd is anchored here.
    return str(Path(path).expanduser().absolute())


def _model_file(run: RunConfig, key: str) -> str:
    path = getattr(run.model, key)
    # Unset only in a dry run (missing_requirements refuses a real launch): say so instead of guessing a path.
    return _absolute(path) if path else f"<model.{key} unset>"


class _Argv:
    """Collects flags in order; a flag whose config key the engine does not apply is left out."""

    def __init__(self, unapplied: dict[str, str]) -> None:
        self.tokens: list[str] = []
        self._unapplied = unapplied

    def value(self, flag: str, *values: object, key: str | None = None) -> None:
        if key not in self._unapplied:
            self.tokens += [flag, *(_text(v) for v in values)]

    def switch(self, flag: str, on: bool, key: str | None = None) -> None:
        if on and key not in self._unapplied:
            self.tokens.append(flag)


def optimizer_args(run: RunConfig) -> list[str]:
    """`--optimizer_args` items; sd-scripts splits each at "=" and reads the value with ast.literal_eval."""
    opt = run.optimizer
    if opt.name == OptimizerName.adafactor:
        # transformers' Adafactor has no betas and a two-part eps: only pass what it accepts.
        return [
            f"weight_decay={opt.weight_decay!r}",
            f"relative_step={opt.relative_step}",
            f"scale_parameter={opt.scale_parameter}",
            f"warmup_init={opt.warmup_init}",
        ]
    betas = ",".join(repr(float(b)) for b in opt.betas)
    return [f"weight_decay={opt.weight_decay!r}", f"betas={betas}", f"eps={opt.eps!r}"]


def caches_text_encoder_outputs(run: RunConfig) -> bool:
    # Cached text-encoder outputs cannot follow caption augmentations (flux_train_network.py:65-68).
    return not run.profile.shuffle_caption and run.profile.caption_dropout_rate == 0


def has_sample_prompts(run: RunConfig) -> bool:
    return bool(run.dataset.sample_prompts) and run.profile.sample_every_n_steps > 0


def resume_of(run: RunConfig) -> ResumePlan | None:
    """The resume plan when launch.resume_from names a readable state; None otherwise (the check reports why)."""
    state = run.launch.resume_from
    if not state or resume_problem(Path(_absolute(state)), run.profile.max_train_steps, run.profile.lr_scheduler.value):
        return None
    return plan_resume(Path(_absolute(state)), run.profile.max_train_steps)


def render_sd_scripts_args(run: RunConfig, run_dir: Path, unapplied: dict[str, str]) -> list[str]:
    """The arguments of flux_train_network.py (without the script path) for a frozen run."""
    p, gpu, model, engine = run.profile, run.gpu, run.model, run.engine
    resume = resume_of(run)
    run_dir = Path(run_dir).absolute()
    a = _Argv(unapplied)

    # Model files: the four single-file FLUX.1-dev weights a kohya user has.
    a.value("--pretrained_model_name_or_path", _model_file(run, "transformer"))
    a.value("--ae", _model_file(run, "vae"))
    a.value("--clip_l", _model_file(run, "clip_l"))
    a.value("--t5xxl", _model_file(run, "t5xxl"))
    a.value("--t5xxl_max_token_length", model.t5xxl_max_token_length)
    if engine.tokenizer_cache_dir:
        a.value("--tokenizer_cache_dir", _absolute(engine.tokenizer_cache_dir))

    # LoRA network.
    a.value("--network_module", p.network_module)
    a.value("--network_dim", p.network_dim)
    if run.launch.init_lora:
        a.value("--network_weights", _absolute(run.launch.init_lora))
    a.value("--network_alpha", float(p.network_alpha))
    if p.network_dropout is not None:
        a.value("--network_dropout", float(p.network_dropout), key="profile.network_dropout")
    a.switch("--network_train_unet_only", p.network_train_unet_only)

    # Optimizer and schedule; --max_train_steps counts optimizer steps (after accumulation).
    a.value("--optimizer_type", OPTIMIZER_TYPES[run.optimizer.name])
    a.value("--optimizer_args", *optimizer_args(run))
    a.value("--learning_rate", float(p.learning_rate))
    a.value("--lr_scheduler", p.lr_scheduler)
    # sd-scripts scales the schedule's total by the process count but not the warmup, and accelerate steps the
    # scheduler once per process (train_util.py:5274-5277): warmup is given in scheduler steps so it ends at
    # optimizer step lr_warmup_steps on any number of GPUs, as in the native engine.
    a.value("--lr_warmup_steps", p.lr_warmup_steps * gpu.num_gpus)
    if p.lr_scheduler == LrScheduler.cosine_with_restarts:
        a.value("--lr_scheduler_num_cycles", p.lr_scheduler_num_cycles)
    a.value("--max_train_steps", resume.remaining_steps if resume else p.max_train_steps)
    a.value("--gradient_accumulation_steps", gpu.gradient_accumulation_steps)
    # Batch size lives here, not in dataset.toml: datasets fall back to it (config_util.py), and
    # train_network.py:985,1183 read only this flag for the logged total batch and ss_batch_size_per_device.
    a.value("--train_batch_size", gpu.batch_size)
    a.value("--max_grad_norm", float(p.max_grad_norm))
    a.value("--seed", p.seed)

    # Loss and flow-matching recipe.
    a.value("--loss_type", p.loss_type)
    if p.loss_type in HUBER_LOSSES:
        a.value("--huber_schedule", p.huber_schedule)
    a.value("--guidance_scale", float(p.guidance_scale))
    a.value("--timestep_sampling", p.timestep_sampling)
    a.value("--sigmoid_scale", float(p.sigmoid_scale))
    if p.timestep_sampling in FLOW_SHIFT_SAMPLINGS:
        a.value("--discrete_flow_shift", float(p.discrete_flow_shift))
    a.value("--model_prediction_type", p.model_prediction_type)

    # Precision and memory.
    a.value("--mixed_precision", p.mixed_precision)
    a.value("--save_precision", p.save_precision)
    a.switch("--fp8_base", gpu.fp8_base, key="gpu.fp8_base")
    a.switch("--gradient_checkpointing", p.gradient_checkpointing)
    a.switch("--cpu_offload_checkpointing", gpu.cpu_offload_checkpointing, key="gpu.cpu_offload_checkpointing")
    if gpu.blocks_to_swap > 0:
        a.value("--blocks_to_swap", gpu.blocks_to_swap, key="gpu.blocks_to_swap")

    # Data: no colour or crop augmentation is used, so VAE latents can always be cached.
    a.value("--dataset_config", run_dir / DATASET_TOML)
    a.value("--caption_extension", run.dataset.caption_extension)
    if run.dataset.reg_path:  # the class images' loss weight (train_network.py multiplies each sample's loss by it)
        a.value("--prior_loss_weight", float(run.dataset.prior_loss_weight))
    a.switch("--cache_latents", True)
    a.switch("--cache_latents_to_disk", p.cache_latents_to_disk)
    caches_text = caches_text_encoder_outputs(run)
    a.switch("--cache_text_encoder_outputs", caches_text)
    a.switch("--cache_text_encoder_outputs_to_disk", caches_text and p.cache_text_encoder_outputs_to_disk)
    a.value("--max_data_loader_n_workers", p.max_data_loader_n_workers)
    # sd-scripts raises on persistent workers with 0 workers.
    a.switch("--persistent_data_loader_workers", p.max_data_loader_n_workers > 0)

    # Samples, checkpoints, state and logs, all inside the run directory.
    if has_sample_prompts(run):
        a.value("--sample_prompts", run_dir / SAMPLE_PROMPTS)
        a.value("--sample_every_n_steps", p.sample_every_n_steps)
    a.value("--output_dir", run_dir / "output" / resume.attempt_output if resume else run_dir / "output")
    a.value("--output_name", run.launch.output_name)
    a.value("--save_model_as", "safetensors")
    if p.save_every_n_steps > 0:
        a.value("--save_every_n_steps", p.save_every_n_steps)
    a.switch("--save_state", True)
    if run.launch.keep_last_states > 0 and p.save_every_n_steps > 0:
        # sd-scripts counts in steps, not states: a state older than this many steps before the newest is removed.
        a.value("--save_last_n_steps_state", (run.launch.keep_last_states - 1) * p.save_every_n_steps)
    a.value("--log_with", "tensorboard")
    a.value("--logging_dir", run_dir / "logs")

    if resume:
        # See sd_scripts_resume.py: never --skip_until_initial_step (wrong with accumulation > 1, #2407).
        a.value("--resume", resume.state_dir)
        a.value("--initial_step", 0)
        a.value("--log_prefix", resume.log_prefix)
    return a.tokens


def render_dataset_toml(run: RunConfig, subsets: list[tuple[Path, int, bool]] | None = None) -> str:
    """The `--dataset_config` TOML; every key is one sd-scripts' strict dataset schema accepts.

    `subsets` are (folder, num_repeats, is_reg) of the training set's view (sd_scripts_dataset.py); without one
    (a dry run without a dataset) the dataset folder itself is the one subset, and dataset.reg_path the class one.
    """
    p, ds = run.profile, run.dataset
    if subsets is None:
        subsets = [(Path(_absolute(ds.path)), ds.num_repeats, False)]
        if ds.reg_path:
            subsets.append((Path(_absolute(ds.reg_path)), ds.reg_repeats, True))
    general: dict[str, object] = {"caption_extension": ds.caption_extension, "shuffle_caption": p.shuffle_caption}
    if p.shuffle_caption:
        general["keep_tokens"] = 1  # captions start with the trigger: keep it in front when shuffling
    if p.caption_dropout_rate > 0:
        general["caption_dropout_rate"] = float(p.caption_dropout_rate)
    dataset = {
        "resolution": p.resolution,
        "enable_bucket": ds.enable_bucket,
        "min_bucket_reso": ds.min_bucket_reso,
        "max_bucket_reso": ds.max_bucket_reso,
        "bucket_reso_steps": ds.bucket_reso_steps,
        # Small photos are upscaled to their bucket (sd-scripts' default), so every step trains at profile.resolution.
        "bucket_no_upscale": False,
        "subsets": [
            {
                "image_dir": str(folder),
                "class_tokens": ds.class_tokens,
                "num_repeats": repeats,
                **({"is_reg": True} if is_reg else {}),
            }
            for folder, repeats, is_reg in subsets
        ],
    }
    return tomli_w.dumps({"general": general, "datasets": [dataset]})


def render_sample_prompts(run: RunConfig) -> str:
    """One line per prompt: text, size, fixed seed, steps and embedded guidance (sd-scripts' prompt options)."""
    size, steps = run.profile.resolution, run.profile.sample_steps
    lines = []
    for index, prompt in enumerate(run.dataset.sample_prompts):
        text = " ".join(prompt.text.split())
        # sd-scripts splits a line at " --" and skips lines starting with "#".
        if " --" in f" {text}" or text.startswith("#") or not text:
            raise ValueError(
                f"dataset.sample_prompts[{index}].text cannot be an sd-scripts prompt line: {prompt.text!r}"
            )
        lines.append(f"{text} --w {size} --h {size} --d {prompt.seed} --s {steps} --g {SAMPLE_GUIDANCE}")
    return "".join(line + "\n" for line in lines)


# ---------------------------------------------------------------- checking an argv


def split_flags(argv: list[str]) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """The argv as (flag, values) in order, and the tokens found before any flag."""
    groups: list[tuple[str, list[str]]] = []
    stray: list[str] = []
    for token in argv:
        if token.startswith("--"):
            groups.append((token, []))
        elif groups:
            groups[-1][1].append(token)
        else:
            stray.append(token)
    return groups, stray


def _convert(type_name: str | None, text: str) -> object:
    """The value argparse would store, or ValueError; `int_or_float` mirrors sd-scripts' train_util."""
    if type_name == "int":
        return int(text)
    if type_name == "float":
        return float(text)
    if type_name == "int_or_float":
        if text.endswith("%"):
            return float(text[:-1]) / 100.0
        return int(text) if float(text) >= 1 else float(text)
    return text  # str, Path and untyped options take any string


def _count_problem(flag: str, option: ReferenceOption, count: int) -> str | None:
    nargs = option.nargs
    if option.action == "store_true":
        return None if count == 0 else f"{flag}: a switch (store_true) given {count} value(s)"
    if nargs is None and count != 1:
        return f"{flag}: takes one value, given {count}"
    if nargs == "+" and count == 0:
        return f"{flag}: takes one or more values, given none"
    if nargs == "?" and count > 1:
        return f"{flag}: takes at most one value, given {count}"
    if isinstance(nargs, int) and count != nargs:
        return f"{flag}: takes {nargs} values, given {count}"
    return None


def check_args_against_reference(argv: list[str], options: dict[str, ReferenceOption] | None = None) -> list[str]:
    """Problems of an argv (script path excluded) against the pinned parser's option table."""
    options = options if options is not None else load_reference_options()
    groups, stray = split_flags(argv)
    problems = [f"{token!r}: a value before any flag" for token in stray]
    seen: set[str] = set()
    for flag, values in groups:
        option = options.get(flag)
        if option is None:
            problems.append(f"{flag}: not an option of flux_train_network.py at the pinned commit")
            continue
        if flag in seen:
            problems.append(f"{flag}: given more than once")
        seen.add(flag)
        count_problem = _count_problem(flag, option, len(values))
        if count_problem:
            problems.append(count_problem)
            continue
        for text in values:
            try:
                value = _convert(option.type, text)
            except ValueError:
                problems.append(f"{flag}: {text!r} is not a valid {option.type}")
                continue
            if option.choices is not None and value not in option.choices:
                allowed = [c for c in option.choices if c is not None]
                problems.append(f"{flag}: {text!r} is not one of {allowed}")
    return problems


@dataclass(frozen=True)
class PreflightVerdict:
    """What sd-scripts' own checks said: passed, failed (with the first problem) or skipped (and why)."""

    state: str
    problem: str | None = None
    steps: tuple[str, ...] = ()
    python: str | None = None

    def record(self) -> dict[str, object]:
        return {"state": self.state, "problem": self.problem, "steps": list(self.steps), "python": self.python}


def engine_preflight(
    argv: list[str], sd_scripts_dir: str | Path, python: str | None = None, timeout_s: float = 600.0
) -> PreflightVerdict:
    """Run sd-scripts' checks on the argv in the interpreter that will train (engine.python), in the checkout."""
    checkout = Path(sd_scripts_dir)
    interpreter = python or sys.executable
    if not (checkout / SCRIPT_NAME).is_file():
        return PreflightVerdict(
            "skipped", f"no {SCRIPT_NAME} in {checkout} (engine.sd_scripts_dir)", python=interpreter
        )
    command = [interpreter, str(PREFLIGHT_JOB), *argv]
    try:
        done = subprocess.run(command, cwd=checkout, capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError:
        return PreflightVerdict(
            "failed",
            f"engine.python={interpreter}: no such interpreter; set engine.python to sd-scripts' venv python",
            python=interpreter,
        )
    except subprocess.TimeoutExpired:
        return PreflightVerdict(
            "failed", f"sd-scripts checks at {checkout} did not finish in {timeout_s:.0f} s", python=interpreter
        )
    verdicts = [line[len(PREFLIGHT_MARKER) :] for line in done.stdout.splitlines() if line.startswith(PREFLIGHT_MARKER)]
    if not verdicts:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return PreflightVerdict(
            "failed",
            f"sd-scripts checks in {interpreter} ended without a verdict (exit {done.returncode}): {last}",
            python=interpreter,
        )
    data = json.loads(verdicts[-1])
    return PreflightVerdict(data["state"], data.get("problem"), tuple(data.get("steps", ())), python=interpreter)


# ---------------------------------------------------------------- checkout and version


def checkout_dir(run: RunConfig) -> Path | None:
    return Path(run.engine.sd_scripts_dir).expanduser().absolute() if run.engine.sd_scripts_dir else None


def has_checkout(run: RunConfig) -> bool:
    checkout = checkout_dir(run)
    return checkout is not None and (checkout / SCRIPT_NAME).is_file()


def checkout_commit(sd_scripts_dir: str | Path) -> str | None:
    """HEAD of the checkout; None unless the folder is the top of its own git repository."""
    command = ["git", "-C", str(sd_scripts_dir), "rev-parse", "--show-toplevel", "HEAD"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.split("\n")
    if done.returncode != 0 or len(lines) < 2:
        return None
    # A folder inside some other repository (a copied tree, a vendored stand-in) would report that repo's HEAD.
    if Path(lines[0]).resolve() != Path(sd_scripts_dir).resolve():
        return None
    return lines[1].strip() or None


def version_record(run: RunConfig) -> dict[str, object]:
    checkout = checkout_dir(run)
    commit = checkout_commit(checkout) if checkout is not None and checkout.is_dir() else None
    pinned = run.engine.pinned_commit
    return {
        "engine": "sd_scripts",
        "sd_scripts_dir": str(checkout) if checkout else None,
        "commit": commit,
        "pinned_commit": pinned,
        "matches_pin": None if commit is None or pinned is None else commit == pinned,
    }


def commit_warning(run: RunConfig) -> str | None:
    """A warning when the checkout is not at the pinned commit (flags and no-op facts were read there)."""
    if not has_checkout(run):
        return None
    record = version_record(run)
    if record["commit"] is None:
        return (
            f"sd-scripts checkout at {record['sd_scripts_dir']}: commit unknown (not a git checkout);"
            f" pinned is {record['pinned_commit']}"
        )
    if record["matches_pin"] is False:
        return (
            f"sd-scripts checkout at {record['sd_scripts_dir']} is at {record['commit']}, not the pinned"
            f" {record['pinned_commit']}; flags and FLUX no-op facts were checked at the pinned commit"
        )
    return None


def tokenizer_cache_problem(run: RunConfig) -> str | None:
    """sd-scripts asks the hub for CLIP-L's and T5's tokenizers unless both folders are in tokenizer_cache_dir."""
    cache = run.engine.tokenizer_cache_dir
    missing = [name for name in TOKENIZER_FOLDERS if not cache or not (Path(cache).expanduser() / name).is_dir()]
    if not missing:
        return None
    return (
        f"engine.tokenizer_cache_dir={cache or '(unset)'}: lacks {', '.join(missing)}, so sd-scripts downloads them "
        "from the Hugging Face hub (fails offline); copy both tokenizer folders there (README: Docker)"
    )


def is_offline() -> bool:
    return any(
        os.environ.get(name, "").lower() in ("1", "true", "yes") for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def missing_requirements(run: RunConfig) -> list[str]:
    missing: list[str] = []
    tokenizers = tokenizer_cache_problem(run)
    if tokenizers and is_offline():
        missing.append(tokenizers)
    if not has_checkout(run):
        where = run.engine.sd_scripts_dir or "(unset)"
        missing.append(
            f"engine.sd_scripts_dir: no sd-scripts checkout at {where};"
            " set SD_SCRIPTS_DIR or engine.sd_scripts_dir=/path/to/sd-scripts"
        )
    if run.model.kind != ModelKind.flux_dev:
        missing.append("engine=sd_scripts trains FLUX.1-dev weights; choose model=flux_dev")
        return missing
    for key in MODEL_FILE_KEYS:
        path = getattr(run.model, key)
        if not path:
            missing.append(
                f"model.{key}: not set; engine=sd_scripts needs the single-file weights; set model.{key}=..."
            )
        elif not Path(path).expanduser().is_file():
            missing.append(f"model.{key}: {path} not found; set model.{key}=... or paths.models=...")
    return missing


# ---------------------------------------------------------------- the engine


class SdScriptsEngine:
    name = "sd_scripts"

    def unapplied_options(self, run: RunConfig) -> dict[str, str]:
        return unapplied_flux_options(run)

    def missing_requirements(self, run: RunConfig) -> list[str]:
        return missing_requirements(run)

    def version_record(self, run: RunConfig) -> dict[str, object]:
        return version_record(run)

    def render(self, run: RunConfig, run_dir: Path, unapplied: dict[str, str]) -> EngineInputs:
        run_dir = Path(run_dir).absolute()
        checkout = checkout_dir(run)
        script = str((checkout or Path(UNSET_CHECKOUT)) / SCRIPT_NAME)
        subsets = None
        if (run_dir / TRAINING_SET_FILE).is_file():
            training_set = TrainingSet.read_json(run_dir / TRAINING_SET_FILE)
            view = build_dataset_view(training_set, Path(_absolute(run.paths.cache)), run.dataset.caption_extension)
            subsets = view_subsets(view, training_set)
        files = {DATASET_TOML: render_dataset_toml(run, subsets)}
        if has_sample_prompts(run):
            files[SAMPLE_PROMPTS] = render_sample_prompts(run)
        args = render_sd_scripts_args(run, run_dir, unapplied)
        return EngineInputs(script_argv=[script, *args], files=files, env={}, cwd=str(checkout or run_dir))

    def warnings(self, run: RunConfig) -> list[str]:
        found = [commit_warning(run)]
        if not is_offline():
            found.append(tokenizer_cache_problem(run))
        return [w for w in found if w]

    def check_inputs(self, run: RunConfig, inputs: EngineInputs) -> list[str]:
        """The argv against the pinned parser's option table, and a resume that sd-scripts cannot continue."""
        problems = check_args_against_reference(inputs.script_argv[1:])
        if run.launch.resume_from:
            problem = resume_problem(
                Path(_absolute(run.launch.resume_from)), run.profile.max_train_steps, run.profile.lr_scheduler.value
            )
            if problem:
                problems.append(problem)
        return problems

    def preflight(self, run: RunConfig, inputs: EngineInputs) -> dict[str, object]:
        """sd-scripts' own pre-training checks, in engine.python; recorded in run.json whatever the outcome."""
        checkout = checkout_dir(run)
        if checkout is None:
            return PreflightVerdict("skipped", "engine.sd_scripts_dir is not set").record()
        return engine_preflight(inputs.script_argv[1:], checkout, run.engine.python).record()

    def finish_attempt(self, run: RunConfig, run_dir: Path) -> list[str]:
        """After the job: a resumed attempt's files move into output/ under their true step numbers."""
        return adopt_resumed_outputs(Path(run_dir) / "output", run.launch.output_name)

    def pack_key(self, run_dir: Path) -> str | None:
        return None  # sd-scripts trains one network per process

    def sweep_pack_key(self, run: RunConfig) -> str | None:
        return None
