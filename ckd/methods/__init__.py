"""Distillation methods as data: the registry (`registry.py`), the logit methods'
declarations (`logit.py`) and method sums with the per-step loss (`compose.py`).

A new method is one module here that calls `register(Method(...))` (docs/METHODS.md)."""

from ckd.methods.compose import (
    LossPlan,
    StepInputs,
    Term,
    make_plan,
    method_mentors,
    parse_method,
    resolve_terms,
    select_mentors,
)
from ckd.methods.loss import distill_loss, logit_method
from ckd.methods.registry import (
    Method,
    MethodError,
    Paper,
    Param,
    all_methods,
    get_method,
    method_names,
    register,
)

__all__ = ["LossPlan", "Method", "MethodError", "Paper", "Param", "StepInputs", "Term",
           "all_methods", "distill_loss", "get_method", "logit_method", "make_plan",
           "method_mentors", "method_names", "parse_method", "register", "resolve_terms",
           "select_mentors"]
