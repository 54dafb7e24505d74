"""Secrets never leave the process: what is redacted (`***`) everywhere flux-lora writes or prints.

- the values of environment variables whose name says they are secret (HF_TOKEN, WANDB_API_KEY, PGPASSWORD...);
- URL user-info (`https://user:password@host/...`), wherever it appears (an HF_ENDPOINT mirror, a config value);
- query parameters that carry credentials (`?token=...`, `&sig=...`, `X-Amz-Signature=...`);
- strings shaped like well-known tokens (Hugging Face, GitHub, OpenAI-style, Slack, AWS access key ids).
The environment is recorded from an allow-list (what changes how a run trains or where it ran), never by
dropping what looks secret from everything else. Standard library only: the training job uses it too.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Mapping
from typing import TextIO

REDACTED = "***"
SECRET_NAME_MARKERS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH", "COOKIE", "SIGNATURE")
# Recorded in repro.json (values redacted all the same): what changes how a run trains, or where it ran.
RECORDED_ENV = (
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "CUDA_LAUNCH_BLOCKING",
    "CUBLAS_WORKSPACE_CONFIG",
    "NVIDIA_VISIBLE_DEVICES",
    "PYTORCH_CUDA_ALLOC_CONF",
    "TORCH_CUDNN_V8_API_ENABLED",
    "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "ACCELERATE_MIXED_PRECISION",
    "ACCELERATE_USE_CPU",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "HF_ENDPOINT",
    "HF_HUB_ENABLE_HF_TRANSFER",
    "SD_SCRIPTS_DIR",
    "SLURM_JOB_ID",
    "SLURM_ARRAY_JOB_ID",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_RESTART_COUNT",
    "SLURM_JOB_PARTITION",
    "SLURM_CPUS_PER_TASK",
    "SLURM_GPUS_ON_NODE",
    "SLURM_JOB_NUM_NODES",
)
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^\s/?#@\"'<>]+)@")
_CREDENTIAL_PARAM = re.compile(
    r"(?P<name>[?&;][\w.-]*(?:token|key|sig|signature|password|passwd|pwd|secret|auth|credential|session)[\w.-]*=)"
    r"(?P<value>[^&#\s\"'<>]+)",
    re.IGNORECASE,
)
_TOKEN_SHAPES = re.compile(
    r"\b(?:hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|sk-[A-Za-z0-9_-]{20,}"
    r"|xox[abpors]-[A-Za-z0-9-]{10,}|AKIA[0-9A-Z]{16})\b"
)
_MIN_SECRET_LENGTH = 6  # shorter values would over-match ordinary text


def is_secret_name(name: str) -> bool:
    upper = name.upper()
    return any(marker in upper for marker in SECRET_NAME_MARKERS)


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values to redact wherever they appear, longest first: secret-named variables, and the user-info and credential
    parameters inside any variable's value (HF_ENDPOINT=https://user:pass@mirror carries no secret name)."""
    env = os.environ if environ is None else environ
    found = {value for name, value in env.items() if is_secret_name(name)}
    for value in env.values():
        for match in _URL_USERINFO.finditer(value):  # user:password, and the password alone wherever it shows
            found |= {match["userinfo"], match["userinfo"].partition(":")[2]}
        found |= {m["value"] for m in _CREDENTIAL_PARAM.finditer(value)}
        found |= set(_TOKEN_SHAPES.findall(value))
    return sorted((v for v in found if len(v) >= _MIN_SECRET_LENGTH), key=len, reverse=True)


def redact(text: str, secrets: Iterable[str] | None = None) -> str:
    """The text with every secret replaced by ***: the given values (default: this environment's), then anything
    shaped like a credential."""
    for value in secret_values() if secrets is None else secrets:
        text = text.replace(value, REDACTED)
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    text = _CREDENTIAL_PARAM.sub(lambda m: f"{m['name']}{REDACTED}", text)
    return _TOKEN_SHAPES.sub(REDACTED, text)


def recorded_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The allow-listed environment, values redacted."""
    env = os.environ if environ is None else environ
    secrets = secret_values(env)
    return {
        name: redact(env[name], secrets) for name in sorted(RECORDED_ENV) if name in env and not is_secret_name(name)
    }


class RedactingStream(io.TextIOBase):
    """A text stream that redacts what is written to it before passing it on (the launcher's stdout and stderr)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.secrets = secret_values()

    def write(self, text: str) -> int:
        self.stream.write(redact(text, self.secrets))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", "utf-8")


def redact_terminal() -> None:
    """Pass this process's stdout and stderr through redaction (once)."""
    import sys

    if not isinstance(sys.stdout, RedactingStream):
        sys.stdout = RedactingStream(sys.stdout)
    if not isinstance(sys.stderr, RedactingStream):
        sys.stderr = RedactingStream(sys.stderr)
