"""How far ckd is from one-way imports and one dataset protocol: counts for the house refactor.

    .venv/bin/python scripts/house_counts.py [--json] [--root .]
    .venv/bin/python scripts/house_counts.py --importlinter-ignores   # pyproject ignore lists
    .venv/bin/python scripts/house_counts.py --write-ignores          # ... written in place
    .venv/bin/python scripts/house_counts.py --layers-diagram         # docs/ARCHITECTURE.md

What is counted (import statements and annotations are found with `ast`; the import graph is
grimp's, the one import-linter checks, so counts (d) and (e) agree with `lint-imports`):

(a) function_imports: `import` / `from ... import` statements inside a function body (a
    statement, not each imported name), and how many carry `noqa: PLC0415` on one of their
    lines; split into ckd's own (absolute `from ckd...`, relative `from .x`) and the rest.
(b) any_annotations: parameter, return and variable annotations that are exactly `Any`
    (`x: Any`, `-> Any`); annotations that merely contain it (`dict[str, Any]`) separately.
(c) dataset_kind: tests of which kind of dataset a value is: `isinstance(x, ImageViews)`,
    a call to `is_image_data` / `is_image_folder`, a comparison with "rrc" or
    `RRC_RECIPE_NAME`, and every later read of a name or attribute assigned from one of
    those in the same file (`self.rrc`, `images_mode`). `branches` are the `if` / `while` /
    conditional expressions / comprehension filters whose test holds one.
(d) upward_imports: direct imports that break the layers / forbidden contracts declared in
    pyproject.toml [tool.importlinter], one per (importer, imported) module pair.
(e) cycles: strongly connected components of the import graph, between ckd's top-level
    packages/modules and between all modules (function-level imports included).
(f) readme: README.md's line count and its Layout section's package list.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import re
import sys
import tomllib
from collections import defaultdict
from pathlib import Path

PACKAGE = "ckd"
KIND_CALLS = {"is_image_data", "is_image_folder"}
KIND_CLASSES = {"ImageViews"}
KIND_CONSTANTS = {"rrc"}
KIND_NAMES = {"RRC_RECIPE_NAME"}
HOUSE_COMMENT = "to be removed by the house refactor"


def source_files(root: Path) -> list[Path]:
    return sorted((root / PACKAGE).rglob("*.py"))


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def inside_function(node: ast.AST, up: dict[ast.AST, ast.AST]) -> bool:
    while node in up:
        node = up[node]
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            return True
    return False


# --- (a) imports inside functions ---------------------------------------------------------

def function_imports(root: Path) -> dict:
    total = noqa = internal = relative = 0
    per_file: dict[str, int] = {}
    for path in source_files(root):
        lines = path.read_text().splitlines()
        tree = parse(path)
        up = parents(tree)
        n = 0
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom) or not inside_function(node, up):
                continue
            n += 1
            text = "\n".join(lines[node.lineno - 1:node.end_lineno])
            noqa += "PLC0415" in text
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""]
            is_relative = isinstance(node, ast.ImportFrom) and node.level > 0
            relative += is_relative
            internal += is_relative or any(m == PACKAGE or m.startswith(PACKAGE + ".")
                                           for m in names)
        if n:
            per_file[str(path.relative_to(root))] = n
        total += n
    return {"total": total, "noqa_PLC0415": noqa, "ckd_internal": internal,
            "ckd_absolute": internal - relative, "ckd_relative": relative,
            "other": total - internal, "files": len(per_file), "per_file": per_file}


# --- (b) Any annotations ------------------------------------------------------------------

def _annotation(node: ast.expr | None) -> ast.expr | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):  # "Any" as a string
        try:
            return ast.parse(node.value, mode="eval").body
        except SyntaxError:
            return None
    return node


def _is_any(node: ast.expr | None) -> bool:
    return (isinstance(node, ast.Name) and node.id == "Any") or (
        isinstance(node, ast.Attribute) and node.attr == "Any")


def any_annotations(root: Path) -> dict:
    nested = 0
    kinds = {"parameter": 0, "return": 0, "variable": 0}
    per_file: dict[str, int] = {}
    for path in source_files(root):
        annotations: list[tuple[str, ast.expr | None]] = []
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.arg):
                annotations.append(("parameter", node.annotation))
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                annotations.append(("return", node.returns))
            elif isinstance(node, ast.AnnAssign):
                annotations.append(("variable", node.annotation))
        n = 0
        for kind, ann in annotations:
            ann = _annotation(ann)
            if ann is None:
                continue
            if _is_any(ann):
                n += 1
                kinds[kind] += 1
            elif any(_is_any(sub) for sub in ast.walk(ann)):
                nested += 1
        if n:
            per_file[str(path.relative_to(root))] = n
    return {"bare_Any": sum(kinds.values()), **kinds, "containing_Any": nested,
            "files": len(per_file),
            "per_file": per_file}


# --- (c) branches on dataset kind ---------------------------------------------------------

def _callee(node: ast.Call) -> str:
    f = node.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


def _target_key(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return f"{node.value.id}.{node.attr}"
    return None


def _is_kind_test(node: ast.AST, flags: set[str]) -> bool:
    if isinstance(node, ast.Call):
        name = _callee(node)
        if name in KIND_CALLS:
            return True
        if name == "isinstance" and len(node.args) == 2:
            classes = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
            return any((isinstance(c, ast.Name) and c.id in KIND_CLASSES) or (
                isinstance(c, ast.Attribute) and c.attr in KIND_CLASSES) for c in classes)
    if isinstance(node, ast.Compare):
        return any((isinstance(s, ast.Constant) and s.value in KIND_CONSTANTS) or (
            isinstance(s, ast.Name) and s.id in KIND_NAMES) for s in [node.left, *node.comparators])
    if isinstance(node, ast.Name | ast.Attribute) and isinstance(node.ctx, ast.Load):
        return _target_key(node) in flags
    return False


def _contains_kind_test(node: ast.AST, flags: set[str]) -> bool:
    return any(_is_kind_test(sub, flags) for sub in ast.walk(node))


def dataset_kind(root: Path) -> dict:
    tests = branches = 0
    per_file: dict[str, int] = {}
    for path in source_files(root):
        tree = parse(path)
        flags: set[str] = set()
        for node in ast.walk(tree):  # names assigned from a kind test become kind flags
            if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None and \
                    _contains_kind_test(node.value, set()):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                flags |= {k for k in map(_target_key, targets) if k}
        file_tests = sum(_is_kind_test(n, flags) for n in ast.walk(tree))
        file_branches = 0
        for node in ast.walk(tree):
            if isinstance(node, ast.If | ast.While | ast.IfExp):
                file_branches += _contains_kind_test(node.test, flags)
            elif isinstance(node, ast.comprehension):
                file_branches += sum(_contains_kind_test(c, flags) for c in node.ifs)
        if file_tests:
            per_file[str(path.relative_to(root))] = file_branches
        tests += file_tests
        branches += file_branches
    return {"kind_tests": tests, "branches": branches, "files": len(per_file),
            "branches_per_file": per_file}


# --- contracts and the import graph (d, e) ------------------------------------------------

def contracts(root: Path) -> dict[str, dict]:
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["id"]: c for c in config["contracts"]}


def parse_layers(contract: dict) -> list[tuple[list[str], bool]]:
    """The layers, top first: (module names, independent siblings?)."""
    container = contract.get("containers", [""])[0]
    layers = []
    for raw in contract["layers"]:
        independent = ":" not in raw
        tails = [t.strip() for t in re.split(r"[|:]", raw)]
        layers.append(([f"{container}.{t}" if container else t for t in tails], independent))
    return layers


def import_graph(root: Path):
    try:
        import grimp  # noqa: PLC0415 - only (d), (e) and the contracts need it
    except ImportError:
        sys.exit("grimp is missing: install import-linter (it is in scripts/setup.sh)")
    sys.path.insert(0, str(root))
    spec = importlib.util.find_spec(PACKAGE)  # what grimp reads: the imported ckd, if any
    if spec is None or not spec.origin or not Path(spec.origin).is_relative_to(root):
        sys.exit(f"{PACKAGE} resolves to {spec and spec.origin}, not under {root}: "
                 f"run with PYTHONPATH={root}")
    return grimp.build_graph(PACKAGE, cache_dir=None)


def _direct_imports(graph, importer: str, imported: str) -> list[tuple[str, str, list[int]]]:
    """Direct imports from `importer` or its descendants into `imported` or its descendants."""
    targets = {imported, *graph.find_descendants(imported)} if imported in graph.modules else set()
    sources = {importer, *graph.find_descendants(importer)} if importer in graph.modules else set()
    return [(a, b, _lines(graph, a, b)) for a in sorted(sources)
            for b in sorted(graph.find_modules_directly_imported_by(a) & targets)]


def _lines(graph, importer: str, imported: str) -> list[int]:
    details = graph.get_import_details(importer=importer, imported=imported)
    return sorted(d["line_number"] for d in details)


def layer_violations(graph, contract: dict) -> list[tuple[str, str, list[int]]]:
    """Direct imports from a layer into a higher one, or between independent siblings."""
    layers = parse_layers(contract)
    rows = []
    for low, (low_names, independent) in enumerate(layers):
        for high, (high_names, _) in enumerate(layers[:low + 1]):
            for a in low_names:
                for b in high_names:
                    if a != b and (high < low or independent):
                        rows += _direct_imports(graph, a, b)
    return sorted(rows)


def forbidden_violations(graph, contract: dict) -> list[tuple[str, str, list[int]]]:
    return sorted(row for a in contract["source_modules"] for b in contract["forbidden_modules"]
                  for row in _direct_imports(graph, a, b))


def cycle_breakers(graph, ignored: list[tuple[str, str, list[int]]],
                   contract: dict) -> list[tuple[str, str, list[int]]]:
    """With the upward imports ignored, the direct imports grimp nominates to break the cycles
    left between siblings (what the acyclic_siblings contract reports), in every package."""
    for importer, imported, _ in ignored:
        graph.remove_import(importer=importer, imported=imported)
    packages = [p for a in contract["ancestors"] for p in [a, *sorted(graph.find_descendants(a))]
                if graph.find_children(p)]
    pairs = {pair for p in packages for pair in graph.nominate_cycle_breakers(p)}
    return [(a, b, _lines(graph, a, b)) for a, b in sorted(pairs)]


def contract_ignores(root: Path) -> dict[str, list[tuple[str, str, list[int]]]]:
    """Every contract's violations today, keyed by contract id (what its ignore list needs)."""
    graph = import_graph(root)
    found: dict[str, list] = {}
    for cid, c in contracts(root).items():
        if c["type"] == "layers":
            found[cid] = layer_violations(graph, c)
        elif c["type"] == "forbidden":
            found[cid] = forbidden_violations(graph, c)
    upward = sorted({r[:2]: r for rows in found.values() for r in rows}.values())
    for cid, c in contracts(root).items():
        if c["type"] == "acyclic_siblings":
            found[cid] = sorted(upward + cycle_breakers(import_graph(root), upward, c))
    return found


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's SCCs with more than one member, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            members = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                members.append(w)
                if w == v:
                    break
            if len(members) > 1:
                out.append(sorted(members))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def cycles(graph) -> dict:
    modules = defaultdict(set)
    packages = defaultdict(set)
    for m in graph.modules:
        for i in graph.find_modules_directly_imported_by(m):
            modules[m].add(i)
            a, b = (".".join(x.split(".")[:2]) for x in (m, i))
            if a != b and a != PACKAGE:
                packages[a].add(b)
    package_sccs = strongly_connected(packages)
    module_sccs = strongly_connected(modules)
    return {"package_sccs": len(package_sccs), "package_cycles": package_sccs,
            "module_sccs": len(module_sccs), "module_scc_sizes": [len(s) for s in module_sccs],
            "module_cycles": module_sccs}


# --- (f) README -------------------------------------------------------------------------

def layout_entries(readme: str) -> set[str]:
    """The `ckd/...` paths the README's Layout section names (its first code block)."""
    match = re.search(r"^## Layout\n(.*?)(?=^## |\Z)", readme, re.S | re.M)
    if not match:
        return set()
    block = re.search(r"```\w*\n(.*?)```", match.group(1), re.S)
    text = block.group(1) if block else match.group(1)
    return {m.rstrip("/") for m in re.findall(rf"\b{PACKAGE}/[\w/.]*", text)}


def package_tree(root: Path) -> set[str]:
    """ckd's packages (folders with __init__.py) and modules directly under ckd/, as
    `ckd/name` and `ckd/name.py`: what the README's Layout section must list."""
    packages = {f"{PACKAGE}/{p.parent.name}" for p in (root / PACKAGE).glob("*/__init__.py")}
    modules = {f"{PACKAGE}/{p.name}" for p in (root / PACKAGE).glob("*.py")
               if p.name != "__init__.py"}
    return packages | modules


def readme(root: Path) -> dict:
    text = (root / "README.md").read_text()
    listed = layout_entries(text)
    return {"lines": len(text.splitlines()),
            "layout_missing_packages": sorted(package_tree(root) - listed),
            "layout_stale_entries": sorted(e for e in listed if not (root / e).exists())}


# --- output -----------------------------------------------------------------------------

def layers_diagram(root: Path) -> str:
    """The layers contract as text, top first (docs/ARCHITECTURE.md, "Layers")."""
    rows = []
    for names, independent in parse_layers(contracts(root)["layers"]):
        tails = [n.removeprefix(PACKAGE + ".") for n in names]
        rows.append((" | " if independent else " : ").join(tails))
    return "\n  v\n".join(rows)


def ignore_block(rows: list[tuple[str, str, list[int]]]) -> str:
    """One contract's `ignore_imports = [...]` in TOML, a line number comment per import."""
    out = ["ignore_imports = [",
           "  # today's violations: scripts/house_counts.py --write-ignores rewrites this list"]
    out += [f'  "{a} -> {b}",  # l.{",".join(map(str, lines))}: {HOUSE_COMMENT}'
            for a, b, lines in rows]
    return "\n".join([*out, "]"])


def format_ignores(found: dict[str, list]) -> str:
    return "\n".join(f"# contract {cid}: {len(rows)} imports\n{ignore_block(rows)}"
                     for cid, rows in found.items())


IGNORES = re.compile(r"^ignore_imports = \[.*?^\]$", re.S | re.M)


def with_ignores(pyproject: str, found: dict[str, list]) -> str:
    """pyproject.toml's text with each contract's ignore_imports replaced by `found`'s (the
    contracts in file order, each with one top-level `ignore_imports = [` ... `]`)."""
    tables = re.split(r"(?m)^(?=\[\[tool\.importlinter\.contracts\]\])", pyproject)
    for i, table in enumerate(tables[1:], 1):
        cid = tomllib.loads(table)["tool"]["importlinter"]["contracts"][0]["id"]
        tables[i], n = IGNORES.subn(lambda _, cid=cid: ignore_block(found.get(cid, [])), table)
        if n != 1:
            raise ValueError(f"contract {cid}: expected one `ignore_imports = [` ... `]` block")
    return "".join(tables)


def counts(root: Path) -> dict:
    found = contract_ignores(root)
    kinds = {cid: c["type"] for cid, c in contracts(root).items()}
    upward = {r[:2]: r for cid, rows in found.items() if kinds[cid] != "acyclic_siblings"
              for r in rows}
    return {"files": len(source_files(root)),
            "lines": sum(len(p.read_text().splitlines()) for p in source_files(root)),
            "function_imports": function_imports(root), "any_annotations": any_annotations(root),
            "dataset_kind": dataset_kind(root),
            "upward_imports": {"pairs": len(upward),
                               "import_lines": sum(len(r[2]) for r in upward.values()),
                               "by_contract": {cid: [f"{a} -> {b}" for a, b, _ in rows]
                                               for cid, rows in found.items()}},
            "cycles": cycles(import_graph(root)), "readme": readme(root)}


def table(c: dict) -> str:
    fi, an, dk, up, cy, rd = (c[k] for k in ("function_imports", "any_annotations",
                                             "dataset_kind", "upward_imports", "cycles",
                                             "readme"))
    rows = [
        ("ckd files / lines", f"{c['files']} / {c['lines']}"),
        ("imports inside functions", f"{fi['total']} in {fi['files']} files"),
        ("  with noqa: PLC0415", str(fi["noqa_PLC0415"])),
        ("  ckd absolute / ckd relative", f"{fi['ckd_absolute']} / {fi['ckd_relative']}"),
        ("  third-party and standard library", str(fi["other"])),
        ("`: Any` / `-> Any` annotations", f"{an['bare_Any']} in {an['files']} files"),
        ("  parameters / returns / variables",
         f"{an['parameter']} / {an['return']} / {an['variable']}"),
        ("  annotations containing Any", str(an["containing_Any"])),
        ("dataset-kind branches", f"{dk['branches']} in {dk['files']} files "
         f"({dk['kind_tests']} kind tests)"),
        ("upward imports (module pairs)", f"{up['pairs']} ({up['import_lines']} import lines)"),
    ]
    for cid, pairs in up["by_contract"].items():
        rows.append((f"  ignored by contract {cid}", str(len(pairs))))
    rows += [
        ("package cycles (SCCs)", f"{cy['package_sccs']}: " + "; ".join(
            " ".join(m.removeprefix(PACKAGE + ".") for m in s) for s in cy["package_cycles"])),
        ("module cycles (SCCs)", f"{cy['module_sccs']} (sizes {cy['module_scc_sizes']})"),
        ("README lines", str(rd["lines"])),
        ("README Layout misses", ", ".join(rd["layout_missing_packages"]) or "-"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--json", action="store_true", help="print the counts as JSON")
    ap.add_argument("--importlinter-ignores", action="store_true",
                    help="print each contract's ignore_imports for today's violations")
    ap.add_argument("--write-ignores", action="store_true",
                    help="rewrite pyproject.toml's ignore_imports with today's violations")
    ap.add_argument("--layers-diagram", action="store_true",
                    help="print the layers contract as a text diagram")
    args = ap.parse_args()
    root = args.root.resolve()
    if args.importlinter_ignores:
        print(format_ignores(contract_ignores(root)))
    elif args.write_ignores:
        path = root / "pyproject.toml"
        path.write_text(with_ignores(path.read_text(), contract_ignores(root)))
        print(f"wrote the ignore_imports of {path}; check with: lint-imports")
    elif args.layers_diagram:
        print(layers_diagram(root))
    elif args.json:
        print(json.dumps(counts(root), indent=1))
    else:
        print(table(counts(root)))


if __name__ == "__main__":
    main()
