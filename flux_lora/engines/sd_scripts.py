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
import logging
import subprocess
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Optional

import tomli_w

from flux_lora.engines.base import EngineInputs
from flux_lora.schema import LrScheduler, ModelKind, OptimizerName, RunConfig

log = logging.getLogger(__name__)

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
# Exit status of the parse-with-checkout child when sd-scripts (or its dependencies) cannot be imported.
NOT_IMPORTABLE_EXIT = 86
_PARSE_WITH_CHECKOUT_CODE = f"""
import sys
sys.argv[0] = "flux_train_network.py"  # argparse names the program after it in its messages
sys.path.insert(0, ".")
try:
    import flux_train_network
except Exception as error:
    print(f"flux_train_network not importable: {{error!r}}", file=sys.stderr)
    sys.exit({NOT_IMPORTABLE_EXIT})
flux_train_network.setup_parser().parse_args(sys.argv[1:])
"""


@dataclass(frozen=True)
class ReferenceOption:
    """One option of the pinned parser, as recorded in the reference JSON."""

    flag: str
    type: Optional[str]  # "int", "float", "str", "Path", "int_or_float" or None (a string)
    choices: Optional[list]
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


def reference_commit(path: Path = REFERENCE_JSON) -> str:
    return json.loads(path.read_text(encoding="utf-8"))["commit"]


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

    def value(self, flag: str, *values: object, key: Optional[str] = None) -> None:
        if key not in self._unapplied:
            self.tokens += [flag, *(_text(v) for v in values)]

    def switch(self, flag: str, on: bool, key: Optional[str] = None) -> None:
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


def render_sd_scripts_args(run: RunConfig, run_dir: Path, unapplied: dict[str, str]) -> list[str]:
    """The arguments of flux_train_network.py (without the script path) for a frozen run."""
    p, gpu, model, engine = run.profile, run.gpu, run.model, run.engine
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
    a.value("--network_alpha", float(p.network_alpha))
    if p.network_dropout is not None:
        a.value("--network_dropout", float(p.network_dropout), key="profile.network_dropout")
    a.switch("--network_train_unet_only", p.network_train_unet_only)

    # Optimizer and schedule; --max_train_steps counts optimizer steps (after accumulation).
    a.value("--optimizer_type", OPTIMIZER_TYPES[run.optimizer.name])
    a.value("--optimizer_args", *optimizer_args(run))
    a.value("--learning_rate", float(p.learning_rate))
    a.value("--lr_scheduler", p.lr_scheduler)
    a.value("--lr_warmup_steps", p.lr_warmup_steps)
    if p.lr_scheduler == LrScheduler.cosine_with_restarts:
        a.value("--lr_scheduler_num_cycles", p.lr_scheduler_num_cycles)
    a.value("--max_train_steps", p.max_train_steps)
    a.value("--gradient_accumulation_steps", gpu.gradient_accumulation_steps)
    # Batch size lives here, not in dataset.toml: datasets fall back to it (config_util.py), and
    # train_network.py:985,1183 read only this flag for the logged total batch and ss_batch_size_per_device.
    a.value("--train_batch_size", gpu.batch_size)
    a.value("--max_grad_norm", float(p.max_grad_norm))
    a.value("--seed", p.seed)

    # Loss and flow-matching recipe.
    a.value("--loss_type", p.loss_type)
    a.value("--huber_schedule", p.huber_schedule)
    a.value("--guidance_scale", float(p.guidance_scale))
    a.value("--timestep_sampling", p.timestep_sampling)
    a.value("--sigmoid_scale", float(p.sigmoid_scale))
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
    a.value("--output_dir", run_dir / "output")
    a.value("--output_name", run.launch.output_name)
    a.value("--save_model_as", "safetensors")
    if p.save_every_n_steps > 0:
        a.value("--save_every_n_steps", p.save_every_n_steps)
    a.switch("--save_state", True)
    a.value("--log_with", "tensorboard")
    a.value("--logging_dir", run_dir / "logs")

    if run.launch.resume_from:
        a.value("--resume", _absolute(run.launch.resume_from))
        # Without it global_step restarts at 0: step-named checkpoints and logs restart (issues #1999, #2171).
        a.switch("--skip_until_initial_step", True)
    return a.tokens


def render_dataset_toml(run: RunConfig) -> str:
    """The `--dataset_config` TOML; every key is one sd-scripts' strict dataset schema accepts."""
    p, ds = run.profile, run.dataset
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
        "subsets": [{"image_dir": _absolute(ds.path), "class_tokens": ds.class_tokens, "num_repeats": ds.num_repeats}],
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


def _convert(type_name: Optional[str], text: str) -> object:
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


def _count_problem(flag: str, option: ReferenceOption, count: int) -> Optional[str]:
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


def check_args_against_reference(
    argv: list[str], options: Optional[dict[str, ReferenceOption]] = None
) -> list[str]:
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


def parse_with_checkout(argv: list[str], sd_scripts_dir: str | Path, timeout_s: float = 300.0) -> list[str]:
    """Parse the argv with the checkout's own parser in a child process; [] if it parses or cannot be imported."""
    checkout = Path(sd_scripts_dir)
    if not (checkout / SCRIPT_NAME).is_file():
        return []
    command = [sys.executable, "-c", _PARSE_WITH_CHECKOUT_CODE, *argv]
    try:
        done = subprocess.run(command, cwd=checkout, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return [f"sd-scripts parser at {checkout} did not finish in {timeout_s:.0f} s"]
    if done.returncode == NOT_IMPORTABLE_EXIT:
        log.info("skipped parsing with the sd-scripts checkout: %s", done.stderr.strip().splitlines()[-1:])
        return []
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if "error:" in line] or done.stderr.splitlines()[-3:]
        return [f"sd-scripts parser at {checkout}: {line.strip()}" for line in errors]
    return []


# ---------------------------------------------------------------- checkout and version


def checkout_dir(run: RunConfig) -> Optional[Path]:
    return Path(run.engine.sd_scripts_dir).expanduser().absolute() if run.engine.sd_scripts_dir else None


def has_checkout(run: RunConfig) -> bool:
    checkout = checkout_dir(run)
    return checkout is not None and (checkout / SCRIPT_NAME).is_file()


def checkout_commit(sd_scripts_dir: str | Path) -> Optional[str]:
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


def commit_warning(run: RunConfig) -> Optional[str]:
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


def missing_requirements(run: RunConfig) -> list[str]:
    missing: list[str] = []
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
        files = {DATASET_TOML: render_dataset_toml(run)}
        if has_sample_prompts(run):
            files[SAMPLE_PROMPTS] = render_sample_prompts(run)
        args = render_sd_scripts_args(run, run_dir, unapplied)
        return EngineInputs(script_argv=[script, *args], files=files, env={}, cwd=str(checkout or run_dir))

    def warnings(self, run: RunConfig) -> list[str]:
        warning = commit_warning(run)
        return [warning] if warning else []

    def check_inputs(self, run: RunConfig, inputs: EngineInputs) -> list[str]:
        """Checks before launch: the reference option table always, the checkout's real parser when importable."""
        args = inputs.script_argv[1:]
        problems = check_args_against_reference(args)
        checkout = checkout_dir(run)
        if not problems and checkout is not None:
            problems = parse_with_checkout(args, checkout)
        return problems
