"""Download the FLUX.1-dev files with huggingface_hub into the folder the config names, then check them.

A file that already passes the header check is kept (`force` downloads it anyway). The token is
huggingface_hub's own lookup (HF_TOKEN, else a stored `hf auth login`); it is never printed or recorded.
huggingface_hub shows its own progress bar and, within one run, resumes a broken transfer with HTTP
Range requests; a file whose run was killed starts again from zero (this version removes partial files).
"""

from __future__ import annotations

import os
from pathlib import Path

from flux_lora.models.layout import FLUX_DEV, ModelLayout
from flux_lora.models.sources import HUB_FILES, HubFile
from flux_lora.models.verify import FileVerdict, verify_file


def _hub_page(hub: HubFile, endpoint: str | None) -> str:
    from huggingface_hub import constants

    return f"{(endpoint or constants.ENDPOINT).rstrip('/')}/{hub.repo_id}"


def _download_problem(exc: Exception, hub: HubFile, endpoint: str | None, has_token: bool) -> str:
    """One line for what went wrong talking to the Hub (never the token, never a traceback)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
    )

    status = getattr(getattr(exc, "response", None), "status_code", None)
    page = _hub_page(hub, endpoint)
    if isinstance(exc, RemoteEntryNotFoundError):
        return f"{hub.repo_id} has no {hub.filename} at revision {hub.revision}; download it by hand from {page}"
    if (
        isinstance(exc, GatedRepoError)
        or (hub.gated and status in (401, 403))
        or (hub.gated and isinstance(exc, RepositoryNotFoundError))
    ):
        if not has_token:
            return (
                f"{hub.repo_id} is gated: set HF_TOKEN to a Hugging Face access token and accept the licence at "
                f"{page}, then run fetch again"
            )
        return f"{hub.repo_id} refused HF_TOKEN: accept the licence at {page} with that token's account (and give the token read access), then run fetch again"
    if isinstance(exc, RepositoryNotFoundError):
        return f"{hub.repo_id} not found on {endpoint or 'the Hub'} (status {status}); check HF_ENDPOINT and the repository"
    if isinstance(exc, LocalEntryNotFoundError):
        cause = exc.__cause__ or exc
        return f"cannot reach {page} ({type(cause).__name__}); check the network or HF_ENDPOINT, then run fetch again"
    if isinstance(exc, HfHubHTTPError):
        return f"{page} answered HTTP {status}; run fetch again later"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"download of {hub.filename} failed ({first}); run fetch again"


def fetch_model_files(
    files: dict[str, Path],
    *,
    layout: ModelLayout = FLUX_DEV,
    fp8_base: bool = False,
    force: bool = False,
    endpoint: str | None = None,
    token: str | None = None,
) -> list[FileVerdict]:
    """Download each of `files` (config key -> path; the name picks the source) unless it already passes
    the check, then check it. One verdict per file; a download problem is the verdict's problem."""
    from huggingface_hub import constants, hf_hub_download

    if constants.HF_HUB_OFFLINE:
        return [
            FileVerdict(key, path, "not downloaded: HF_HUB_OFFLINE is set; unset it to fetch")
            for key, path in files.items()
        ]
    token = token if token is not None else (os.environ.get("HF_TOKEN") or None)
    verdicts = []
    for key, path in files.items():
        hub = HUB_FILES.get(path.name)
        if hub is None:
            known = ", ".join(sorted(HUB_FILES))
            verdicts.append(
                FileVerdict(key, path, f"has no known download under the name {path.name}; name it one of {known}")
            )
            continue
        if not force and path.is_file():
            present = verify_file(key, path, layout=layout, fp8_base=fp8_base)
            if present.problem is None:
                verdicts.append(present)
                continue
        print(f"fetching model.{key}: {hub.repo_id}/{hub.filename} -> {path}", flush=True)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # A file here failed the check: huggingface_hub would trust its own record of the earlier download.
            hf_hub_download(
                hub.repo_id,
                hub.filename,
                revision=hub.revision,
                local_dir=path.parent,
                token=token,
                endpoint=endpoint,
                force_download=force or path.exists(),
            )
        except Exception as exc:  # noqa: BLE001 - every Hub or disk failure becomes the file's one line
            verdicts.append(FileVerdict(key, path, _download_problem(exc, hub, endpoint, has_token=bool(token))))
            continue
        verdicts.append(verify_file(key, path, layout=layout, fp8_base=fp8_base))
    return verdicts
