"""Reading weights (safetensors only) and importers from public checkpoints."""

from avatarv_jax.io.import_report import (CheckpointMismatchError, ImportReport,
                                          check_names_and_shapes)
from avatarv_jax.io.safetensors_io import (SafetensorsCheckpoint, UnsupportedCheckpointError,
                                           load_safetensors, resolve_weight_files)

__all__ = ["CheckpointMismatchError", "ImportReport", "SafetensorsCheckpoint",
           "UnsupportedCheckpointError", "check_names_and_shapes", "load_safetensors",
           "resolve_weight_files"]
