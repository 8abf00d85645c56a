"""The logit-level methods: one declaration each (math: docs/METHODS.md).

Their eager references are in `ckd.kernels.reference` (dense mentors) and
`ckd.kernels.sparse_reference` (sparse mentors); their fused form is the term table each
builds here (`terms=`, run by the kernels); every parameter default lives here and
nowhere else.
"""

from __future__ import annotations

from ckd.kernels import reference as R
from ckd.kernels import sparse_reference as SR
from ckd.kernels.terms import (
    Decoupled,
    RandomDrop,
    Ranking,
    TermTable,
    dropped_terms,
    ranked_terms,
)
from ckd.methods.registry import Method, Paper, Param, register

CLASSROOM_PAPER = Paper(
    "Classroom-Inspired Multi-Mentor Distillation with Adaptive Learning Strategies",
    "Sarode, Khan, Shehzadi, Stricker, Afzal", "IntelliSys 2025", "saifkhichi96/classroom-kd")


def _temperature(name: str, default: float) -> Param:
    return Param(name, default, float, "softmax temperature of the distillation terms",
                 low=0.0, low_open=True)


def _ce_weight() -> Param:
    return Param("alpha_ce", 1.0, float, "weight of the cross-entropy term", low=0.0)


register(Method(
    "nokd", "cross-entropy only (the student alone)", mentors="none",
    reference=R.nokd, sparse=SR.nokd, terms=lambda p, M: TermTable()))

register(Method(
    "kd", "alpha_ce CE + alpha_kd T^2 KL(teacher_T, student_T)", mentors="teacher",
    params=(_temperature("T", 4.0), _ce_weight(),
            Param("alpha_kd", 1.0, float, "weight of the distillation term", low=0.0,
                  low_open=True)),
    paper=Paper("Distilling the Knowledge in a Neural Network", "Hinton, Vinyals, Dean",
                "NIPS Deep Learning Workshop 2014"),
    reference=R.kd, sparse=SR.kd, temperature="T",
    terms=lambda p, M: TermTable(src=(0,), weight=(p["alpha_kd"],), temp=(p["T"],),
                                 w_ce=p["alpha_ce"]),
    presets={"repdistiller": {"alpha_ce": 0.1, "alpha_kd": 0.9}},
    notes="Defaults weight CE and KD equally (1, 1); RepDistiller's and mdistiller's CIFAR "
          "recipes use 0.1 CE + 0.9 KD: `--preset repdistiller`."))

register(Method(
    "aver", "CE + every mentor's T^2 KL at one fixed temperature, equal weights",
    mentors="all", params=(_temperature("tau", 12.0),),
    paper=CLASSROOM_PAPER, reference=R.aver, sparse=SR.aver, temperature="tau",
    terms=lambda p, M: TermTable(src=tuple(range(M)), weight=(1.0,) * M, temp=(p["tau"],) * M),
    notes="The AVER baseline of the ClassroomKD paper (its Eq. 12)."))

register(Method(
    "dgkd", "each mentor dropped with probability p per step, the kept ones averaged",
    mentors="all",
    params=(_temperature("tau", 12.0),
            Param("p", 0.5, float, "probability of dropping each mentor in a step",
                  low=0.0, high=1.0, high_open=True)),
    paper=Paper("Densely Guided Knowledge Distillation using Multiple Teacher Assistants",
                "Son, Na, Choi, Hwang", "ICCV 2021"),
    reference=R.dgkd, sparse=SR.dgkd, temperature="tau", counters=("seed", "step"),
    terms=lambda p, M: dropped_terms(M, RandomDrop(p["p"], p["tau"])),
    notes="The drop is keyed by (seed, step, mentor): a resumed run drops the same mentors. "
          "If every mentor is dropped the teacher is kept."))


def _tekap_check(p: dict) -> str | None:
    if p["lam_clean"] + p["n_copies"] * p["lam_noisy"] <= 0:
        return "lam_clean + n_copies * lam_noisy must be > 0 (else nothing is distilled)"
    return None


register(Method(
    "tekap", "teacher logits plus n_copies Gaussian-perturbed copies, each distilled",
    mentors="teacher",
    params=(_temperature("T", 4.0),
            Param("a", 0.1, float, "noise mix: copy = a * noise + (1 - a) * teacher",
                  low=0.0, high=1.0),
            Param("n_copies", 3, int, "number of perturbed copies", low=0),
            Param("lam_clean", 1.0, float, "weight of the clean teacher's term", low=0.0),
            Param("lam_noisy", 0.8, float, "weight of each perturbed copy's term", low=0.0),
            _ce_weight()),
    paper=Paper("Single Teacher, Multiple Perspectives: Teacher Knowledge Augmentation "
                "for Enhanced Knowledge Distillation",
                "Hossain, Akhter, Hong, Huh", "ICLR 2025", "mdimtiazh/TeKAP"),
    reference=R.tekap, sparse=SR.tekap, temperature="T", counters=("seed", "step"),
    terms=lambda p, M: TermTable(
        src=(0,) * (p["n_copies"] + 1), copy=tuple(range(-1, p["n_copies"])),
        weight=(p["lam_clean"],) + (p["lam_noisy"],) * p["n_copies"],
        temp=(p["T"],) * (p["n_copies"] + 1), w_ce=p["alpha_ce"], noise_a=p["a"]),
    check=_tekap_check,
    notes="Noise is drawn in the kernel from a counter-based generator keyed by (seed, step)."))

register(Method(
    "dkd", "alpha_ce CE + warm-up * (dkd_alpha TCKD + dkd_beta NCKD)", mentors="teacher",
    params=(_temperature("T", 4.0), _ce_weight(),
            Param("dkd_alpha", 1.0, float, "weight of the target-class term TCKD", low=0.0),
            Param("dkd_beta", 8.0, float, "weight of the non-target term NCKD", low=0.0),
            Param("warmup", 20, int, "epochs over which the DKD term ramps up linearly",
                  low=1)),
    paper=Paper("Decoupled Knowledge Distillation", "Zhao, Cui, Song, Qiu, Liang",
                "CVPR 2022", "megvii-research/mdistiller"),
    reference=R.dkd, temperature="T", counters=("epoch",),
    terms=lambda p, M: Decoupled(p["T"], p["alpha_ce"], p["dkd_alpha"], p["dkd_beta"],
                                 p["warmup"]),
    check=lambda p: None if p["dkd_alpha"] + p["dkd_beta"] > 0
    else "dkd_alpha + dkd_beta must be > 0 (else nothing is distilled)",
    notes="The warm-up factor is min(epoch / warmup, 1) with epochs counted from 1, as in "
          "mdistiller: the first epoch already has 1/warmup. The authors use dkd_beta 8, "
          "or 2 for resnet56->resnet20 and resnet110->resnet32, 6 for vgg13->vgg8 and the "
          "wrn_40_2 pairs."))

def _classroom_terms(p: dict, M: int) -> TermTable:
    official = p["variant"] == "official"
    return ranked_terms(M, Ranking(
        lam=float(M if p["lam"] is None else p["lam"]), tau=p["tau"], beta=p["beta"],
        delta=p["delta"], official=official, per_sample=p["granularity"] == "sample",
        delta_term=not official and p["delta"] != 0.0))


register(Method(
    "classroom", "mentors ranked against the student, weaker ones masked, per-mentor "
    "temperatures", mentors="all",
    params=(_temperature("tau", 12.0),
            Param("beta", 1.0, float, "weight of the mentoring (distillation) terms",
                  low=0.0, low_open=True),
            Param("delta", 0.0, float, "weight of the extra CE + teacher KL at T = 1 "
                  "(paper variant)", low=0.0),
            Param("lam", None, float, "rank scale lambda; null = the number of mentors",
                  low=0.0, low_open=True, optional=True),
            Param("variant", "paper", str, "paper: the paper's equations; official: the "
                  "authors' released code", choices=("paper", "official")),
            Param("granularity", "batch", str, "rank per batch or per sample",
                  choices=("batch", "sample")),
            Param("rank_logits", None, object, "student logits used only for ranking "
                  "(a testing hook that holds the selection fixed)", cli=False)),
    paper=CLASSROOM_PAPER, reference=R.classroom, sparse=SR.classroom, temperature="tau",
    terms=_classroom_terms,
    inputs=("logits", "stats"),
    notes="Defaults follow the paper (tau 12, beta 1, delta 0, lambda = number of mentors). "
          "The official variant uses geometric-mean scores, weights rounded to 2 decimals, "
          "a >= gate, and ignores beta and delta."))
