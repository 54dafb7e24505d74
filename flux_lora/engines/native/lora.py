"""A FLUX LoRA trained with peft but shaped exactly like sd-scripts' `networks.lora_flux` (DiT only).

kohya fuses some projections into one Linear (double blocks: qkv; single blocks: qkv + mlp in
`linear1`) where diffusers keeps separate Linears. To make the trained LoRA exactly representable
in kohya's fused format, the separate diffusers Linears of one fused group share ONE lora_A
Parameter (kohya's `lora_down`), and kohya's `lora_up` is the row-wise concatenation of their lora_B's.
The diffusers <-> kohya mapping, fused row order included, is the one diffusers'
`_convert_kohya_flux_lora_to_diffusers` reads (ComfyUI and Forge read the same kohya keys).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import save_file

KOHYA_PREFIX = "lora_unet"
ADAPTER = "default"

# kohya module suffix -> diffusers Linears inside the block, in kohya's row order for fused groups.
# Modulation rows (shift, scale, gate, ...) are in the same order in both, so they map 1:1 without a swap.
DOUBLE_BLOCK_MODULES: dict[str, tuple[str, ...]] = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "txt_mod_lin": ("norm1_context.linear",),
}
SINGLE_BLOCK_MODULES: dict[str, tuple[str, ...]] = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}


def _lora_groups(transformer: FluxTransformer2DModel) -> dict[str, list[str]]:
    """kohya module name -> full diffusers module names of its (possibly fused) group."""
    groups = {}
    for index in range(transformer.config.num_layers):
        for suffix, members in DOUBLE_BLOCK_MODULES.items():
            groups[f"{KOHYA_PREFIX}_double_blocks_{index}_{suffix}"] = [
                f"transformer_blocks.{index}.{m}" for m in members
            ]
    for index in range(transformer.config.num_single_layers):
        for suffix, members in SINGLE_BLOCK_MODULES.items():
            groups[f"{KOHYA_PREFIX}_single_blocks_{index}_{suffix}"] = [
                f"single_transformer_blocks.{index}.{m}" for m in members
            ]
    return groups


def lora_module_names(transformer: FluxTransformer2DModel) -> list[str]:
    """The kohya module names, e.g. "lora_unet_double_blocks_0_img_attn_qkv" (304 for FLUX.1-dev)."""
    return list(_lora_groups(transformer))


class FusedDownDropout:
    """kohya's network_dropout: dropout on lora_down's output in training, ONE mask per fused module.

    The Linears of a fused group compute the same down output (shared weight, same input), so the first
    of them to run in a forward draws the mask and the others reuse it; a member that runs again starts a
    new forward and draws anew. Under non-reentrant gradient checkpointing the recomputation restores the
    RNG and calls the members in the same order, so it draws the same masks as the original forward.
    """

    def __init__(self, p: float, members: int) -> None:
        self.p, self.members = p, members
        self.mask: torch.Tensor | None = None
        self.used: set[int] = set()

    def __call__(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        mask = self.mask
        if mask is None or id(module) in self.used or mask.shape != output.shape or mask.dtype != output.dtype:
            mask = torch.empty_like(output).bernoulli_(1.0 - self.p)
            self.used = set()
        self.used.add(id(module))
        # Hold the mask only until every member has used it (a single Linear never holds it).
        self.mask = None if len(self.used) == self.members else mask
        return output * mask * (1.0 / (1.0 - self.p))


def add_flux_lora(
    transformer: FluxTransformer2DModel, rank: int, alpha: float, dropout: float | None, adapter: str = ADAPTER
) -> list[torch.nn.Parameter]:
    """Inject a kohya-shaped LoRA (scale alpha/rank) with peft as `adapter`; return its parameters, deduplicated.

    diffusers' add_adapter makes the new adapter the active one and freezes the others (peft's set_adapter):
    a packed job's adapters are trained one at a time (`use_adapter`), each with its parameters from here."""
    groups = _lora_groups(transformer)
    alpha = alpha or rank  # kohya: alpha 0/None means alpha = rank (scale 1)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=[name for members in groups.values() for name in members],
        lora_dropout=0.0,  # peft drops the input; kohya drops the down output (hook below)
        init_lora_weights=True,  # down kaiming-uniform, up zeros
        use_rslora=False,
    )
    with warnings.catch_warnings():  # a packed job's second adapter: several adapters in one model are the point
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        transformer.add_adapter(config, adapter_name=adapter)
    for members in groups.values():
        downs = [transformer.get_submodule(name).lora_A[adapter] for name in members]
        for down in downs[1:]:
            down.weight = downs[0].weight  # one kohya lora_down per fused group
        if dropout:
            hook = FusedDownDropout(dropout, len(downs))
            for down in downs:
                down.register_forward_hook(hook)
    params = list(adapter_parameters(transformer, adapter).values())
    for param in params:
        param.requires_grad_(True)
    return params


def adapter_parameters(transformer: torch.nn.Module, adapter: str) -> dict[str, torch.nn.Parameter]:
    """One adapter's parameters by name (a fused group's shared lora_A once), in the model's order."""
    marker = f".{adapter}."
    return {name: p for name, p in transformer.named_parameters() if "lora_" in name and marker in name}


def use_adapter(transformer: torch.nn.Module, adapter: str) -> None:
    """Make `adapter` the one the LoRA layers run (and the only one with gradients) until the next call."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in transformer.modules():
        if isinstance(module, BaseTunerLayer) and module.active_adapters != [adapter]:
            module.set_adapter(adapter)


def kohya_state_dict(transformer: FluxTransformer2DModel, adapter: str = ADAPTER) -> dict[str, torch.Tensor]:
    """The LoRA `adapter` in kohya's FLUX key format, float32 on CPU."""
    state = {}
    for kohya_name, members in _lora_groups(transformer).items():
        modules = [transformer.get_submodule(name) for name in members]
        first = modules[0]
        down = first.lora_A[adapter].weight
        up = torch.cat([m.lora_B[adapter].weight for m in modules], dim=0)
        state[f"{kohya_name}.lora_down.weight"] = down.detach().float().cpu().contiguous()
        state[f"{kohya_name}.lora_up.weight"] = up.detach().float().cpu().contiguous()
        state[f"{kohya_name}.alpha"] = torch.tensor(float(first.lora_alpha[adapter]))
    return state


def save_kohya_lora(
    transformer: FluxTransformer2DModel,
    path: Path,
    metadata: dict[str, str],
    dtype: torch.dtype = torch.bfloat16,
    adapter: str = ADAPTER,
) -> None:
    """Write the LoRA as a kohya `.safetensors` file (every tensor, `.alpha` included, in `dtype`)."""
    bad = [key for key, value in metadata.items() if not isinstance(value, str)]
    if bad:
        raise TypeError(f"safetensors metadata values must be str: {bad}")
    tensors = {key: value.to(dtype) for key, value in kohya_state_dict(transformer, adapter).items()}
    save_file(tensors, str(path), metadata=metadata)


def load_kohya_lora(transformer: FluxTransformer2DModel, path: Path, adapter: str = ADAPTER) -> dict[str, str]:
    """Load a kohya FLUX LoRA into a transformer prepared by `add_flux_lora` with the same rank.

    Shapes come from the transformer, so this works at any model size. A different alpha in the file is
    folded into the up weights, so the loaded LoRA computes the same delta. Returns the file's metadata.
    """
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    groups = _lora_groups(transformer)
    expected = {f"{name}.{part}" for name in groups for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    unexpected = sorted(set(tensors) - expected)
    missing = sorted(k for k in expected - set(tensors) if not k.endswith(".alpha"))
    if unexpected or missing:
        raise ValueError(
            f"{path}: not a DiT-only kohya FLUX LoRA for this transformer; "
            f"unexpected keys {unexpected[:5]}, missing keys {missing[:5]}"
        )
    with torch.no_grad():
        for kohya_name, members in groups.items():
            modules = [transformer.get_submodule(name) for name in members]
            rank = modules[0].r[adapter]
            model_alpha = float(modules[0].lora_alpha[adapter])
            down = tensors[f"{kohya_name}.lora_down.weight"]
            up = tensors[f"{kohya_name}.lora_up.weight"]
            file_alpha = float(tensors.get(f"{kohya_name}.alpha", torch.tensor(float(down.shape[0]))))
            if down.shape[0] != rank:
                raise ValueError(f"{path}: {kohya_name} has rank {down.shape[0]}, the transformer's LoRA has {rank}")
            if file_alpha != model_alpha:
                up = up.float() * (file_alpha / model_alpha)
            ups = torch.split(up, [m.lora_B[adapter].out_features for m in modules], dim=0)
            # lora_A is shared within the group, so copying into the first sets all of them.
            modules[0].lora_A[adapter].weight.copy_(down)
            for module, part in zip(modules, ups):
                module.lora_B[adapter].weight.copy_(part)
    return metadata
