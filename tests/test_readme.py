"""The README and docs/ against the code: the README's length, its "CLI at a glance" against
`ckd --help`, and every relative link of the README, docs/ and benchmarks/RESULTS.md (file
and `#anchor`) against the files and their headings. The Layout section against the package
tree: tests/test_layers.py; the demo table: tests/test_demo.py; the methods table:
tests/test_methods.py."""

import re
from pathlib import Path

import click

from ckd.cli.main import main as ckd_command

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 250  # a newcomer reads it in five minutes; logs go to benchmarks/RESULTS.md
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def section(text: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def outside_fences(text: str) -> list[str]:
    """The lines of a markdown text that are not inside a fenced code block."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, a
    repeated heading numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    for line in outside_fences(text):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def test_anchor_rule():
    text = ("# Benchmark results\n## GPU: one NVIDIA H200 (2026-12-04)\n"
            "### Students on the digits (ckd demo --students)\n```\n# not a heading\n```\n"
            "## Notes\n## Notes\n")
    assert anchors(text) == {"benchmark-results", "gpu-one-nvidia-h200-2026-12-04",
                             "students-on-the-digits-ckd-demo---students", "notes", "notes-1"}


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, (
        f"README.md has {lines} lines (at most {MAX_README_LINES}): move measurement logs to "
        "benchmarks/RESULTS.md and the longer tours to docs/, and link them")


def test_readme_names_the_two_commands_ci_runs():
    """The two set-up commands, and CI's test command is the README's."""
    block = section(README.read_text(), "Two commands (fresh Debian/Ubuntu machine)")
    assert "make demo" in block and "make test" in block
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M), ".ci/run must run the README's `make test`"


def commands() -> dict[str, set[str]]:
    """`ckd --help`'s commands, each with its subcommands (empty for a plain command)."""
    return {name: set(cmd.commands) if isinstance(cmd, click.Group) else set()
            for name, cmd in ckd_command.commands.items()}


def test_cli_at_a_glance_matches_ckd_help():
    text = section(README.read_text(), "CLI at a glance")
    listed: dict[str, set[str]] = {}
    for row in re.findall(r"^\| (`ckd .*?) \|", text, re.M):
        for span in re.findall(r"`(ckd [^`]+)`", row):
            words = span.replace("\\|", "|").split()
            subs = set(words[2].split("|")) if len(words) > 2 and words[2].islower() else set()
            listed.setdefault(words[1], set()).update(subs)
    known = commands()
    assert sorted(listed) == sorted(known), (
        "the README's 'CLI at a glance' table and `ckd --help` name different commands")
    for name, subs in known.items():
        assert listed[name] == subs, f"`ckd {name}`: README lists {sorted(listed[name])}, " \
            f"`ckd {name} --help` has {sorted(subs)}"


def markdown_files() -> list[Path]:
    return [README, ROOT / "benchmarks" / "RESULTS.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_relative_links_resolve():
    """Every relative link of the README, docs/*.md and RESULTS.md names a file that exists
    and, with `#anchor`, a heading of that file (moved sections leave no dead link)."""
    broken = []
    for doc in markdown_files():
        for line in outside_fences(doc.read_text()):
            for target in LINK.findall(line):
                if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                    continue
                path, _, anchor = target.partition("#")
                dest = (doc.parent / path).resolve() if path else doc
                if not dest.exists():
                    broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
                elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
                    broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_architecture_describes_every_package_and_helper():
    """docs/ARCHITECTURE.md has a section per package of ckd and names every module directly
    under ckd/ (a new one is described where it is added)."""
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    headings = {m.split()[0] for m in re.findall(r"^## (.+)$", doc, re.M)}
    headings |= set(re.findall(r"\((ckd\.\w+)\)", " ".join(re.findall(r"^## .+$", doc, re.M))))
    packages = {f"ckd.{p.parent.name}" for p in (ROOT / "ckd").glob("*/__init__.py")}
    assert sorted(packages - headings) == [], "packages without a '## ckd.NAME' section"
    modules = {p.stem for p in (ROOT / "ckd").glob("*.py") if p.stem != "__init__"}
    assert sorted(m for m in modules if f"`{m}`" not in doc and f"ckd.{m}" not in doc) == []
