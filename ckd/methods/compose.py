"""Method expressions and the loss a trainer calls.

`--method classroom`, `--method kd+0.5*crd`: a sum of registered methods, each with an
optional positive weight. At most one term is a logit method (its loss carries the CE
term; without one, `nokd` supplies CE); the other terms (feature methods) add their own
losses. `LossPlan.loss(...)` is the single composition point the trainer calls each step.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from ckd.methods import loss as loss_module  # a module attribute: tests wrap distill_loss
from ckd.methods.registry import COUNTERS, Method, MethodError, get_method

_TERM = re.compile(r"^\s*(?:(?P<w>[0-9.eE+-]+)\s*\*\s*)?(?P<name>[A-Za-z0-9_-]+)\s*$")


@dataclass(frozen=True)
class Term:
    method: Method
    weight: float
    params: dict[str, Any]


def parse_method(expr: str) -> list[tuple[float, str]]:
    """`'kd+0.5*crd'` -> `[(1.0, 'kd'), (0.5, 'crd')]`; names are checked, weights > 0."""
    if not isinstance(expr, str) or not expr.strip():
        raise MethodError(f"--method {expr!r}: give a method name, e.g. classroom, or a "
                          "sum such as kd+0.5*crd (list them with `ckd methods`)")
    terms, seen = [], set()
    for part in _split_sum(expr):
        m = _TERM.match(part)
        if m is None:
            raise MethodError(f"--method {expr!r}: cannot read term {part!r}; write NAME or "
                              "WEIGHT*NAME joined by +, e.g. kd+0.5*crd")
        w = 1.0 if m["w"] is None else _weight(m["w"], expr)
        name = get_method(m["name"]).name
        if name in seen:
            raise MethodError(f"--method {expr!r}: {name} appears twice")
        seen.add(name)
        terms.append((w, name))
    return terms


def _split_sum(expr: str) -> list[str]:
    # split on '+' except inside a number's exponent (1e+3)
    return [p for p in re.split(r"(?<![eE])\+", expr)]


def _weight(text: str, expr: str) -> float:
    try:
        w = float(text)
    except ValueError:
        w = float("nan")
    if not math.isfinite(w) or w <= 0:
        raise MethodError(f"--method {expr!r}: term weight {text!r} must be a number > 0")
    return w


def resolve_terms(expr: str, params: Mapping[str, Any] | None = None,
                  preset: str | None = None,
                  shortcuts: Mapping[str, Any] | None = None) -> tuple[Term, ...]:
    """Every term with its checked parameters.

    params: `key` (the one term that declares it) or `method.key`; preset: applied to each
    term that declares it; shortcuts: `--tau` (the logit method's temperature parameter),
    `--beta`, `--delta`, `--lam`, `--variant`, `--granularity` (the parameter of that name)."""
    parsed = parse_method(expr)
    methods = [get_method(n) for _, n in parsed]
    logit = [m for m in methods if m.logit]
    if len(logit) > 1:
        raise MethodError(f"--method {expr!r}: {' and '.join(m.name for m in logit)} are both "
                          "logit methods; a sum holds at most one (each carries the CE term)")
    if not logit:
        parsed.insert(0, (1.0, "nokd"))
        methods.insert(0, get_method("nokd"))
    given: dict[str, dict[str, Any]] = {m.name: {} for m in methods}
    for key, value in (params or {}).items():
        owner, _, name = key.rpartition(".")
        if owner:
            if owner not in given:
                raise MethodError(f"--param {key}: {owner} is not a term of --method {expr}")
            given[owner][name] = value
            continue
        have = [m.name for m in methods if m.param(name) is not None and m.param(name).cli]
        if len(have) > 1:
            raise MethodError(f"--param {key}: several terms take {key} ({', '.join(have)}); "
                              f"write METHOD.{key}")
        if not have:
            raise MethodError(f"--param {key}: --method {expr} takes no parameter {key!r}; "
                              "its parameters: " + "; ".join(
                                  f"{m.name}: {m.param_names()}" for m in methods))
        given[have[0]][name] = value
    logit_m = next(m for m in methods if m.logit)
    for flag, value in (shortcuts or {}).items():
        if value is None:
            continue
        name = logit_m.temperature if flag == "tau" else flag
        if name is None or logit_m.param(name) is None:
            raise MethodError(f"--{flag} {value}: method {logit_m.name} has no such "
                              f"parameter (its parameters: {logit_m.param_names()})")
        given[logit_m.name].setdefault(name, value)  # an explicit --param wins
    if preset is not None and not any(preset in m.presets for m in methods):
        have = sorted({p for m in methods for p in m.presets}) or ["none"]
        raise MethodError(f"--preset {preset}: no term of --method {expr} has it (presets: "
                          f"{', '.join(have)})")
    return tuple(Term(m, w, m.resolve(given[m.name], preset if preset in m.presets else None,
                                      cli=True))
                 for (w, _), m in zip(parsed, methods, strict=True))


def method_mentors(expr: str) -> str:
    """What a method expression reads from the mentors: none, teacher or all."""
    order = ("none", "teacher", "all")
    return max((get_method(n).mentors for _, n in parse_method(expr)), key=order.index)


def select_mentors(expr: str, mentors: list[str]) -> list[str]:
    """The mentors a method reads (teacher first); error when it needs one and has none."""
    need = method_mentors(expr)
    if need == "none":
        return []
    if not mentors:
        raise MethodError(f"method {expr!r} needs a teacher but no mentors were given: pass "
                          "--cache DIR (a logit cache) or --mentors-online with --mentors, "
                          "or use --method nokd")
    return mentors[:1] if need == "teacher" else list(mentors)


@dataclass
class StepInputs:
    """What one training step hands to the methods' losses."""

    student_logits: Tensor
    mentor_logits: Tensor | None
    labels: Tensor
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. features, maps


@dataclass
class LossPlan:
    """The resolved loss of a run: `loss(...)` each step, `describe()` for the metrics."""

    expr: str
    terms: tuple[Term, ...]
    backend: str = "auto"

    @property
    def logit_term(self) -> Term:
        return next(t for t in self.terms if t.method.logit)

    @property
    def reads_mentor_stats(self) -> bool:
        """The logit term ranks from the mentors' row statistics (`ckd.mentor_stats`)."""
        return "stats" in self.logit_term.method.inputs

    def build_modules(self, student_shapes: Any, mentor_shapes: Any,
                      context: Any = None) -> nn.ModuleDict | None:
        """Trainable modules of the terms that own some, keyed by method name. `context`
        (`ckd.train.features.BuildContext`: training labels...) is passed on when given."""
        mods = {}
        extra = {} if context is None else {"context": context}
        for t in self.terms:
            if t.method.build_modules is not None:
                mod = t.method.build_modules(student_shapes, mentor_shapes, t.params, **extra)
                if mod is not None:
                    mods[t.method.name] = mod
        return nn.ModuleDict(mods) if mods else None

    def describe(self) -> dict[str, Any]:
        return {"method": self.expr, "backend": self.backend,
                "terms": [{"method": t.method.name, "weight": t.weight,
                           "params": {k: v for k, v in t.params.items()
                                      if t.method.param(k).cli}} for t in self.terms]}

    def loss(self, student_logits: Tensor, mentor_logits: Tensor | None, labels: Tensor, *,
             epoch: int | Tensor = 0, step: int | Tensor = 0, seed: int = 0,
             modules: nn.ModuleDict | None = None, mentor_stats: Tensor | None = None,
             validate: bool | str = "auto", **extra: Any):
        """The weighted sum of the terms -> DistillOutput (stats of the logit term, plus
        `<method>_<stat>` of the others). `epoch` is the 0-based epoch index; methods see
        it counted from 1, as mdistiller's trainer counts (DKD's warm-up). `epoch` and
        `step` may be 0-dim device tensors (a captured step). `mentor_stats`: the mentors'
        row statistics (the cache stores them) and `validate` (its label check) for
        `distill_loss`."""
        counters = {"seed": seed, "step": step, "epoch": epoch + 1}
        assert set(counters) == set(COUNTERS)
        lt = self.logit_term
        out = loss_module.distill_loss(student_logits, mentor_logits, labels, method=lt.method.name,
                           backend=self.backend, mentor_stats=mentor_stats, validate=validate,
                           **_without_hooks(lt),
                           **{k: counters[k] for k in lt.method.counters})
        if lt.weight != 1.0:
            out.loss = out.loss * lt.weight
        inputs = None
        for t in self.terms:
            if t.method.logit:
                continue
            if inputs is None:
                inputs = StepInputs(student_logits, mentor_logits, labels, extra)
            mod = None if modules is None or t.method.name not in modules \
                else modules[t.method.name]
            loss, stats = t.method.loss(inputs, mod, **t.params,
                                        **{k: counters[k] for k in t.method.counters})
            out.loss = out.loss + t.weight * loss
            out.stats.update({f"{t.method.name}_{k}": v for k, v in stats.items()})
        return out


def _without_hooks(term: Term) -> dict[str, Any]:
    return {k: v for k, v in term.params.items() if term.method.param(k).cli}


def make_plan(expr: str, params: Mapping[str, Any] | None = None, preset: str | None = None,
              shortcuts: Mapping[str, Any] | None = None, backend: str = "auto") -> LossPlan:
    """The loss of a run. Capabilities are checked here, before any step: an explicit
    `backend="triton"` refuses a logit method without a fused form (its term table)."""
    terms = resolve_terms(expr, params, preset, shortcuts)
    logit = next(t.method for t in terms if t.method.logit)
    if backend == "triton" and not logit.fused:
        raise MethodError(f"method {logit.name!r} has no fused kernel form (its declaration "
                          "gives no `terms`): use --backend reference or auto, which runs "
                          "its eager reference")
    return LossPlan(expr, terms, backend)
