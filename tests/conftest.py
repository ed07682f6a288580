"""Shared fixtures: a megatron world of one process on CPU, a small synthetic dataset, and a
tiny D checkpoint with its export."""
from __future__ import annotations

import os
import signal

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


@pytest.fixture(autouse=True)
def stop_signal_handlers_restored():
    """Each test leaves this process's stop-signal handlers as it found them: a handler left by
    code under test that only records SIGTERM kept a later test's forked workers alive, and a
    library caller's process would no longer stop on it."""
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    yield
    left = [signal.Signals(s).name for s in STOP_SIGNALS if signal.getsignal(s) != before[s]]
    for s in STOP_SIGNALS:
        signal.signal(s, before[s])
    assert not left, f"the test left its own handler for {', '.join(left)}"


@pytest.fixture
def megatron_world():
    """megatron-core initialised as a world of one (tp=pp=1), seeded."""
    from mmpretrain.parallel import init_distributed

    init_distributed(1, 1, None, seed=1234)
    yield


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """A synthetic dataset of 160 training samples (built once per test session)."""
    from mmpretrain.data.synth import synthesize

    out = tmp_path_factory.mktemp("data") / "synth"
    synthesize(out, samples=160, seed=3, heldout=32, progress=False)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config, tokenizer, checkpoint, export dir) of a random tiny D model."""
    from hf_helpers import random_checkpoint, tiny_config, write_dataset_tokenizer
    from mmpretrain.parallel import init_distributed

    from mmpretrain.hf.export import export

    init_distributed(1, 1, None, seed=1234)
    root = tmp_path_factory.mktemp("hf_export")
    tok = write_dataset_tokenizer(root / "data")
    cfg = tiny_config(root / "data")
    ckpt = random_checkpoint(root / "run", cfg, tok)
    export(root / "run", root / "hf", shard_size="40KB")
    return cfg, tok, ckpt, root / "hf"
