"""What `distill_loss` returns, shared by the eager and the fused paths (kept apart from
`api.py` so that `launch.py` can import it without an import cycle)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class DistillOutput:
    loss: Tensor  # 0-dim, backpropagates into student_logits
    stats: dict[str, Tensor]  # see reference.py; tensors on device, no host sync


class NonFiniteError(FloatingPointError):
    pass


def check_finite(stats: dict[str, Tensor]) -> None:
    """Raise if the kernel flagged non-finite logits or bad labels (syncs: call it at log
    intervals, not every step)."""
    flag = int(stats["nonfinite"])
    if not flag:
        return
    what = [(name, fix) for bit, name, fix in (
        (1, "student logits", "lower the learning rate, clip gradients or train in fp32"),
        (2, "mentor logits (the cache)", "verify or rebuild the logit cache"),
        (4, "labels (outside [0, C))", "check the dataset's num_classes"),
    ) if flag & bit]
    raise NonFiniteError(
        "distill_loss saw non-finite or invalid input in: "
        + "; ".join(f"{name} (fix: {fix})" for name, fix in what))
