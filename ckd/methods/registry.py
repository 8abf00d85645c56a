"""The method registry: one declaration per distillation method (docs/METHODS.md).

A method is data: its name, paper, what it reads from the mentors, its parameters (default,
type, valid range, help), its eager reference, and its capabilities: the term table the
fused kernels run (`terms`) and its sparse-mentor reference (`sparse`).
The CLI (`--method` choices, `--param` help, `ckd methods`), config validation, the
trainer's loss and the README's methods table are all read from here.

Adding a method = one new module in `ckd/methods/` that calls `register(Method(...))`;
modules in this package are discovered on first lookup, so nothing else is edited.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckd.options import OptionError, Param

MENTOR_NEEDS = ("none", "teacher", "all")  # teacher = mentor 0 only
# per-step counters a trainer supplies (see `ckd.methods.compose.LossPlan.loss`), with the
# values used when none is given; `epoch` counts from 1 and None means "past any warm-up"
COUNTER_DEFAULTS: dict[str, Any] = {"seed": 0, "step": 0, "epoch": None}
COUNTERS = tuple(COUNTER_DEFAULTS)


class MethodError(OptionError):
    """A bad method name, expression, parameter or parameter value (a usage error)."""


@dataclass(frozen=True)
class Paper:
    title: str
    authors: str
    venue: str  # e.g. "ICLR 2025"
    code: str = ""  # the authors' code, owner/repo on GitHub

    def cite(self) -> str:
        return f"{self.authors}, *{self.title}*, {self.venue}"


@dataclass(frozen=True)
class Method:
    """One distillation method.

    reference: eager `f(student_logits, mentor_logits, labels, **params, **counters)
        -> (loss, stats)` (the contract the fused kernels are tested against).
    terms: its fused form, `terms(params, M) -> ckd.kernels.TermTable | Decoupled` (the
        kernels run the table; None: no fused form, the reference runs on every backend
        but an explicit `triton`, which is refused by name).
    sparse: eager reference on sparse mentors, `f(student_logits, SparseMentors, labels,
        **params, **counters)` (None: dense mentors only; with `terms`, sparse mentors
        also run fused).
    logit: the method is a `distill_loss` method (reads logits; its loss includes the CE
        term). Methods with `loss` instead (feature methods) add a term without CE.
    temperature: the parameter that the trainer's `--tau` shortcut sets.
    counters: per-step counters the reference takes (`seed`, `step`, `epoch`).
    presets: named parameter sets, e.g. another codebase's defaults.
    check: cross-parameter constraint, `check(params) -> error text | None`.
    build_modules: `(student_feature_shapes, mentor_feature_shapes, params)
        -> nn.ModuleDict | None`, trainable parts the method owns (optimised with the
        student, saved in checkpoints).
    loss: for non-logit methods, `loss(inputs: StepInputs, modules, **params, **counters)
        -> (loss, stats)`; see `ckd.methods.compose`.
    """

    name: str
    summary: str
    mentors: str  # one of MENTOR_NEEDS
    params: tuple[Param, ...] = ()
    paper: Paper | None = None
    reference: Callable | None = None
    terms: Callable | None = None
    sparse: Callable | None = None
    logit: bool = True
    # what it reads from the mentors; "stats": their row statistics (ckd.mentor_stats), which
    # the fused kernels rank from instead of a pass over the mentor logits
    inputs: tuple[str, ...] = ("logits",)
    temperature: str | None = None
    counters: tuple[str, ...] = ()
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    check: Callable[[dict[str, Any]], str | None] | None = None
    build_modules: Callable | None = None
    loss: Callable | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        if self.mentors not in MENTOR_NEEDS:
            raise ValueError(f"{self.name}: mentors must be one of {MENTOR_NEEDS}")
        if self.logit == (self.loss is not None):
            raise ValueError(f"{self.name}: a method is either a logit method (distill_loss) "
                             "or has its own `loss`")
        bad = set(self.counters) - set(COUNTERS)
        if bad:
            raise ValueError(f"{self.name}: unknown counters {sorted(bad)}")
        for preset in self.presets.values():
            self.resolve(preset)  # a preset must itself be valid

    @property
    def fused(self) -> bool:
        """The fused kernels compute it (it declares its term table)."""
        return self.terms is not None

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def resolve(self, given: Mapping[str, Any] | None = None, preset: str | None = None,
                *, cli: bool = False) -> dict[str, Any]:
        """All parameters: defaults < preset < given, each checked against its range.
        `cli=True` refuses programmatic hooks (parameters declared with cli=False)."""
        values = self.defaults()
        if preset is not None:
            if preset not in self.presets:
                have = ", ".join(self.presets) or "none"
                raise MethodError(f"method {self.name!r} has no preset {preset!r} "
                                  f"(its presets: {have})")
            values.update(self.presets[preset])
        for key, value in (given or {}).items():
            p = self.param(key)
            if p is None or (cli and not p.cli):
                raise MethodError(f"method {self.name!r} takes no parameter {key!r}; its "
                                  f"parameters: {self.param_names()}")
            values[key] = value
        where = f"method {self.name}: "
        try:
            out = {p.name: p.check(values[p.name], where) for p in self.params}
        except OptionError as err:
            raise MethodError(str(err)) from None
        problem = self.check(out) if self.check else None
        if problem:
            raise MethodError(where + problem)
        return out

    def counter_values(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The counters this method takes: given values, else COUNTER_DEFAULTS."""
        return {k: given.get(k, COUNTER_DEFAULTS[k]) for k in self.counters}

    def run_reference(self, student_logits, mentor_logits, labels, **kw: Any):
        """The eager reference with defaults filled in: `kw` holds parameters and counters."""
        counters = self.counter_values(kw)
        params = self.resolve({k: v for k, v in kw.items() if k not in COUNTER_DEFAULTS})
        return self.reference(student_logits, mentor_logits, labels, **params, **counters)

    def run_sparse_reference(self, student_logits, sparse_mentors, labels, **kw: Any):
        """The eager reference on sparse mentors, defaults filled in."""
        if self.sparse is None:
            raise MethodError(f"method {self.name!r} has no sparse-mentor form")
        counters = self.counter_values(kw)
        params = self.resolve({k: v for k, v in kw.items() if k not in COUNTER_DEFAULTS})
        return self.sparse(student_logits, sparse_mentors, labels, **params, **counters)

    def param_names(self) -> str:
        return ", ".join(p.name for p in self.params if p.cli) or "none"


_REGISTRY: dict[str, Method] = {}
_discovered = False


def register(method: Method) -> Method:
    """Add a method (once: a second method of the same name is an error)."""
    if method.name in _REGISTRY and _REGISTRY[method.name] is not method:
        raise ValueError(f"method {method.name!r} is registered twice")
    if not method.name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"method name {method.name!r}: letters, digits, - and _ only")
    _REGISTRY[method.name] = method
    return method


def _discover() -> None:
    """Import every module of this package once (each registers its methods)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        importlib.import_module(f"{__package__}.{info.name}")


def all_methods() -> dict[str, Method]:
    """Every registered method, by name: the logit methods in registration order, then
    the others by name (an order independent of which module was imported first)."""
    _discover()
    logit = [(n, m) for n, m in _REGISTRY.items() if m.logit]
    other = sorted((n, m) for n, m in _REGISTRY.items() if not m.logit)
    return dict(logit + other)


def method_names() -> tuple[str, ...]:
    return tuple(all_methods())


def get_method(name: str) -> Method:
    _discover()
    method = _REGISTRY.get(name)  # a lookup: the loss calls this every step
    if method is None:
        raise MethodError(f"unknown method {name!r}; valid: {', '.join(all_methods())}")
    return method
