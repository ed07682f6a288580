"""Checkpoints: atomic, layout-independent saves of the whole training state (see store.py for
what one holds and files.py for the directory layout)."""
from mmpretrain.checkpoint.files import (
    LATEST,
    CheckpointError,
    DamagedCheckpointError,
    check_files,
    check_shapes,
    checkpoint_root,
    clear_stale_saves,
    complete_before,
    latest_checkpoint,
    stale_saves,
)
from mmpretrain.checkpoint.slices import CheckpointSlices
from mmpretrain.checkpoint.store import (
    AsyncSaves,
    load_model,
    load_training,
    model_state,
    save,
    save_weights,
    save_weights_streamed,
)

__all__ = ["LATEST", "AsyncSaves", "CheckpointError", "CheckpointSlices", "DamagedCheckpointError",
           "check_files", "check_shapes", "checkpoint_root", "clear_stale_saves", "complete_before",
           "latest_checkpoint", "load_model", "load_training", "model_state", "save",
           "save_weights", "save_weights_streamed", "stale_saves"]
