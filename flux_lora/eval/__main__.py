"""`python -m flux_lora.eval RUN_DIR [options]`: evaluate a run, print a summary, write RUN_DIR/eval/eval.json.
`python -m flux_lora.eval --lora FILE --dataset DIR [--models DIR | --base-model tiny]`: the same for any LoRA file.

Exit status: 0 evaluated, 1 evaluated but the LoRA fails the load or ComfyUI key check, 2 could not evaluate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from flux_lora.eval.evaluation import evaluate_run
from flux_lora.eval.external import external_run_dir
from flux_lora.eval.settings import EvalSettings


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def parse_args(argv: list[str]) -> tuple[Path, EvalSettings, bool]:
    defaults = EvalSettings()
    parser = argparse.ArgumentParser(prog="python -m flux_lora.eval", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, nargs="?", help="a run folder (or none, with --lora FILE --dataset DIR)")
    parser.add_argument(
        "--validation-path", help="folder of validation images (+ captions); default: the training images"
    )
    parser.add_argument(
        "--lora",
        default=defaults.lora,
        help="which of the run's LoRA files generates: final, or best (lowest validation loss); or a LoRA file "
        "from anywhere (kohya or diffusers/peft keys), judged with --dataset",
    )
    parser.add_argument(
        "--dataset", type=Path, help="with --lora FILE: the person's photos (+ .txt captions) to compare with"
    )
    parser.add_argument("--models", type=Path, help="with --lora FILE: the folder of the four FLUX.1-dev files")
    parser.add_argument(
        "--out", type=Path, help="with --lora FILE: where its evaluation goes (default outputs/evals/<name>-<hash>)"
    )
    parser.add_argument("--strengths", type=_floats, default=defaults.strengths, help="e.g. 0.5,0.8,1.0,1.2")
    parser.add_argument("--seeds", type=_ints, default=defaults.seeds, help="e.g. 0,1,2,3")
    parser.add_argument("--max-prompts", type=int, default=None, help="at most N sample and N held-out prompts")
    parser.add_argument("--no-heldout", action="store_true", help="only the run's sample prompts")
    parser.add_argument(
        "--steps", type=int, default=None, help="sampling steps (default: the run's profile.sample_steps)"
    )
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default: the run's profile.resolution)")
    parser.add_argument("--min-output-change", type=float, default=defaults.min_output_change)
    parser.add_argument("--no-validation", action="store_true")
    parser.add_argument("--no-likeness", action="store_true", help="skip generation, likeness, diversity and grids")
    parser.add_argument("--no-load-check", action="store_true")
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument(
        "--base-model",
        choices=["tiny"],
        default=None,
        help="judge the LoRA on the tiny model instead of the run's (a stand-in where FLUX.1-dev weights cannot "
        "be loaded, e.g. CPU tests of an sd-scripts run; the LoRA must have the tiny model's shapes)",
    )
    parser.add_argument("--force", action="store_true", help="evaluate again even if eval.json matches")
    args = parser.parse_args(argv)
    external = args.lora not in ("final", "best")
    if external == (args.run_dir is not None):
        parser.error("give a RUN_DIR, or --lora FILE with --dataset DIR (not both)")
    if external and args.dataset is None:
        parser.error("--lora FILE needs --dataset DIR: the photos to compare the LoRA with")
    run_dir = args.run_dir
    if external:
        run_dir = external_run_dir(
            Path(args.lora),
            args.dataset,
            out=args.out,
            models=args.models,
            stand_in=args.base_model == "tiny",
            resolution=args.resolution or 512,
            sample_steps=args.steps or 20,
        )
    settings = EvalSettings(
        validation=not args.no_validation,
        validation_path=str(args.dataset) if external else args.validation_path,
        likeness=not args.no_likeness,
        lora="final" if external else args.lora,
        strengths=args.strengths,
        seeds=args.seeds,
        heldout_prompts=not args.no_heldout,
        max_prompts_per_set=args.max_prompts,
        sample_steps=args.steps,
        resolution=args.resolution,
        load_check=not args.no_load_check,
        min_output_change=args.min_output_change,
        device=args.device,
        base_model=args.base_model,
    )
    return run_dir, settings, args.force


VALIDATION_WORDS = {
    "held-out": "held-out images (never trained)",
    "validation-folder": "the validation folder",
    "training-set": "the training images (nothing held out: it rewards memorising them)",
}


def _num(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def print_summary(result: dict, console: Console) -> None:
    run = result["run"]
    console.print(f"[bold]{run['name']}[/bold]: {run['label']}")
    if run["base_model_stand_in"]:
        console.print(
            f"base model: {run['base_model']} stand-in for the run's {run['model']} (--base-model): "
            "the numbers test the pipeline, not this LoRA on its model"
        )
    if "validation" in result:
        validation = result["validation"]
        sizes = f"{validation['count']} images x {len(validation['sigmas'])} sigmas"
        table = Table(
            title=f"validation loss on {VALIDATION_WORDS.get(validation['images'], validation['images'])} ({sizes})"
        )
        for column in ("LoRA", "step", "loss"):
            table.add_column(column)
        for point in validation["curve"]:
            table.add_row(point["label"], str(point["step"]), _num(point["loss"], ".5f"))
        console.print(table)
        console.print(
            f"best: step {validation['best']['step']} ({_num(validation['best']['loss'], '.5f')}), "
            f"final {_num(validation['final']['loss'], '.5f')}"
        )
    if "likeness" in result:
        likeness = result["likeness"]
        table = Table(title=f"likeness ({likeness['embedder']}, same person below {likeness['same_person_distance']})")
        for column in ("images compared", "face found", "mean distance", "mean cosine", "same person"):
            table.add_column(column)
        rows = {
            "training vs training (ceiling)": likeness["ceiling"],
            "no LoRA (floor)": likeness["floor"],
            **{f"LoRA x{k}": v for k, v in likeness["by_strength"].items()},
        }
        for label, block in rows.items():
            table.add_row(
                label,
                _num(block["face_found_share"], ".0%"),
                _num(block["mean_distance"], ".3f"),
                _num(block["mean_cosine"], ".3f"),
                _num(block["same_person_share"], ".0%"),
            )
        console.print(table)
        if likeness.get("note"):
            console.print(likeness["note"])
        diversity = result["diversity"]
        console.print(
            f"diversity: {len(diversity['collapsed_rows'])} collapsed prompt rows, "
            f"{len(diversity['copies'])} near-copies of training images"
        )
    if "load_check" in result:
        check = result["load_check"]
        verdict = "passed" if check["passed"] else "FAILED"
        console.print(
            f"load check (diffusers): {verdict}; {check['modules_loaded']} modules, output change "
            f"{_num(check['output_change'], '.2e')} (needs > {check['min_output_change']:g})"
        )
        for line in check["unconsumed_keys"][:5] + check["warnings"][:5] + ([check["error"]] if check["error"] else []):
            console.print(f"  {line}")
    comfy = result["comfy_keys"]
    if comfy["passed"] is None:
        console.print(f"ComfyUI key map: {comfy['note']}")
    else:
        console.print(f"ComfyUI key map: {'passed' if comfy['passed'] else 'FAILED'}; {comfy['modules']} modules")
    for line in comfy["problems"][:5]:
        console.print(f"  {line}")


def main(argv: list[str] | None = None) -> int:
    try:
        run_dir, settings, force = parse_args(sys.argv[1:] if argv is None else argv)
        result = evaluate_run(run_dir, settings, force=force)
    except (FileNotFoundError, ValueError, ModuleNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_summary(result, Console())
    failed = result["comfy_keys"]["passed"] is False or not result.get("load_check", {"passed": True})["passed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
