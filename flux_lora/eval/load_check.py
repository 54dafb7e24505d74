"""Does the exported LoRA load with diffusers' own FLUX loader, and does it change the model?

Every kohya module of the file goes through diffusers' kohya -> peft conversion
(`FluxLoraLoaderMixin.lora_state_dict`) one module at a time, so a key the converter drops or cannot
place is named; the result is loaded with `load_lora_adapter`, whose warnings (unexpected or missing
keys) are captured and fail the check. Last, the transformer's output at a fixed seed must move by more
than a stated share: a LoRA that loads and does nothing is the most common failure.

diffusers' converter hard-codes FLUX.1-dev's split of single-block `linear1` (3072 x 3 + 12288 rows);
for a transformer of another size (the tiny test model) those modules are split here, with the same
alpha scaling, by the transformer's own sizes. Everything else is diffusers' code.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin
from safetensors.torch import load_file

from flux_lora.engines.native import flow
from flux_lora.engines.native.lora import SINGLE_BLOCK_MODULES
from flux_lora.eval.lora_file import DIFFUSERS, lora_key_format

CHECK_ADAPTER = "flux_lora_load_check"
FLUX_DEV_LINEAR1_SPLIT = (3072, 3072, 3072, 12288)  # what diffusers' kohya converter assumes
_PROBE_LATENT_SIDE = 16  # latent pixels per side of the probe input (128 px image)
_PROBE_TEXT_TOKENS = 16
_PROBE_SEED = 0


def linear1_split(transformer) -> tuple[int, ...]:
    block = transformer.single_transformer_blocks[0]
    inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    return (inner, inner, inner, block.mlp_hidden_dim)


def _split_linear1(module: str, tensors: dict[str, torch.Tensor], split: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """diffusers' kohya linear1 conversion (down scaled by alpha/rank, copied to each target; up split by rows)
    for a transformer whose sizes are not FLUX.1-dev's."""
    index = int(module.removeprefix("lora_unet_single_blocks_").split("_")[0])
    down = tensors.pop(f"{module}.lora_down.weight")
    up = tensors.pop(f"{module}.lora_up.weight")
    alpha = float(tensors.pop(f"{module}.alpha", torch.tensor(float(down.shape[0]))))
    if tensors:
        raise ValueError(f"keys the converter does not read: {sorted(tensors)}")
    if up.shape[0] != sum(split):
        raise ValueError(f"lora_up has {up.shape[0]} rows, the transformer's linear1 has {sum(split)}")
    converted = {}
    for target, part in zip(SINGLE_BLOCK_MODULES["linear1"], torch.split(up, list(split), dim=0)):
        prefix = f"transformer.single_transformer_blocks.{index}.{target}"
        converted[f"{prefix}.lora_A.weight"] = down * (alpha / down.shape[0])
        converted[f"{prefix}.lora_B.weight"] = part
    return converted


def convert_module(module: str, tensors: dict[str, torch.Tensor], transformer) -> dict[str, torch.Tensor]:
    """One kohya module's tensors -> diffusers peft keys ("transformer.<module>.lora_A.weight", ...)."""
    split = linear1_split(transformer)
    if (
        module.startswith("lora_unet_single_blocks_")
        and module.endswith("_linear1")
        and split != FLUX_DEV_LINEAR1_SPLIT
    ):
        return _split_linear1(module, dict(tensors), split)
    return FluxLoraLoaderMixin.lora_state_dict(dict(tensors))


# Announcements about future API changes say nothing about this file.
_NOT_LOAD_PROBLEMS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage().strip())


@contextmanager
def captured_warnings() -> Iterator[list[str]]:
    """WARNING+ records of diffusers and peft, and Python warnings, as one list of messages."""
    records = _Records()
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft")]
    for logger in loggers:
        logger.addHandler(records)
    messages: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
    finally:
        for logger in loggers:
            logger.removeHandler(records)
        messages.extend(records.messages)
        messages.extend(str(w.message).strip() for w in caught if not issubclass(w.category, _NOT_LOAD_PROBLEMS))


@torch.no_grad()
def probe_output(transformer, conditioning: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The transformer's output for a fixed-seed input (sigma 0.5, guidance 3.5)."""
    param = next(transformer.parameters())
    device, dtype = param.device, param.dtype
    generator = torch.Generator().manual_seed(_PROBE_SEED)
    side = _PROBE_LATENT_SIDE
    latents = torch.randn(1, 16, side, side, generator=generator)
    if conditioning is None:
        pooled = torch.randn(transformer.config.pooled_projection_dim, generator=generator)
        t5 = torch.randn(_PROBE_TEXT_TOKENS, transformer.config.joint_attention_dim, generator=generator)
    else:
        pooled, t5 = conditioning
    return (
        transformer(
            hidden_states=flow.pack_latents(latents).to(device, dtype),
            encoder_hidden_states=t5[None].to(device, dtype),
            pooled_projections=pooled[None].to(device, dtype),
            timestep=torch.tensor([0.5], device=device, dtype=dtype),
            img_ids=flow.image_ids(side, side, device, dtype),
            txt_ids=flow.text_ids(t5.shape[0], device, dtype),
            guidance=torch.tensor([3.5], device=device, dtype=dtype),
            return_dict=False,
        )[0]
        .float()
        .cpu()
    )


def _group_by_module(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        modules.setdefault(key.split(".", 1)[0], {})[key] = value
    return modules


def _wrapped_modules(transformer) -> set[str]:
    return {
        name for name, module in transformer.named_modules() if CHECK_ADAPTER in (getattr(module, "lora_A", None) or {})
    }


def check_lora_loads(
    transformer, path: Path, min_output_change: float, conditioning: tuple[torch.Tensor, torch.Tensor] | None = None
) -> dict:
    """Load `path` into `transformer` (which must carry no LoRA) with diffusers, measure, and unload again."""
    if getattr(transformer, "peft_config", None):
        raise ValueError("check_lora_loads needs the base transformer without a LoRA; run it before attach_lora")
    tensors = load_file(str(path))
    unconsumed: list[str] = []
    converted: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    base = probe_output(transformer, conditioning)
    load_error: str | None = None
    with captured_warnings() as messages:
        if lora_key_format(path) == DIFFUSERS:  # diffusers' own key names: its loader reads the file as it is
            out = FluxLoraLoaderMixin.lora_state_dict(dict(tensors))
            converted = {k: v for k, v in out.items() if k.startswith("transformer.") and ".lora_" in k}
            unconsumed += [f"{k}: not a transformer LoRA weight" for k in sorted(out) if k not in converted]
            targets |= {k.removeprefix("transformer.").split(".lora_")[0] for k in converted}
        for module, module_tensors in ({} if converted else _group_by_module(tensors)).items():
            try:
                out = convert_module(module, module_tensors, transformer)
            except Exception as error:  # noqa: BLE001 - each failure is reported against its keys
                unconsumed += [
                    f"{k}: {type(error).__name__}: {str(error).strip()[:200]}" for k in sorted(module_tensors)
                ]
                continue
            loadable = {k: v for k, v in out.items() if k.startswith("transformer.") and ".lora_" in k}
            if not loadable or len(loadable) != len(out):
                reason = "diffusers' converter gives no transformer LoRA weight for it"
                unconsumed += [f"{k}: {reason}" for k in sorted(module_tensors)]
                continue
            converted.update(loadable)
            targets |= {k.removeprefix("transformer.").split(".lora_")[0] for k in loadable}
        try:
            transformer.load_lora_adapter(converted, prefix="transformer", adapter_name=CHECK_ADAPTER)
        except Exception as error:  # noqa: BLE001 - a load failure is the check's finding, not a crash
            load_error = f"{type(error).__name__}: {str(error).strip()[:300]}"
    try:
        wrapped = _wrapped_modules(transformer)
        change = None
        if load_error is None:
            with_lora = probe_output(transformer, conditioning)
            change = float((with_lora - base).abs().mean() / base.abs().mean().clamp_min(1e-12))
    finally:
        if getattr(transformer, "peft_config", None):
            transformer.unload_lora()
    not_applied = sorted(targets - wrapped)
    changed = change is not None and change > min_output_change
    return {
        "file": str(path),
        "loader": "diffusers FluxLoraLoaderMixin.lora_state_dict + FluxTransformer2DModel.load_lora_adapter",
        "linear1_split": (
            "diffusers"
            if linear1_split(transformer) == FLUX_DEV_LINEAR1_SPLIT
            else "flux_lora (model size differs from FLUX.1-dev)"
        ),
        "keys": len(tensors),
        "modules_loaded": len(wrapped),
        "unconsumed_keys": unconsumed,
        "modules_not_applied": not_applied,
        "warnings": messages,
        "error": load_error,
        "output_change": change,
        "min_output_change": min_output_change,
        "changes_output": changed,
        "passed": not unconsumed and not not_applied and not messages and load_error is None and changed,
    }
