"""Weight loading: released checkpoints -> our parameters."""

from .loader import (CheckpointError, LoadReport, TensorSource, load_params, open_checkpoint,
                     plan)
from .store import load_converted, save_converted

__all__ = ["CheckpointError", "LoadReport", "TensorSource", "load_params", "open_checkpoint",
           "plan", "load_converted", "save_converted"]
