"""Per-row mentor statistics stored next to the logits (`stats` array, fp32 [S, N, K]).

Mentors are frozen and views are keyed, so each mentor's statistics of a (view, sample)
row are constants: computed once when the cache is built, from the logits *as stored*
(cast to the cache dtype, then to fp32). An online mentor that casts its logits the same
way and calls `mentor_row_stats` gets bit-identical values (same function, same input)."""

from __future__ import annotations

import numpy as np
import torch

# Field k of the last dimension of `stats` (all at temperature 1):
#   logp_true: log softmax(z)[y], the log-probability of the true class
#   logsumexp: log sum_c exp(z_c)
STAT_FIELDS: tuple[str, ...] = ("logp_true", "logsumexp")


def mentor_row_stats(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """fp32 [..., len(STAT_FIELDS)] of logit rows `logits` [..., C] whose true classes are
    `labels` (broadcast against logits[..., 0], e.g. [B] for [M, B, C])."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    lab = torch.as_tensor(labels, device=x.device).to(torch.int64).expand(x.shape[:-1])
    true = x.gather(-1, lab.unsqueeze(-1)).squeeze(-1)
    return torch.stack([true - lse, lse], dim=-1)


def stored_row_stats(stored: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """`mentor_row_stats` of logits as the cache stores them (fp16/fp32 numpy), on CPU."""
    return mentor_row_stats(torch.from_numpy(np.ascontiguousarray(stored)),
                            torch.from_numpy(np.asarray(labels))).numpy()
