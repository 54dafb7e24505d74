"""What an evaluation does, as one frozen dataclass: its fields (with the LoRA files) are the cache key."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

# Device nodes without which torch cannot see a GPU: NVIDIA, WSL2's GPU bridge, AMD ROCm.
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def device_type(name: str) -> str:
    """ "cuda" or "cpu" for a device name ("auto": cuda when torch sees a GPU). Without a GPU device node the answer is
    cpu without importing torch (1.6 s), so a cached re-run stays fast on a CPU machine."""
    if name != "auto":
        return name.split(":")[0]
    if not any(Path(node).exists() for node in GPU_DEVICE_NODES):
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# The 9 noise levels of the validation set, fixed so curves compare across runs and checkpoints.
VALIDATION_SIGMAS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class EvalSettings:
    # Validation loss over every saved LoRA.
    validation: bool = True
    validation_path: str | None = None  # a folder of images (+ captions); None: the run's training images
    validation_sigmas: tuple[float, ...] = VALIDATION_SIGMAS
    # (image, sigma) pairs per forward pass; None: 3 for FLUX.1-dev (its 1024 px activations need it small), every
    # sigma of an image at once for the tiny model (half the time of 3 on a CPU).
    validation_batch_size: int | None = None

    # Generation for likeness, diversity and grids (one LoRA file, several strengths and seeds).
    likeness: bool = True
    lora: str = "final"  # which LoRA generates: "final" or "best" (lowest validation loss)
    strengths: tuple[float, ...] = (0.5, 0.8, 1.0, 1.2)
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    heldout_prompts: bool = True
    max_prompts_per_set: int | None = None  # None: every sample prompt and every held-out prompt
    sample_steps: int | None = None  # None: the run's profile.sample_steps
    resolution: int | None = None  # None: the run's profile.resolution (generation and validation)

    # Does the exported file load elsewhere and change the model?
    load_check: bool = True
    min_output_change: float = 1e-4  # mean |LoRA - base| / mean |base| of the transformer output

    device: str = "auto"  # "auto": cuda when available, else cpu
    # "tiny": judge the LoRA files on the tiny model instead of the run's base model (FLUX.1-dev weights cannot be
    # loaded on a CPU test machine); the numbers then test the pipeline, not the LoRA. None: the run's model.
    base_model: str | None = None

    def __post_init__(self) -> None:
        if self.lora not in ("final", "best"):
            raise ValueError(f"EvalSettings.lora={self.lora!r}: use 'final' or 'best'")
        if not self.seeds or not self.strengths:
            raise ValueError("EvalSettings: seeds and strengths need at least one value each")
        if self.base_model not in (None, "tiny"):
            raise ValueError(f"EvalSettings.base_model={self.base_model!r}: use 'tiny' or None (the run's own model)")
        if any(not 0.0 < s < 1.0 for s in self.validation_sigmas):
            raise ValueError(f"EvalSettings.validation_sigmas={self.validation_sigmas}: each must lie in (0, 1)")

    def to_record(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
