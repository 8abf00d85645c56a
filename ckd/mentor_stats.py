"""Per-row mentor statistics at temperature 1: what ClassroomKD's ranking reads of a mentor.

One definition for the cache (which stores them next to the logits), online mentors and
the kernels (which rank from them); torch only, so neither side imports the other.
"""

from __future__ import annotations

import torch

# Field k of the last dimension (all at temperature 1):
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
