"""CIFAR model zoo (RepDistiller architectures and state_dict names) and checkpoints."""

from .checkpoint import (
    CheckpointError,
    file_sha256,
    infer_arch,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from .registry import (
    ARCHS,
    count_params,
    create_model,
    feature_shapes,
    list_models,
    param_count,
    resolve_arch,
)

__all__ = [
    "ARCHS", "CheckpointError", "count_params", "create_model", "feature_shapes", "file_sha256",
    "infer_arch", "list_models", "load_checkpoint", "param_count", "read_checkpoint_meta",
    "resolve_arch",
    "save_checkpoint",
]
