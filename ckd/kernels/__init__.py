"""Fused multi-mentor distillation losses (docs/ARCHITECTURE.md, ckd.kernels).

`distill_loss(...)` is the entry point; `reference` holds the eager definitions (the
contract, docs/METHODS.md); `distill` the Triton kernels (imported lazily: CPU-only users
never need triton). The methods and their parameters are declared in `ckd.methods`.
"""

from ckd.kernels.api import distill_loss, resolve_backend
from ckd.kernels.output import DistillOutput, NonFiniteError, check_finite
from ckd.kernels.rng import dgkd_keep_mask, tekap_noise
from ckd.kernels.sparse_mentors import SparseMentors

__all__ = ["DistillOutput", "NonFiniteError", "SparseMentors", "check_finite", "distill_loss",
           "resolve_backend", "dgkd_keep_mask", "tekap_noise"]
