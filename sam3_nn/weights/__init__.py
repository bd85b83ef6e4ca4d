"""Weight loading: released checkpoints -> our parameters."""

from sam3_nn.weights.loader import (CheckpointError, LoadReport, TensorSource, load_params,
                                     open_checkpoint, plan)
from sam3_nn.weights.store import load_converted, save_converted

__all__ = ["CheckpointError", "LoadReport", "TensorSource", "load_params", "open_checkpoint",
           "plan", "load_converted", "save_converted"]
