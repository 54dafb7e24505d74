"""Where each FLUX.1-dev file comes from on the Hugging Face Hub, and its pinned sha256.

The sha256 values are None: they could not be verified from the machine this was written on (no
access to the Hub), and a hash typed from memory would turn a good download into a refusal. Fill one
in from the file's page on the Hub ("Copy SHA256" / the LFS pointer's oid) after checking it; until
then `check --sha256` prints the computed hash and says it had nothing to compare it with.
"""

from __future__ import annotations

from dataclasses import dataclass

FLUX_DEV_REPO = "black-forest-labs/FLUX.1-dev"
TEXT_ENCODERS_REPO = "comfyanonymous/flux_text_encoders"


@dataclass(frozen=True)
class HubFile:
    repo_id: str
    filename: str
    gated: bool  # the licence must be accepted on the repo's page, and a token sent
    sha256: str | None
    revision: str = "main"  # no commit pinned: the repos' commits could not be looked up here


# By file name: the name the config gives a file (conf/model/flux_dev.yaml) picks its source.
HUB_FILES: dict[str, HubFile] = {
    f.filename: f
    for f in (
        HubFile(FLUX_DEV_REPO, "flux1-dev.safetensors", gated=True, sha256=None),
        HubFile(FLUX_DEV_REPO, "ae.safetensors", gated=True, sha256=None),
        HubFile(TEXT_ENCODERS_REPO, "clip_l.safetensors", gated=False, sha256=None),
        HubFile(TEXT_ENCODERS_REPO, "t5xxl_fp16.safetensors", gated=False, sha256=None),
        HubFile(TEXT_ENCODERS_REPO, "t5xxl_fp8_e4m3fn.safetensors", gated=False, sha256=None),
    )
}
