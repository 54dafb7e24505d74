"""Composition of conf/: every option composes, keys have one owner, ablations change what they declare."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from flux_lora.compose import CONF_DIR, describe_config_error, resolved_container
from flux_lora.identity import config_leaves
from flux_lora.schema import OWNER_GROUPS
from tests.conftest import compose_config

GROUPS = ("profile", "gpu", "optimizer", "engine", "model", "dataset", "ablation", "sweep")
ABLATION_CELLS = (
    "a1_alpha",
    "a2_noise_offset",
    "a3_grad_accum",
    "a4_adafactor",
    "a5_fp8_base",
    "a6_min_snr",
    "a7_dropout",
)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


leaves = config_leaves


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes(group: str) -> None:
    assert options(group), f"conf/{group} has no options"
    for option in options(group):
        extra = ["engine=sd_scripts", "model=flux_dev"] if group == "engine" and option == "sd_scripts" else []
        cfg = compose_config([f"{group}={option}", *extra])
        resolved = resolved_container(cfg)
        assert resolved["name"]


def test_default_is_the_embedded_default() -> None:
    cfg = resolved_container(compose_config())
    assert (cfg["model"]["kind"], cfg["engine"]["name"], cfg["gpu"]["name"], cfg["dataset"]["name"]) == (
        "tiny",
        "native",
        "cpu",
        "sample",
    )
    assert Path(cfg["dataset"]["path"]).is_absolute()
    assert cfg["name"] == "tiny-smoke-cpu-native"


def _file_keys(path: Path) -> tuple[str | None, dict[str, Any]]:
    text = path.read_text()
    package = "_global_" if "# @package _global_" in text else None
    data = yaml.safe_load(text) or {}
    data.pop("defaults", None)
    return package, leaves(data)


def test_each_key_has_one_owner_group() -> None:
    owner_of: dict[str, str] = {}
    for section, group in OWNER_GROUPS.items():
        for path in (CONF_DIR / group).glob("*.yaml"):
            package, keys = _file_keys(path)
            assert package is None, f"{path}: an owner group file must not write outside its own section"
            for key in keys:
                dotted = f"{section}.{key}"
                assert owner_of.setdefault(dotted, group) == group, f"{dotted} set by {owner_of[dotted]} and {group}"
    # The primary config only names the run and sets paths and Hydra; it sets no owned key.
    _, primary = _file_keys(CONF_DIR / "config.yaml")
    assert not [k for k in primary if k.split(".")[0] in OWNER_GROUPS]


def test_ablation_files_set_only_declared_keys() -> None:
    for path in (CONF_DIR / "ablation").glob("*.yaml"):
        if path.stem == "baseline":
            continue
        _, keys = _file_keys(path)
        declared = yaml.safe_load(path.read_text())["ablation"]["changes"]
        for key in keys:
            if key.startswith("ablation."):
                continue
            assert any(key == d or key.startswith(d + ".") for d in declared), f"{path.name} sets undeclared {key}"


def _diff(a: dict[str, Any], b: dict[str, Any]) -> set[str]:
    la, lb = leaves(a), leaves(b)
    return {k for k in la.keys() | lb.keys() if la.get(k) != lb.get(k) and not k.startswith(("ablation.", "name"))}


def _covered(diff: set[str], declared: list[str]) -> bool:
    return all(any(k == d or k.startswith(d + ".") for d in declared) for k in diff)


@pytest.mark.parametrize("profile", ["fast", "final", "smoke"])
def test_ablation_cells_differ_from_baseline_in_exactly_their_declared_keys(profile: str) -> None:
    base = resolved_container(compose_config([f"profile={profile}", "ablation=baseline"]))
    union: list[str] = []
    for cell in ABLATION_CELLS:
        cfg = resolved_container(compose_config([f"profile={profile}", f"ablation={cell}"]))
        declared = cfg["ablation"]["changes"]
        diff = _diff(base, cfg)
        assert diff, f"{cell} does not differ from baseline"
        assert _covered(diff, declared), f"{cell} changes {diff}, declares {declared}"
        for d in declared:  # every declared key really changes
            assert any(k == d or k.startswith(d + ".") for k in diff), (
                f"{cell} declares {d} but leaves it as in baseline"
            )
        union += declared
    a8 = resolved_container(compose_config([f"profile={profile}", "ablation=a8_all"]))
    assert sorted(a8["ablation"]["changes"]) == sorted(union)
    a8_diff = _diff(base, a8)
    assert _covered(a8_diff, union)
    assert all(any(k == d or k.startswith(d + ".") for k in a8_diff) for d in union)


def test_baseline_is_the_old_defaults() -> None:
    cfg = resolved_container(compose_config(["profile=fast", "ablation=baseline"]))
    assert cfg["profile"]["network_alpha"] == 1
    assert cfg["profile"]["max_train_steps"] == 500
    assert cfg["gpu"]["gradient_accumulation_steps"] == 1
    assert cfg["optimizer"]["name"] == "adamw8bit"
    assert (cfg["profile"]["noise_offset"], cfg["profile"]["min_snr_gamma"], cfg["profile"]["network_dropout"]) == (
        0.0,
        None,
        None,
    )
    assert cfg["gpu"]["fp8_base"] is False


def test_profiles_match_the_original_recipe() -> None:
    fast = resolved_container(compose_config(["profile=fast"]))["profile"]
    final = resolved_container(compose_config(["profile=final"]))["profile"]
    assert (fast["resolution"], fast["max_train_steps"], fast["network_dim"], fast["network_alpha"]) == (
        512,
        1500,
        32,
        32,
    )
    assert (fast["lr_scheduler"], fast["lr_warmup_steps"], fast["noise_offset"]) == ("constant_with_warmup", 100, 0.05)
    assert (final["resolution"], final["max_train_steps"], final["network_dim"], final["network_alpha"]) == (
        768,
        2500,
        64,
        64,
    )
    assert (final["lr_scheduler"], final["lr_warmup_steps"], final["noise_offset"]) == (
        "cosine_with_restarts",
        500,
        0.1,
    )
    assert (final["network_dropout"], final["min_snr_gamma"]) == (0.1, 5.0)
    for p in (fast, final):
        assert (p["guidance_scale"], p["timestep_sampling"], p["model_prediction_type"], p["discrete_flow_shift"]) == (
            1.0,
            "flux_shift",
            "raw",
            1.0,
        )
        assert (p["mixed_precision"], p["seed"], p["save_every_n_steps"], p["sample_every_n_steps"]) == (
            "bf16",
            42,
            500,
            250,
        )


def test_sample_prompts_carry_trigger_and_fixed_seeds() -> None:
    prompts = resolved_container(compose_config())["dataset"]["sample_prompts"]
    assert len(prompts) == 5
    assert all(p["text"].startswith("TOK Woman") for p in prompts)
    assert len({p["seed"] for p in prompts}) == 5


def test_ablation_sweep_sets_multirun_over_nine_cells() -> None:
    hydra_cfg = compose_config(["sweep=ablation"], with_hydra=True).hydra
    assert hydra_cfg.mode.name == "MULTIRUN"
    cells = hydra_cfg.sweeper.params["ablation"].split(",")
    assert cells == ["baseline", *ABLATION_CELLS, "a8_all"]
    assert set(cells) <= set(options("ablation"))


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("profile.resolutoin=512", "profile.resolutoin: unknown key"),
        ("profile.resolution=abc", "profile.resolution: wrong value"),
        ("profile.lr_scheduler=cosinus", "profile.lr_scheduler: wrong value"),
        ("gpu=rtx5090", "gpu=rtx5090: no such option in conf/gpu/; choose one of: a6000, cpu, h100, h200, rtx4090"),
    ],
)
def test_config_errors_become_one_clear_line(override: str, expected: str) -> None:
    with pytest.raises(Exception) as info:
        compose_config([override])
    line = describe_config_error(info.value)
    assert "\n" not in line
    assert line.startswith(expected), line


def test_local_config_selects_the_real_setup_and_the_command_line_still_wins(tmp_path: Path) -> None:
    import shutil

    from hydra import compose, initialize_config_dir

    from flux_lora.compose import PROJECT_ROOT

    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf, symlinks=True)
    (conf / "sweep").unlink()
    (conf / "sweep").symlink_to(PROJECT_ROOT / "sweeps")
    (conf / "local").mkdir()
    shutil.copy(PROJECT_ROOT / "examples" / "local" / "default.yaml", conf / "local" / "default.yaml")
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        local = resolved_container(compose("config"))
        chosen = resolved_container(compose("config", overrides=["profile=final", "gpu=h200"]))
    assert (local["model"]["name"], local["engine"]["name"], local["profile"]["name"], local["gpu"]["name"]) == (
        "flux_dev",
        "sd_scripts",
        "fast",
        "h100",
    )
    assert local["model"]["transformer"] == "/models/flux1-dev.safetensors"
    assert local["dataset"]["path"] == "/data/subject"
    assert (chosen["profile"]["name"], chosen["gpu"]["name"], chosen["model"]["name"]) == ("final", "h200", "flux_dev")


def test_key_added_with_plus_is_refused_by_the_schema() -> None:
    # `+` composes (Hydra adds the key with struct mode off); the typed run must still refuse it by name.
    from flux_lora.compose import load_run

    for override, key in [
        ("+profile.max_steps=5", "profile.max_steps"),
        ("+foo=1", "foo"),
        ("+dataset.gate.x=1", "dataset.gate.x"),
    ]:
        cfg = compose_config([override])
        with pytest.raises(Exception) as info:
            load_run(cfg)
        assert describe_config_error(info.value).startswith(f"{key}: unknown key"), override


@pytest.mark.parametrize("launcher", ["local", "slurm", "submitit_local"])
def test_submitit_folder_is_inside_the_sweep_dir(launcher: str) -> None:
    from omegaconf import OmegaConf

    hydra_cfg = compose_config([f"hydra/launcher={launcher}"], with_hydra=True).hydra
    folder = Path(OmegaConf.select(hydra_cfg, "launcher.submitit_folder"))
    assert Path(hydra_cfg.sweep.dir) in folder.parents, folder
    if launcher != "submitit_local":  # the plugin's own default keeps "%j", an empty folder of that name
        assert "%j" not in str(folder)


def test_help_shows_readme_usage_and_the_config_groups() -> None:
    from flux_lora.compose import PROJECT_ROOT
    from tests.cli import run_cli

    done = run_cli("--help", check=True)
    readme = (PROJECT_ROOT / "README.md").read_text()
    usage = readme.split("## Usage", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    for line in filter(None, map(str.strip, usage.splitlines())):
        assert line in done.stdout, f"README usage line missing from --help: {line}"
    for group in GROUPS:
        assert f"\n{group}: {', '.join(options(group))}\n" in done.stdout


@pytest.mark.parametrize("profile", ["fast", "smoke"])
def test_ablation_step_basis_is_declared_and_holds_images_or_updates_equal(profile: str) -> None:
    """a3/a8 change the accumulation; the declared basis says what else follows, and nothing more changes."""
    for basis in ("optimizer_steps", "images_seen"):
        base = resolved_container(
            compose_config([f"profile={profile}", "ablation=baseline", f"ablation.step_basis={basis}"])
        )
        for cell in ABLATION_CELLS:
            cfg = resolved_container(
                compose_config([f"profile={profile}", f"ablation={cell}", f"ablation.step_basis={basis}"])
            )
            accumulation = cfg["gpu"]["gradient_accumulation_steps"]
            updates, base_updates = cfg["profile"]["max_train_steps"], base["profile"]["max_train_steps"]
            images = updates * accumulation * cfg["gpu"]["batch_size"]
            base_images = base_updates * base["gpu"]["gradient_accumulation_steps"] * base["gpu"]["batch_size"]
            if basis == "optimizer_steps" or accumulation == 1:
                assert updates == base_updates == 500, cell
                assert "profile.max_train_steps" not in _diff(base, cfg), cell
            else:  # equal images seen: a quarter of the updates (and of the warmup), the only undeclared differences
                assert images == base_images and updates == 125 and cfg["profile"]["lr_warmup_steps"] == 12, cell
                assert _covered(
                    _diff(base, cfg) - {"profile.max_train_steps", "profile.lr_warmup_steps"},
                    cfg["ablation"]["changes"],
                ), cell


@pytest.mark.parametrize("profile", ["fast", "final"])
def test_the_ablation_sweep_composes_into_runnable_cells_on_every_profile_and_tier_that_holds_it(profile: str) -> None:
    """The cells' warmup is shortened with their steps (ablation.warmup_share): the final profile's 500 warmup steps
    met the ablation's 500 steps and refused all nine. The sample dataset's buckets take each engine's step."""
    from flux_lora.compose import load_run
    from flux_lora.rules import apply_rules

    # Every cell on the largest tier, and baseline (the cells differ from it only in their declared keys, tested
    # above) on the smallest that holds 768 px: rules depend on the tier through memory and resolution.
    combinations = [("h200", ablation) for ablation in ["baseline", *ABLATION_CELLS, "a8_all"]] + [
        ("a6000", "baseline"),
        ("a6000", "a8_all"),
    ]
    for gpu, ablation in combinations:
        for engine in ("native", "sd_scripts"):
            run = load_run(
                compose_config(
                    [f"profile={profile}", f"gpu={gpu}", f"engine={engine}", "model=flux_dev", f"ablation={ablation}"]
                )
            )
            errors = apply_rules(run).errors
            assert errors == [], (gpu, engine, ablation, errors)
            assert run.profile.lr_warmup_steps == round(run.profile.max_train_steps * 0.1) < run.profile.max_train_steps
            assert run.dataset.bucket_reso_steps == {"native": 32, "sd_scripts": 64}[engine]
