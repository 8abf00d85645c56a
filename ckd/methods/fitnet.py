"""FitNet: a hint on the pooled feature through a learned connector (one declaration, its
reference and its module)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ckd.methods.registry import Method, Paper, register


def fitnet(f_student: Tensor, f_teacher: Tensor, connector: nn.Linear) -> Tensor:
    """MSE(connector(f_student), f_teacher), mean over elements (RepDistiller's HintLoss)."""
    return F.mse_loss(connector(f_student.float()), f_teacher.float())


def _build(student_shapes, mentor_shapes, params, context=None) -> nn.Module:
    return nn.Linear(student_shapes[-1][0], mentor_shapes[0][-1][0])


def _loss(inputs, connector):
    loss = fitnet(inputs.extra["student_features"][-1], inputs.extra["mentor_pool"][0],
                  connector)
    return loss, {"hint": loss.detach()}


register(Method(
    "fitnet", "MSE between a learned Linear of the student's pooled feature and the "
    "teacher's pooled feature", mentors="teacher", logit=False, inputs=("pool",),
    paper=Paper("FitNets: Hints for Thin Deep Nets", "Romero, Ballas, Kahou, Chassang, "
                "Gatta, Bengio", "ICLR 2015", "HobbitLong/RepDistiller"),
    reference=fitnet, build_modules=_build, loss=_loss,
    notes="RepDistiller hints a stage map through a conv regressor; here the hint is the "
          "pooled feature (the one a cache stores with --features pool) through a Linear."))
