"""Random-number states of one rank: python, numpy, torch (CPU and CUDA) and megatron's
model-parallel tracker, so that a resumed run draws what the uninterrupted run would have."""
from __future__ import annotations

import random

import numpy as np
import torch


def capture() -> dict:
    """This rank's RNG states."""
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore(state: dict) -> None:
    """Put back states from `capture` (of the same rank of the same layout)."""
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
