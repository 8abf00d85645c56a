"""Per-row mentor statistics stored next to the logits (`stats` array, fp32 [S, N, K]).

Mentors are frozen and views are keyed, so each mentor's statistics of a (view, sample)
row are constants: computed once when the cache is built, from the logits *as stored*
(cast to the cache dtype, then to fp32). An online mentor that casts its logits the same
way and calls `mentor_row_stats` gets bit-identical values (same function, same input)."""

from __future__ import annotations

import numpy as np
import torch

from ckd.mentor_stats import STAT_FIELDS, mentor_row_stats  # noqa: F401 - the fields stored


def stored_row_stats(stored: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """`mentor_row_stats` of logits as the cache stores them (fp16/fp32 numpy), on CPU."""
    return mentor_row_stats(torch.from_numpy(np.ascontiguousarray(stored)),
                            torch.from_numpy(np.asarray(labels))).numpy()
