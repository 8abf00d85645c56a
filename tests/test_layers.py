"""The layers as contracts (pyproject.toml [tool.importlinter], checked by import-linter): they
hold today, a new upward import breaks them, scripts/house_counts.py regenerates their ignore
lists, and docs/ARCHITECTURE.md shows the layers the contracts declare."""

from __future__ import annotations

import ast
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from source_ast import package_trees

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

def house_counts():
    spec = importlib.util.spec_from_file_location("house_counts",
                                                  ROOT / "scripts" / "house_counts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    assert LINT_IMPORTS.exists(), "import-linter is missing: run scripts/setup.sh"
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo", "pyproject.toml"],
                          cwd=root, capture_output=True, text=True, timeout=300)


def copy_of_repo(tmp_path: Path) -> Path:
    """ckd and pyproject.toml in a scratch folder (import-linter reads nothing else)."""
    shutil.copytree(ROOT / "ckd", tmp_path / "ckd",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def test_contracts_are_kept():
    run = lint_imports(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


@pytest.mark.parametrize("module, line, contract", [
    # a helper reaching up to the CLI, from inside a function (those count too)
    ("atomic.py", "def _up():\n    from ckd.cli.main import main  # noqa: F401\n", "layers"),
    # the kernels naming a method
    ("kernels/output.py", "from ckd.methods.registry import get_method  # noqa: E402,F401\n",
     "kernels-no-methods"),
    # a new cycle inside a package: datasets imports beton, which imports datasets
    ("data/datasets.py", "from ckd.data import beton  # noqa: E402,F401\n", "acyclic"),
])
def test_a_new_violation_breaks_its_contract(tmp_path, module, line, contract):
    root = copy_of_repo(tmp_path)
    with open(root / "ckd" / module, "a") as f:
        f.write("\n" + line)
    run = lint_imports(root)
    assert run.returncode != 0, run.stdout
    name = house_counts().contracts(root)[contract]["name"]
    assert f"{name} BROKEN" in run.stdout, run.stdout


def test_generated_ignore_lists_keep_the_contracts(tmp_path):
    """The lists `house_counts.py --write-ignores` writes are what the contracts need: with
    them the contracts hold, with each list emptied every contract with violations breaks."""
    hc = house_counts()
    root = copy_of_repo(tmp_path)
    found = hc.contract_ignores(ROOT)
    assert set(found) == set(hc.contracts(ROOT))
    text = (ROOT / "pyproject.toml").read_text()
    (root / "pyproject.toml").write_text(hc.with_ignores(text, found))
    run = lint_imports(root)
    assert run.returncode == 0, run.stdout
    (root / "pyproject.toml").write_text(hc.with_ignores(text, {}))
    run = lint_imports(root)
    broken = sum(bool(rows) for rows in found.values())
    assert f"Contracts: {len(found) - broken} kept, {broken} broken." in run.stdout, run.stdout


def test_architecture_shows_the_declared_layers():
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    section = doc.split("\n## Layers\n", 1)
    assert len(section) == 2, "docs/ARCHITECTURE.md has no '## Layers' section"
    diagram = house_counts().layers_diagram(ROOT)
    assert f"```\n{diagram}\n```" in section[1], (
        "the diagram differs from pyproject.toml's layers contract; paste the output of "
        "`python scripts/house_counts.py --layers-diagram`")


README_SAMPLE = """# x

## Layout

```
ckd/data/      datasets
ckd/gone/      a package that is no more
ckd/demo.py    the demo
```

## Next
ckd/models/ is named here, outside the Layout section
"""


def test_layout_check_finds_missing_and_stale_entries(tmp_path):
    hc = house_counts()
    (tmp_path / "ckd" / "data").mkdir(parents=True)
    (tmp_path / "ckd" / "models").mkdir()
    for pkg in ("data", "models"):
        (tmp_path / "ckd" / pkg / "__init__.py").write_text("")
    for module in ("__init__.py", "demo.py", "hashing.py"):
        (tmp_path / "ckd" / module).write_text("")
    (tmp_path / "README.md").write_text(README_SAMPLE)
    assert hc.layout_entries(README_SAMPLE) == {"ckd/data", "ckd/gone", "ckd/demo.py"}
    report = hc.readme(tmp_path)
    assert report["layout_missing_packages"] == ["ckd/hashing.py", "ckd/models"]
    assert report["layout_stale_entries"] == ["ckd/gone"]


def test_readme_layout_lists_every_package():
    """Every package and every module directly under ckd/ is named in the README's Layout
    section, and nothing named there is missing from the tree."""
    report = house_counts().readme(ROOT)
    assert report["layout_missing_packages"] == [], report
    assert report["layout_stale_entries"] == [], report


def test_layers_cover_every_top_level_module():
    """Each package and module directly under ckd/ sits in exactly one layer (import-linter's
    `exhaustive` checks the same; this names the missing one plainly)."""
    layers = house_counts().parse_layers(house_counts().contracts(ROOT)["layers"])
    declared = [n for names, _ in layers for n in names]
    on_disk = {f"ckd.{p.stem}" for p in (ROOT / "ckd").glob("*.py") if p.stem != "__init__"}
    on_disk |= {f"ckd.{p.parent.name}" for p in (ROOT / "ckd").glob("*/__init__.py")}
    assert sorted(declared) == sorted(on_disk)


def test_ckd_never_imports_benchmarks_scripts_or_tests():
    outside = {"benchmarks", "scripts", "tests"}
    found = []
    for path, tree in package_trees():
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            found += [f"{path.relative_to(ROOT)}:{node.lineno}" for n in names
                      if n.split(".")[0] in outside]
    assert found == []
