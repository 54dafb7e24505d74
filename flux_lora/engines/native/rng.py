"""A run's global random streams (Python, NumPy, torch on the CPU and CUDA), kept apart from the other runs of a
packed job: each run's dropout masks and LoRA init come from the global streams, so each run swaps its own in for
its turn and takes them back after it. With one run the swap changes nothing."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch


def _current() -> tuple[Any, ...]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _restore(state: tuple[Any, ...]) -> None:
    python, numpy, cpu, cuda = state
    random.setstate(python)
    np.random.set_state(numpy)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


class RngSlot:
    """The streams as they are now; `turn()` swaps them in and keeps where they ended."""

    def __init__(self) -> None:
        self.state = _current()

    @contextmanager
    def turn(self) -> Iterator[None]:
        _restore(self.state)
        try:
            yield
        finally:
            self.state = _current()
