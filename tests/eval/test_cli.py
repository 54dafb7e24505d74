"""End to end: `python -m flux_lora.eval RUN_DIR` on a real tiny run, and its cache."""

from __future__ import annotations

import json
import subprocess
import sys

from PIL import Image

from flux_lora.compose import PROJECT_ROOT
from flux_lora.eval import EvalSettings, evaluate_run
from flux_lora.eval.grids import grid_size
from tests.eval.tiny_eval import EVAL_SECTIONS, SMALL_EVAL, SMALL_EVAL_ARGS


def test_cli_writes_eval_json_with_every_section(evaluated_run) -> None:
    run_dir, done = evaluated_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((run_dir / "eval" / "eval.json").read_text())
    assert set(result) == EVAL_SECTIONS and result["schema_version"] == 1
    assert result["run"]["state"] == "succeeded" and result["run"]["succeeded"] is True
    assert result["run"]["base_model"] == "tiny" and result["run"]["base_model_stand_in"] is False
    assert [(e["step"], e["final"]) for e in result["loras"]] == [(2, False), (4, True)]

    validation = result["validation"]
    assert validation["images"] == "held-out" and validation["count"] == 2
    assert [p["step"] for p in validation["curve"]] == [0, 2, 4]
    assert set(validation["curve"][1]["per_sigma"]) == {f"0.{i}" for i in range(1, 10)}
    assert validation["final"]["step"] == 4 and validation["best"]["step"] in (2, 4)

    # The tiny random model draws no faces: likeness is null, never a made-up number.
    likeness = result["likeness"]
    assert likeness["ceiling"]["faces_found"] == 6 and likeness["ceiling"]["mean_distance"] < 0.6  # the trained faces
    assert likeness["floor"]["face_found_share"] == 0 and likeness["floor"]["mean_distance"] is None
    assert set(likeness["by_strength"]) == {"0.5", "1"}
    assert all(block["same_person_share"] is None for block in likeness["by_strength"].values())

    # Likeness at every saved LoRA (a cheaper pass), against the training and the held-out faces apart.
    by_step = result["likeness_by_step"]
    assert [(p["step"], p["final"]) for p in by_step["points"]] == [(2, False), (4, True)]
    assert by_step["reference_faces"] == {"training": 6, "held_out": 2} and by_step["settings_note"].startswith(
        "cheaper than"
    )
    assert by_step["best_step"] is None and by_step["note"].startswith("no face found")  # the tiny model draws none
    assert all(p["copy_indicator"] is None and p["held_out_faces"]["faces_found"] == 0 for p in by_step["points"])
    assert likeness["held_out_reference_faces"] == 2 and set(likeness["apart"]) == {"0.5", "1"}

    assert result["load_check"]["passed"] and result["comfy_keys"]["passed"]
    assert len(result["samples"]) == 2 * 3 * 2  # prompts x (no LoRA + 2 strengths) x seeds
    assert {s["set"] for s in result["samples"]} == {"sample", "heldout"}
    assert len(result["diversity"]["rows"]) == 2 * 3
    assert result["grids"]["contact_sheet"] == "dataset_contact_sheet.png"
    assert "ComfyUI key map: passed" in done.stdout


def test_grid_png_has_the_expected_pixel_size(evaluated_run) -> None:
    run_dir, _ = evaluated_run
    grids = json.loads((run_dir / "eval" / "eval.json").read_text())["grids"]
    for entry in grids["prompts"]:
        with Image.open(run_dir / entry["grid"]) as grid:
            assert grid.size == grid_size(rows=3, columns=2, cell=64)
        assert entry["rows"] == ["no LoRA", "LoRA x0.5", "LoRA x1"]


def test_rerun_with_the_same_settings_is_a_cache_hit(evaluated_run) -> None:
    run_dir, _ = evaluated_run
    eval_file = run_dir / "eval" / "eval.json"
    before = eval_file.stat().st_mtime_ns
    messages: list[str] = []
    result = evaluate_run(run_dir, EvalSettings(**SMALL_EVAL), log=messages.append)
    assert result["cached"] is True
    assert eval_file.stat().st_mtime_ns == before
    assert messages == [f"eval: cached, nothing to do (same LoRA files and settings): {eval_file}"]


def test_a_cache_hit_loads_no_model_code(evaluated_run) -> None:
    """The cached path never imports torch, diffusers or dlib: an unchanged run answers in a fraction of a second."""
    run_dir, _ = evaluated_run
    code = (
        "import sys; from flux_lora.eval.__main__ import main; status = main(sys.argv[1:]); "
        "print(sorted({'torch', 'diffusers', 'dlib'} & set(sys.modules))); sys.exit(status)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(run_dir), *SMALL_EVAL_ARGS],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "eval: cached, nothing to do" in done.stdout and done.stdout.rstrip().endswith("[]")
