"""The kernels' mentor statistics (ckd.kernels.launch, free of cache imports) are the
cache's (ckd.cache.mentor_stats, what `ckd cache-logits` stores) bit for bit, so a loss computed
with stored statistics equals one computed with statistics of the same logits."""

import torch

from ckd.cache.mentor_stats import mentor_row_stats as cache_stats
from ckd.kernels.launch import mentor_row_stats as kernel_stats


def test_same_statistics_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        z = (4 * torch.randn(3, 17, 100, generator=g)).to(dtype)
        y = torch.randint(0, 100, (17,), generator=g)
        a, b = kernel_stats(z, y), cache_stats(z, y)
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
