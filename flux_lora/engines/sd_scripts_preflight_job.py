"""Everything sd-scripts checks before it loads weights, run by sd-scripts itself (in `engine.python`).

Started as `<engine.python> sd_scripts_preflight_job.py <flux_train_network.py args...>` with the
checkout as working directory. Standard library only on our side: this runs in sd-scripts' own
environment, which need not have flux_lora installed. It follows FluxNetworkTrainer.train's order at
the pinned commit (train_network.py:491-583): parse, verify_command_line_training_args,
read_config_from_file, verify_training_args, prepare_dataset_args, the dataset config schema and
blueprint (which finds the images the way training will, so an empty subset shows), "No data found",
the latent-cache check, and FluxNetworkTrainer.assert_extra_args. It stops at the first failure
and prints one JSON verdict line after VERDICT_MARKER.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import traceback

VERDICT_MARKER = "FLUX_LORA_PREFLIGHT_VERDICT "


def _verdict(state: str, steps: list[str], problem: str | None = None, detail: str | None = None) -> None:
    print(
        VERDICT_MARKER + json.dumps({"state": state, "steps": steps, "problem": problem, "detail": detail}), flush=True
    )


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def main(argv: list[str]) -> int:
    sys.argv[0] = "flux_train_network.py"  # argparse names the program after it in its messages
    sys.path.insert(0, os.getcwd())
    steps: list[str] = []
    try:
        import flux_train_network
        from library import config_util, strategy_base, train_util
    except Exception as error:  # noqa: BLE001 - any import failure means the checks cannot run here
        _verdict("skipped", steps, f"sd-scripts not importable in this interpreter ({sys.executable}): {error!r}")
        return 0

    def step(name: str, action):
        steps.append(name)
        return action()

    parser = flux_train_network.setup_parser()
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            args = step("parse_args", lambda: parser.parse_args(argv))
    except SystemExit:
        _verdict("failed", steps, f"parse_args: {_last_line(errors.getvalue())}")
        return 0
    try:
        step("verify_command_line_training_args", lambda: train_util.verify_command_line_training_args(args))
        args = step("read_config_from_file", lambda: train_util.read_config_from_file(args, parser))
        step("verify_training_args", lambda: train_util.verify_training_args(args))
        step("prepare_dataset_args", lambda: train_util.prepare_dataset_args(args, True))
        trainer = flux_train_network.FluxNetworkTrainer()
        # The dataset needs the latent caching strategy; the tokenizer strategy would load tokenizers (hub), so it is left out.
        step(
            "latents_caching_strategy",
            lambda: strategy_base.LatentsCachingStrategy.set_strategy(trainer.get_latents_caching_strategy(args)),
        )
        sanitizer = config_util.ConfigSanitizer(True, True, args.masked_loss, True)
        user_config = step("dataset_config", lambda: config_util.load_user_config(args.dataset_config))
        blueprint = step(
            "dataset_blueprint", lambda: config_util.BlueprintGenerator(sanitizer).generate(user_config, args)
        )
        train_group, val_group = step(
            "dataset_group", lambda: config_util.generate_dataset_group_by_blueprint(blueprint.dataset_group)
        )
        steps.append("data_found")
        if len(train_group) == 0:
            # sd-scripts logs "No data found" here and returns with exit code 0 (train_network.py:575-579).
            _verdict(
                "failed", steps, "No data found: sd-scripts finds no image in any subset folder of the dataset config"
            )
            return 0
        if args.cache_latents:
            steps.append("latents_cacheable")
            if not train_group.is_latent_cacheable():
                _verdict("failed", steps, "cache_latents: either color_aug or random_crop is set")
                return 0
        step("assert_extra_args", lambda: trainer.assert_extra_args(args, train_group, val_group))
    except (Exception, SystemExit) as error:  # noqa: BLE001 - every failure is the verdict
        message = str(error) or type(error).__name__
        _verdict(
            "failed",
            steps,
            f"{steps[-1]}: {type(error).__name__}: {_last_line(message)}",
            traceback.format_exc(limit=3),
        )
        return 0
    _verdict("passed", steps, None, f"{len(train_group)} batches in the training dataset group")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
