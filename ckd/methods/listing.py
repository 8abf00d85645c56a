"""Human-readable views of the registry: `ckd methods` and the README's methods table
(a test checks that the README holds exactly `markdown_table()`)."""

from __future__ import annotations

from ckd.methods.registry import Method, Param, all_methods

NEEDS_TEXT = {"none": "nothing", "teacher": "teacher logits", "all": "every mentor's logits"}


def _default(p: Param) -> str:
    return "null" if p.default is None else str(p.default)


def describe(m: Method) -> str:
    """A plain-text block: summary, paper, needs, parameters (default, range, help)."""
    lines = [f"{m.name}: {m.summary}"]
    if m.paper is not None:
        lines.append(f"  paper: {m.paper.cite().replace('*', '')}"
                     + (f" (code: github.com/{m.paper.code})" if m.paper.code else ""))
    needs = NEEDS_TEXT[m.mentors] if m.logit else ", ".join(m.inputs)
    impl = "fused kernel + eager reference" if m.fused else "eager"
    lines.append(f"  needs: {needs}; loss: {impl}")
    if m.logit and m.mentors != "none":
        lines.append("  mentor logits: " + (
            "dense, topk:K, sample:S (docs/SPARSE.md)" if m.sparse is not None
            else "dense only (needs every class; sparse caches are refused)"))
    shown = [p for p in m.params if p.cli]
    if shown:
        lines.append("  parameters (--param NAME=VALUE):")
        width = max(len(p.name) for p in shown)
        for p in shown:
            lines.append(f"    {p.name:<{width}}  default {_default(p)}; {p.range_text()}; "
                         f"{p.help}")
    for name, values in m.presets.items():
        lines.append(f"  preset {name} (--preset {name}): "
                     + ", ".join(f"{k}={v}" for k, v in values.items()))
    if m.notes:
        lines.append(f"  note: {m.notes}")
    return "\n".join(lines)


def markdown_table() -> str:
    """The README's methods table, generated from the registry."""
    rows = ["| method | what | reads | parameters (defaults) | paper |", "|---|---|---|---|---|"]
    for m in all_methods().values():
        params = ", ".join(f"`{p.name}={_default(p)}`" for p in m.params if p.cli) or "-"
        needs = NEEDS_TEXT[m.mentors] if m.logit else ", ".join(m.inputs)
        paper = m.paper.cite() if m.paper else "-"
        rows.append(f"| `{m.name}` | {m.summary} | {needs} | {params} | {paper} |")
    return "\n".join(rows)
