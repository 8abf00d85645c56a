"""Fused multi-mentor distillation losses (docs/ARCHITECTURE.md, ckd.kernels).

`distill_loss(...)` is the entry point; `reference` holds the eager definitions (the
contract, METHOD.md); `distill` the Triton kernels (imported lazily: CPU-only users
never need triton).
"""

from ckd.kernels.api import (
    METHODS,
    DistillOutput,
    NonFiniteError,
    check_finite,
    distill_loss,
    resolve_backend,
)
from ckd.kernels.rng import dgkd_keep_mask, tekap_noise

__all__ = ["METHODS", "DistillOutput", "NonFiniteError", "check_finite", "distill_loss",
           "resolve_backend", "dgkd_keep_mask", "tekap_noise"]
