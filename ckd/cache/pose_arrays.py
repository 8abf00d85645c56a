"""The per-mentor arrays of a pose cache (root and mentor attribute `kind: "pose"`).

A pose model's output is rows of joint logits: per view and sample `[K, D]` (SimCC: x bins
then y bins, D = Dx + Dy; heatmaps: D = H' W' cells). A pose mentor holds, chunked like any
mentor array (one chunk per work unit) and covered by the unit markers:

    logits        fp16|fp32 [S, N, K, D]   dense rows (dims slot, sample, joint, cell), or
    topk_ids      uint8|uint16 [S, N, K, k] `topk:k` (heatmaps): the k largest cells of each
    topk_logits   fp16|fp32 [S, N, K, k]   joint row, their logits and the rest's
    topk_rest     fp32 [S, N, K, 2]        (logsumexp, mean logit) (docs/SPARSE.md's buckets)
    pck           fp32 [S, N]              the mentor's ranking key on the view (PCK, NaN
                                           where the view has no joint to score)
    view_params   fp64 [S, N, 3]           (scale, rotation, flip) of the view, the same for
                                           every mentor; `cache verify --recompute`
                                           re-derives them from (seed, sample, slot)

`train_correct` counts the joints within the ranking key's threshold per slot and block.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .layout import ArraySpec

POSE_KIND = "pose"


def id_dtype(row_size: int) -> str:
    """The stored dtype of a top-k cell id."""
    return "uint8" if row_size <= 256 else "uint16" if row_size <= 65536 else "int32"


def _out(name: str):
    return lambda u: u.outputs[name]


def pose_specs(attrs: Mapping[str, Any]) -> list[ArraySpec]:
    """The arrays of a pose mentor from its attributes (`pose.num_joints`, `pose.row_size`,
    `logits_mode` dense | topk:k)."""
    pose = attrs["pose"]
    k_j, d = int(pose["num_joints"]), int(pose["row_size"])
    mode = attrs.get("logits_mode", "dense")
    if mode == "dense":
        rows = [ArraySpec("logits", None, lambda lay: (k_j, d), ("joint", "cell"), "logits",
                          lambda u: u.logits)]
    else:
        k = int(mode.partition(":")[2])
        rows = [ArraySpec("topk_ids", id_dtype(d), lambda lay: (k_j, k), ("joint", "rank"), "data",
                          _out("topk_ids")),
                ArraySpec("topk_logits", None, lambda lay: (k_j, k), ("joint", "rank"),
                          "logits", _out("topk_logits")),
                ArraySpec("topk_rest", "float32", lambda lay: (k_j, 2), ("joint", "rest"),
                          "data", _out("topk_rest"))]
    return [*rows,
            ArraySpec("pck", "float32", lambda lay: (), (), "data", _out("pck")),
            ArraySpec("view_params", "float64", lambda lay: (3,), ("param",), "data",
                      _out("view_params"))]
