"""The peft-trained LoRA is exactly a kohya FLUX LoRA: names, shapes, tied downs, scale, dropout, file round trip."""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
from safetensors import safe_open

from flux_lora.engines.native.lora import (
    KOHYA_PREFIX,
    add_flux_lora,
    kohya_state_dict,
    load_kohya_lora,
    lora_module_names,
    save_kohya_lora,
)
from flux_lora.engines.native.models import build_tiny_flux

RANK = 4


def inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, 16, 64, generator=generator),  # 32x32 px: 4x4 latents packed 2x2
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=generator),
        "pooled_projections": torch.randn(1, 32, generator=generator),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([1.0]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(8, 3),
        "return_dict": False,
    }


def forward(transformer, seed: int = 0) -> torch.Tensor:
    return transformer(**inputs(seed))[0]


def randomize_lora(transformer, seed: int = 1) -> None:
    # lora_up starts at zero; give every LoRA weight a value so comparisons mean something.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def lora_transformer(alpha: float = 2.0, dropout: float | None = None, seed: int = 0):
    transformer = build_tiny_flux(init_seed=seed).transformer
    params = add_flux_lora(transformer, rank=RANK, alpha=alpha, dropout=dropout)
    return transformer, params


def test_module_names_keys_and_shapes_match_sd_scripts():
    transformer, params = lora_transformer()
    config = transformer.config
    names = lora_module_names(transformer)
    assert len(names) == 2 * 5 * config.num_layers + 3 * config.num_single_layers
    assert "lora_unet_double_blocks_0_img_attn_qkv" in names
    assert "lora_unet_single_blocks_1_modulation_lin" in names
    inner = config.num_attention_heads * config.attention_head_dim
    state = kohya_state_dict(transformer)
    assert set(state) == {f"{n}.{p}" for n in names for p in ("lora_down.weight", "lora_up.weight", "alpha")}
    expected_out = {
        "img_attn_qkv": 3 * inner,
        "txt_attn_qkv": 3 * inner,
        "img_attn_proj": inner,
        "txt_attn_proj": inner,
        "img_mlp_0": 4 * inner,
        "txt_mlp_0": 4 * inner,
        "img_mlp_2": inner,
        "txt_mlp_2": inner,
        "img_mod_lin": 6 * inner,
        "txt_mod_lin": 6 * inner,
        "linear1": 3 * inner + 4 * inner,
        "linear2": inner,
        "modulation_lin": 3 * inner,
    }
    expected_in = {"img_mlp_2": 4 * inner, "txt_mlp_2": 4 * inner, "linear2": inner + 4 * inner}
    for name in names:
        assert name.startswith(KOHYA_PREFIX + "_")
        kind = next(k for k in expected_out if name.endswith("_" + k))
        assert state[f"{name}.lora_down.weight"].shape == (RANK, expected_in.get(kind, inner))
        assert state[f"{name}.lora_up.weight"].shape == (expected_out[kind], RANK)
        assert state[f"{name}.alpha"].shape == () and state[f"{name}.alpha"].item() == 2.0
        assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in state.values())
    assert len(params) == len({id(p) for p in params})
    assert all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in transformer.named_parameters() if "lora_" not in n)


def test_fused_groups_share_one_down_after_an_optimizer_step():
    transformer, params = lora_transformer()
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    transformer.train()
    for _ in range(2):
        forward(transformer).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    block = transformer.transformer_blocks[1].attn
    assert block.to_q.lora_A["default"].weight is block.to_k.lora_A["default"].weight
    assert block.add_q_proj.lora_A["default"].weight is block.add_v_proj.lora_A["default"].weight
    single = transformer.single_transformer_blocks[0]
    assert single.proj_mlp.lora_A["default"].weight is single.attn.to_q.lora_A["default"].weight
    assert torch.count_nonzero(block.to_q.lora_B["default"].weight) > 0  # it trained
    assert single.proj_mlp.lora_A["default"].weight is not single.proj_out.lora_A["default"].weight


def test_save_then_load_into_fresh_transformer_reproduces_output(tmp_path):
    trained, _ = lora_transformer(seed=5)
    randomize_lora(trained)
    trained.eval()
    path = tmp_path / "identity.safetensors"
    save_kohya_lora(trained, path, {"ss_network_dim": str(RANK)}, dtype=torch.float32)
    fresh, _ = lora_transformer(seed=5)
    fresh.eval()
    assert not torch.equal(forward(fresh), forward(trained))
    assert load_kohya_lora(fresh, path)["ss_network_dim"] == str(RANK)
    assert torch.equal(forward(fresh), forward(trained))
    shared = fresh.transformer_blocks[0].attn
    assert shared.to_q.lora_A["default"].weight is shared.to_v.lora_A["default"].weight


def test_default_save_is_bf16_with_string_metadata(tmp_path):
    transformer, _ = lora_transformer()
    path = tmp_path / "lora.safetensors"
    save_kohya_lora(transformer, path, {"modelspec.architecture": "flux-1-dev/lora"})
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"modelspec.architecture": "flux-1-dev/lora"}
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.bfloat16}
    with pytest.raises(TypeError):
        save_kohya_lora(transformer, path, {"ss_network_dim": RANK})


def test_load_refuses_a_different_rank(tmp_path):
    transformer, _ = lora_transformer()
    path = tmp_path / "lora.safetensors"
    save_kohya_lora(transformer, path, {})
    other = build_tiny_flux().transformer
    add_flux_lora(other, rank=RANK * 2, alpha=1.0, dropout=None)
    with pytest.raises(ValueError, match="rank"):
        load_kohya_lora(other, path)


def test_scale_is_alpha_over_rank():
    base = forward(build_tiny_flux().transformer.eval())
    deltas = {}
    for alpha in (1.0, float(RANK)):
        transformer, _ = lora_transformer(alpha=alpha)
        randomize_lora(transformer)
        block = transformer.transformer_blocks[0].attn.to_out[0]
        assert block.scaling["default"] == alpha / RANK
        x = torch.randn(3, block.in_features, generator=torch.Generator().manual_seed(0))
        deltas[alpha] = block(x) - block.base_layer(x)
        assert not torch.equal(forward(transformer.eval()), base)
    torch.testing.assert_close(deltas[float(RANK)], deltas[1.0] * RANK)


def test_network_dropout_acts_on_down_output_in_train_mode_only():
    transformer, _ = lora_transformer(dropout=0.5)
    randomize_lora(transformer)
    layer = transformer.single_transformer_blocks[0].proj_out
    x = torch.randn(64, layer.in_features, generator=torch.Generator().manual_seed(0))
    down = layer.lora_A["default"]
    transformer.eval()
    assert torch.equal(layer(x), layer(x))
    assert torch.count_nonzero(down(x)) == down(x).numel()
    transformer.train()
    torch.manual_seed(0)
    assert not torch.equal(layer(x), layer(x))
    # kohya drops entries of the rank-sized down output (and rescales the rest), not of the input.
    dropped, clean = down(x), x @ down.weight.T
    kept = dropped != 0
    assert 0.3 < kept.float().mean() < 0.7
    torch.testing.assert_close(dropped[kept], clean[kept] * 2)


def test_diffusers_kohya_converter_reads_every_key_we_write():
    transformer, _ = lora_transformer(alpha=2.0)
    randomize_lora(transformer)
    state = kohya_state_dict(transformer)
    # diffusers splits single-block linear1 at FLUX.1-dev's sizes (3072 x3, 12288): place each of our
    # row blocks at the start of its FLUX.1-dev-sized slot so the converter runs and shows the row order.
    inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    ours = [inner, inner, inner, 4 * inner]
    flux = [3072, 3072, 3072, 12288]
    for name in [k for k in state if k.endswith("linear1.lora_up.weight")]:
        padded = torch.zeros(sum(flux), RANK)
        for part, start in zip(torch.split(state[name], ours), [0, 3072, 6144, 9216]):
            padded[start : start + part.shape[0]] = part
        state[name] = padded
    converted = _convert_kohya_flux_lora_to_diffusers(dict(state))  # raises on any key it does not read

    scale = 2.0 / RANK
    for name, module in transformer.named_modules():
        if not hasattr(module, "lora_A"):
            continue
        a = converted[f"transformer.{name}.lora_A.weight"]
        b = converted[f"transformer.{name}.lora_B.weight"][: module.out_features]
        want = scale * module.lora_B["default"].weight @ module.lora_A["default"].weight
        torch.testing.assert_close(b @ a, want)
    assert len([k for k in converted if k.endswith("lora_A.weight")]) == len(
        [m for m in transformer.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    )


def _down_outputs(transformer, module_names: list[str]) -> dict[str, list[torch.Tensor]]:
    """Every call's lora_down output (after dropout) of the named Linears, in call order."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in module_names}
    for name in module_names:
        down = transformer.get_submodule(name).lora_A["default"]
        # Registered after the dropout hook, so it sees the dropped output.
        down.register_forward_hook(lambda module, inputs, output, name=name: seen[name].append(output.detach().clone()))
    return seen


def test_network_dropout_draws_one_mask_per_fused_module():
    transformer, _ = lora_transformer(dropout=0.5)
    randomize_lora(transformer)
    groups = {
        "img_attn_qkv": [f"transformer_blocks.0.attn.{m}" for m in ("to_q", "to_k", "to_v")],
        "txt_attn_qkv": [f"transformer_blocks.0.attn.{m}" for m in ("add_q_proj", "add_k_proj", "add_v_proj")],
        "linear1": [f"single_transformer_blocks.0.{m}" for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")],
    }
    seen = _down_outputs(transformer, [name for members in groups.values() for name in members])
    transformer.train()
    torch.manual_seed(0)
    forward(transformer)
    forward(transformer)
    for kohya_name, members in groups.items():
        for call in range(2):
            kept = [seen[name][call] != 0 for name in members]
            assert 0.3 < kept[0].float().mean() < 0.7, kohya_name
            # The members compute the same down output, so one mask means the very same values.
            assert all(torch.equal(seen[name][call], seen[members[0]][call]) for name in members), kohya_name
        assert not torch.equal(seen[members[0]][0] != 0, seen[members[0]][1] != 0)  # a new mask per forward


def test_gradient_checkpointing_recomputes_the_same_dropout_masks():
    grads = []
    for checkpointing in (False, True):
        transformer, params = lora_transformer(dropout=0.5)
        randomize_lora(transformer)
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        transformer.train()
        torch.manual_seed(0)
        forward(transformer).pow(2).mean().backward()
        grads.append([p.grad.clone() for p in params])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain)


def test_alpha_zero_means_alpha_equals_rank():
    transformer, _ = lora_transformer(alpha=0.0)
    assert transformer.transformer_blocks[0].attn.to_q.scaling["default"] == 1.0
    assert kohya_state_dict(transformer)["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == RANK
