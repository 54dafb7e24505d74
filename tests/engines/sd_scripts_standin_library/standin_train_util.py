"""Stand-in for library/train_util.py: argument checks that need no model (the FLUX-relevant ones)."""


def verify_command_line_training_args(args) -> None:
    return None  # only warns about option spellings in the real code


def read_config_from_file(args, parser):
    assert args.config_file is None, "the launcher never passes --config_file"
    return args


def verify_training_args(args) -> None:
    # train_util.py:4414ff: caching to disk implies caching; fp8 needs mixed precision (train_network.py:829-834).
    if args.fp8_base:
        assert args.mixed_precision in ("fp16", "bf16"), "fp8_base requires mixed precision='fp16' or 'bf16'"


def prepare_dataset_args(args, support_metadata: bool) -> None:
    return None
