"""Fused multi-mentor distillation losses (docs/ARCHITECTURE.md, ckd.kernels): a leaf that
knows tensors and numbers, never a method.

`terms_loss(...)` runs a term table (`terms.py`) in the fused Triton kernels (`triton_kernels.py`,
imported lazily: CPU-only users never need triton); `reference` holds the eager definitions
of the methods' losses (the contract, docs/METHODS.md). The methods, their parameters and
their tables are declared in `ckd.methods`, whose `distill_loss` is the public entry.
"""

from ckd.kernels.api import resolve_backend, terms_loss
from ckd.kernels.output import DistillOutput, NonFiniteError, check_finite
from ckd.kernels.rng import dgkd_keep_mask, tekap_noise
from ckd.kernels.sparse_mentors import SparseMentors
from ckd.kernels.terms import Decoupled, RandomDrop, Ranking, TermTable

__all__ = ["Decoupled", "DistillOutput", "NonFiniteError", "RandomDrop", "Ranking",
           "SparseMentors", "TermTable", "check_finite", "dgkd_keep_mask", "resolve_backend",
           "tekap_noise", "terms_loss"]
