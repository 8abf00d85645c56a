"""ckd's own source files as syntax trees, for the tests that scan the package.

CPython 3.11.7 keeps the AST converter's recursion counter in per-interpreter state, so an
`ast.parse` that overlaps AST work in another thread can fail with "SystemError: AST
constructor recursion depth mismatch" (seen here after ffcv loaders had run in the same
test process; later CPython releases fixed the counter). Such a parse is retried: the
error says nothing about the file.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ckd"


def parse(path: Path, tries: int = 5) -> ast.Module:
    source = path.read_text()
    for attempt in range(tries):
        try:
            return ast.parse(source, str(path))
        except SystemError:
            if attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


def package_trees() -> Iterator[tuple[Path, ast.Module]]:
    """(path, tree) of every module of the ckd package, in path order."""
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, parse(path)
