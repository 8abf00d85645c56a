"""Kernel test cases read from the method registry, not kept by hand: every logit method
with a fused form (its declared term table), with every combination of its choice
parameters (variant x granularity), plus the kernel features a numeric parameter switches
on. A method registered anywhere (a new module in ckd/methods/, or a test file) is in."""

from __future__ import annotations

import itertools

# numeric parameters whose non-default value switches a kernel feature on
FEATURES = {"classroom": [dict(delta=0.5, beta=0.5)], "tekap": [dict(n_copies=2)],
            "kd": [dict(T=3.0, alpha_ce=0.5, alpha_kd=2.0)], "aver": [dict(tau=6.0)],
            "dgkd": [dict(tau=5.0, p=0.5)]}
COUNTERS = dict(seed=3, step=7, epoch=10)


def method_cases(methods=None, *, fused: bool = True, sparse: bool = False) -> dict[str, dict]:
    """name -> distill_loss kwargs (counters included) of every registered logit method
    with a fused form (and a sparse one, if `sparse`)."""
    from ckd.methods.registry import all_methods

    cases = {}
    for name, spec in all_methods().items():
        if not spec.logit or (fused and not spec.fused) or (sparse and spec.sparse is None):
            continue
        if methods and name not in methods:
            continue
        choice = [p for p in spec.params if p.choices]
        kws = [{p.name: v for p, v in zip(choice, values, strict=True)}
               for values in itertools.product(*[p.choices for p in choice])]
        kws += FEATURES.get(name, [])
        for kw in kws:
            kw = dict(method=name, **kw, **{k: v for k, v in COUNTERS.items()
                                            if k in spec.counters})
            cases["-".join(str(v) for v in kw.values())] = kw
    return cases


def table_of(kw: dict, M: int):
    """The term table a distill_loss call with these kwargs runs (the method builds it)."""
    from ckd.methods.registry import COUNTER_DEFAULTS, get_method

    spec = get_method(kw["method"])
    given = {k: v for k, v in kw.items() if k != "method" and k not in COUNTER_DEFAULTS}
    return spec.terms(spec.resolve(given), M)
