"""The pose losses on the fused kernels: `ckd.pose.loss`'s methods as term tables over
the N*K joint rows (`ckd/kernels/terms.py`), one kernel call per row segment (SimCC: x bins
and y bins; heatmaps: all cells). The eager `ckd.pose.loss.pose_loss` is the contract.

Per segment the kernels compute `(1/(N K)) sum_rows sum_j w_j T_j^2 KL(mentor_j || student)`
with the gradient in the forward pass: over N*K rows that is Eq. 15's per-sample sum over
the joints divided by K, averaged over the N samples; the segments' losses add (x + y).
ClassroomKD ranks by an external key per row (`Ranking.external_key`): each sample's PCK
(the mentors' from the cache, the student's computed on the step) repeated over its K
joint rows, the batch score the mean over the rows with a key, which equals the mean over
the samples with one. The task term (cross-entropy with the Gaussian targets, a soft
target the kernels do not read) stays eager; the kernels' tables carry no CE term, and
the task is weighted by the selection's student rank (+ delta) read back from the kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ckd.kernels.api import terms_loss
from ckd.kernels.terms import Ranking, TermTable, ranked_terms
from ckd.pose.loss import method_params, selection_stats, task_rows


def pose_table(method: str, p: dict, m: int) -> tuple[TermTable, float]:
    """(the term table of a pose method over m mentors, the task weight when constant)."""
    if method == "kd":
        return TermTable(src=(0,), weight=(float(p["alpha_kd"]),), temp=(float(p["T"]),),
                         w_ce=0.0), float(p["alpha_ce"])
    if method == "aver":
        return TermTable(src=tuple(range(m)), weight=(1.0,) * m,
                         temp=(float(p["tau"]),) * m, w_ce=0.0), 1.0
    if p["granularity"] != "batch":
        raise ValueError("the fused pose classroom ranks at batch granularity; run "
                         "granularity=sample with --backend reference")
    sel = Ranking(lam=float(m if p["lam"] is None else p["lam"]), tau=float(p["tau"]),
                  beta=float(p["beta"]), delta=float(p["delta"]),
                  delta_term=float(p["delta"]) != 0.0, external_key=True)
    return ranked_terms(m, sel, w_ce=0.0), 0.0


def fused_pose_loss(method: str, student: Tensor, mentors, target: Tensor, weight: Tensor,
                    segs: list[tuple[int, int]], *, student_key: Tensor | None = None,
                    mentor_keys: Tensor | None = None, **params
                    ) -> tuple[Tensor, dict[str, Tensor]]:
    """`ckd.pose.loss.pose_loss` with the distillation on the fused kernels."""
    p = method_params(method, params)
    task = task_rows(student, target, weight, segs)
    if method == "nokd":
        z = student.new_zeros(0 if mentors is None else mentors.shape[0])
        return task.mean(), selection_stats(z, z, z + 1, 1.0)
    if mentors is None or not torch.is_tensor(mentors):
        raise ValueError("the fused pose losses read dense mentor rows; a top-k (sparse) pose "
                         "cache runs the eager reference: pass --backend reference or auto")
    m = mentors.shape[0]
    n, k, _ = student.shape
    table, w_task = pose_table(method, p, m)
    keys = None
    if method == "classroom":
        if student_key is None or mentor_keys is None:
            raise ValueError("pose classroom needs ranking keys: the student's PCK on the "
                             "step and each mentor's (from the cache or computed online)")
        keys = torch.cat([student_key[None].detach().double(), mentor_keys.detach().double()])
        keys = keys.float()[:, :, None].expand(-1, -1, k).reshape(m + 1, n * k).contiguous()
    y = torch.zeros(n * k, dtype=torch.int64, device=student.device)
    total, stats = None, None
    for a, b in segs:
        out = terms_loss(student[..., a:b].reshape(n * k, b - a),
                         mentors[..., a:b].reshape(m, n * k, b - a), y, table,
                         rank_keys=keys, who=f"pose {method}")
        total = out.loss if total is None else total + out.loss
        stats = stats or out.stats
    if method == "classroom":
        w_task = stats["student_rank"].detach() + p["delta"]
    stats = {**stats, "student_rank": torch.as_tensor(
        stats["student_rank"] if method == "classroom" else w_task, dtype=torch.float32)}
    return w_task * task.mean() + total, stats
