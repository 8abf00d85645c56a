"""Methods are data: what each one needs from the mentors and its `distill_loss` defaults.

The loss itself lives in `ckd.kernels.distill_loss`; the trainer only decides which
mentors to read, which keyword arguments to pass and which per-step counters to add.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class MethodSpec:
    mentors: str  # "none" | "teacher" (mentor 0 only) | "all"
    defaults: dict[str, Any] = field(default_factory=dict)
    # config fields forwarded to distill_loss when set (tau/beta/delta/lam/variant/...);
    # "T" means the config's --tau passed under distill_loss's name `T` (kd, tekap, dkd)
    uses: tuple[str, ...] = ()
    # counters the kernel needs each step: "epoch" (dkd warm-up), "seed" and "step" (keys of
    # the counter-based random draws of dgkd/tekap, so a resumed run draws the same)
    counters: tuple[str, ...] = ()
    description: str = ""


METHODS: dict[str, MethodSpec] = {
    "nokd": MethodSpec("none", {}, (), (), "cross-entropy only"),
    "kd": MethodSpec("teacher", {"T": 4.0}, ("T",), (), "Hinton KD from the teacher"),
    "aver": MethodSpec("all", {"tau": 12.0}, ("tau",), (),
                       "CE + every mentor's KD at a fixed tau (paper Eq. 12)"),
    "dgkd": MethodSpec("all", {"tau": 12.0, "p": 0.5}, ("tau",), ("seed", "step"),
                       "random mentor drop (keyed by seed, step), the rest averaged"),
    "tekap": MethodSpec("teacher", {"T": 4.0}, ("T",), ("seed", "step"),
                        "teacher logits + noisy perturbed copies (keyed by seed, step)"),
    "dkd": MethodSpec("teacher", {"T": 4.0}, ("T",), ("epoch",),
                      "decoupled KD (TCKD + NCKD) with a 20-epoch warm-up"),
    "classroom": MethodSpec("all", {"tau": 12.0, "beta": 1.0, "delta": 0.0},
                            ("tau", "beta", "delta", "lam", "variant", "granularity"), (),
                            "ClassroomKD: ranked, filtered, per-mentor temperatures"),
}


def method_defaults(name: str) -> dict[str, Any]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return dict(METHODS[name].defaults)


def select_mentors(name: str, mentors: list[str]) -> list[str]:
    """The mentors a method reads (teacher first); error when it needs one and has none."""
    spec = METHODS[name]
    if spec.mentors == "none":
        return []
    if not mentors:
        raise ValueError(f"method {name!r} needs a teacher but no mentors were given: pass "
                         "--cache DIR (a logit cache) or --mentors-online with --mentors, "
                         "or use --method nokd")
    return mentors[:1] if spec.mentors == "teacher" else list(mentors)


def loss_kwargs(name: str, *, num_mentors: int, tau: float | None = None,
                beta: float | None = None, delta: float | None = None,
                lam: float | None = None, variant: str = "paper", granularity: str = "batch",
                backend: str = "auto", extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments for `distill_loss(student, mentors, labels, **kw)`."""
    spec = METHODS[name]
    kw: dict[str, Any] = {"method": name, "backend": backend}
    kw.update(spec.defaults)
    given = {"tau": tau, "T": tau, "beta": beta, "delta": delta, "variant": variant,
             "granularity": granularity,
             "lam": lam if lam is not None else float(num_mentors)}
    for key in spec.uses:
        if given[key] is not None:
            kw[key] = float(given[key]) if key in ("tau", "T", "beta", "delta", "lam") \
                else given[key]
    kw.update(extra or {})
    return kw
