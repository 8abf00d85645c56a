"""Student-Driven KD (SDKD): a proxy teacher with the student's architecture and weights,
a trainable Feature Fusion Block (FFB) that fuses the teacher's feature into the proxy's,
and the proxy's logits teaching the student by KL: the module and loss its declaration
(`ckd.methods.feature`) uses.

The project's interpretation (docs/METHODS.md lists the alternatives):
- the proxy follows the student every step, so its forward on the step's input is the
  student's own forward without gradient: the proxy's features are the student's
  features detached and its classifier is the student's classifier with detached weights
  (no second forward, no copy of the weights);
- fusion happens at the pooled feature (the classifier's input; the one a logit cache
  stores with `--features pool`): `fused = f_proxy + W [f_proxy; f_teacher] + b`, a
  residual Linear initialised at zero, so the proxy starts as the student;
- only the FFB is trained, by the proxy's cross-entropy on the labels; the student learns
  `T^2 KL(proxy_T || student_T)` with the proxy's logits detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FeatureFusionBlock(nn.Module):
    """Residual fusion of the proxy's and the teacher's pooled features."""

    def __init__(self, s_dim: int, t_dim: int) -> None:
        super().__init__()
        self.fuse = nn.Linear(s_dim + t_dim, s_dim)
        nn.init.zeros_(self.fuse.weight)
        nn.init.zeros_(self.fuse.bias)

    def forward(self, f_proxy: Tensor, f_teacher: Tensor) -> Tensor:
        return f_proxy + self.fuse(torch.cat([f_proxy, f_teacher], 1))


def sdkd_loss(ffb: FeatureFusionBlock, f_s: Tensor, f_t: Tensor, student_logits: Tensor,
              classifier: nn.Linear, labels: Tensor, *, T: float = 4.0,
              alpha_kd: float = 1.0, alpha_ffb: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    """alpha_kd * T^2 KL(proxy_T || student_T) + alpha_ffb * CE(proxy, labels).

    The first term trains the student only (proxy logits detached), the second the FFB
    only (proxy features and classifier detached), so one backward serves both.
    """
    fused = ffb(f_s.detach().float(), f_t.float())
    proxy = F.linear(fused, classifier.weight.detach().float(),
                     None if classifier.bias is None else classifier.bias.detach().float())
    ffb_ce = F.cross_entropy(proxy, labels)
    log_p_s = F.log_softmax(student_logits.float() / T, dim=1)
    p_proxy = F.softmax(proxy.detach() / T, dim=1)
    kl = F.kl_div(log_p_s, p_proxy, reduction="batchmean") * (T * T)
    proxy_acc = (proxy.detach().argmax(1) == labels).float().mean()
    return alpha_kd * kl + alpha_ffb * ffb_ce, {"sdkd_kl": kl.detach(),
                                                "sdkd_proxy_ce": ffb_ce.detach(),
                                                "sdkd_proxy_acc": proxy_acc}
