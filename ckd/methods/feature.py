"""The feature-level methods CRD, TeKAP (F) and SDKD: one declaration each. Their modules
and eager references are in `ckd.methods.crd` and `ckd.methods.sdkd`; math and choices in
docs/METHODS.md.

A feature method's loss reads `inputs.extra` (filled by the trainer, see
`ckd.train.features.FeatureRun.extra`): `student_features` (the student's `is_feat` list),
`mentor_pool` (one [B, D_m] tensor per mentor, teacher first), `idx` (dataset indices),
`classifier` (the student's final Linear).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ckd.methods.crd import CRDModule, crd_loss, tekap_feature_loss
from ckd.methods.registry import Method, Paper, Param, register
from ckd.methods.sdkd import FeatureFusionBlock, sdkd_loss

CRD_PAPER = Paper("Contrastive Representation Distillation", "Tian, Krishnan, Isola",
                  "ICLR 2020", "HobbitLong/RepDistiller")
TEKAP_PAPER = Paper("Single Teacher, Multiple Perspectives: Teacher Knowledge Augmentation "
                    "for Enhanced Knowledge Distillation", "Hossain, Akhter, Hong, Huh",
                    "ICLR 2025", "mdimtiazh/TeKAP")
SDKD_PAPER = Paper("Guiding Yourself with Your Own Insights: Student-Driven Knowledge "
                   "Distillation", "Qi, Zhang, Wang, Fang, Zhang, Wang, Ding", "ICME 2025")

CRD_PARAMS = (  # RepDistiller's train_student.py defaults
    Param("feat_dim", 128, int, "dimension of the embedding space", low=1),
    Param("nce_k", 16384, int, "negatives per sample, drawn from the other classes", low=1),
    Param("nce_t", 0.07, float, "NCE temperature", low=0.0, low_open=True),
    Param("nce_m", 0.5, float, "momentum of the memory update", low=0.0, high=1.0,
          high_open=True),
)


def _pooled_dims(student_shapes, mentor_shapes) -> tuple[int, int]:
    return int(student_shapes[-1][0]), int(mentor_shapes[0][-1][0])


def _build_crd(student_shapes, mentor_shapes, params: dict[str, Any],
               context=None) -> nn.Module:
    if context is None:
        raise ValueError("crd's memory needs the training labels: build it through the "
                         "trainer (context=BuildContext(...))")
    s_dim, t_dim = _pooled_dims(student_shapes, mentor_shapes)
    return CRDModule(s_dim, t_dim, context.train_labels, feat_dim=params["feat_dim"],
                     nce_k=params["nce_k"], nce_t=params["nce_t"], nce_m=params["nce_m"])


def _teacher_pool(inputs) -> Any:
    return inputs.extra["mentor_pool"][0]


def _crd(inputs, module, *, feat_dim, nce_k, nce_t, nce_m, seed, step):
    return crd_loss(module, inputs.extra["student_features"][-1], _teacher_pool(inputs),
                    inputs.labels, inputs.extra["idx"], seed=seed, step=step)


def _tekap_f(inputs, module, *, feat_dim, nce_k, nce_t, nce_m, n_copies, a, noise_std,
             lam_clean, lam_noisy, seed, step):
    return tekap_feature_loss(module, inputs.extra["student_features"][-1],
                              _teacher_pool(inputs), inputs.labels, inputs.extra["idx"],
                              seed=seed, step=step, n_copies=n_copies, a=a,
                              noise_std=noise_std, lam_clean=lam_clean, lam_noisy=lam_noisy)


def _build_sdkd(student_shapes, mentor_shapes, params, context=None) -> nn.Module:
    return FeatureFusionBlock(*_pooled_dims(student_shapes, mentor_shapes))


def _sdkd(inputs, module, *, T, alpha_kd, alpha_ffb):
    return sdkd_loss(module, inputs.extra["student_features"][-1], _teacher_pool(inputs),
                     inputs.student_logits, inputs.extra["classifier"], inputs.labels, T=T,
                     alpha_kd=alpha_kd, alpha_ffb=alpha_ffb)


register(Method(
    "crd", "contrastive NCE between embedded student and teacher pooled features, "
    "negatives from a momentum memory", mentors="teacher", logit=False, inputs=("pool",),
    params=CRD_PARAMS, paper=CRD_PAPER, reference=crd_loss, counters=("seed", "step"),
    build_modules=_build_crd, loss=_crd,
    notes="RepDistiller runs it as CE + 0.8 * crd (`--method 0.8*crd`, or kd+0.8*crd for "
          "CRD+KD). The memories (2 x n_data x feat_dim fp32) live on the training device."))


def _tekap_check(p: dict) -> str | None:
    if p["lam_clean"] + p["n_copies"] * p["lam_noisy"] <= 0:
        return "lam_clean + n_copies * lam_noisy must be > 0 (else nothing is distilled)"
    return None


register(Method(
    "tekap-f", "TeKAP's feature level: CRD on the teacher feature plus a pass per noisy "
    "copy (1 - a) f_t + a * noise_std * N(0, 1)", mentors="teacher", logit=False,
    inputs=("pool",),
    params=(*CRD_PARAMS,
            Param("n_copies", 1, int, "noisy copies of the teacher feature", low=0),
            Param("a", 0.1, float, "noise mix: copy = (1 - a) f_t + a * noise", low=0.0,
                  high=1.0),
            Param("noise_std", 0.1, float, "standard deviation of the noise", low=0.0),
            Param("lam_clean", 1.0, float, "weight of the clean CRD pass", low=0.0),
            Param("lam_noisy", 1.0, float, "weight of each noisy pass", low=0.0)),
    paper=TEKAP_PAPER, reference=tekap_feature_loss, counters=("seed", "step"),
    check=_tekap_check, build_modules=_build_crd, loss=_tekap_f,
    notes="Defaults as the authors' crd/criterion.py (one copy, 0.9 f + 0.1 * N(0, 0.1^2), "
          "loss + loss_1). TeKAP F+L: `--method tekap+0.8*tekap-f`."))

register(Method(
    "sdkd", "proxy teacher = the student's own forward, its pooled feature fused with the "
    "teacher's by a trainable FFB; the proxy's logits teach the student by KL",
    mentors="teacher", logit=False, inputs=("pool",),
    params=(Param("T", 4.0, float, "temperature of the proxy -> student KL", low=0.0,
                  low_open=True),
            Param("alpha_kd", 1.0, float, "weight of T^2 KL(proxy || student)", low=0.0),
            Param("alpha_ffb", 1.0, float, "weight of the proxy's CE (trains the FFB)",
                  low=0.0)),
    paper=SDKD_PAPER, reference=sdkd_loss, build_modules=_build_sdkd, loss=_sdkd,
    notes="The paper leaves the proxy's update, the fused stage and the FFB's form open; "
          "ckd's reading (proxy follows the student every step, fusion at the pooled "
          "feature, residual Linear FFB trained by the proxy's CE) and the alternatives "
          "are in docs/METHODS.md."))
