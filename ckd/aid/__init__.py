"""Teachers adapted to a student before caching (AID, as the project reads it) and the
KD-loss decomposition that motivates it (docs/AID.md)."""

from ckd.aid.decompose import Decomposition, inter_class_kl, intra_class_kl

__all__ = ["Decomposition", "inter_class_kl", "intra_class_kl"]
