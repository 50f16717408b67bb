"""The repository maps itself: every module says in one line what it is for, README's module
table lists every module, and no comment, docstring, unit or page cites a file that is not in
the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "daemon" / "kakao_tokend"
MODULES = sorted(PACKAGE.rglob("*.py"))

#: Where the project's prose and code live (generated and third-party files left out).
TEXT_ROOTS = ("daemon", "tests", "bench", "systemd", "docs", ".ci", "contrib")
TEXT_FILES = ("README.md", "README.ko.md", "config.example.toml", "pyproject.toml", "setup.py")
TEXT_SUFFIXES = {".py", ".md", ".toml", ".service", ".sh", ".sql", ".yml", ".yaml", ".po", ""}

#: Files this project was written from that live outside it: citing them leaves the reader
#: with a reference they cannot follow. Their facts belong in docs/ (docs/kakao.md for
#: Kakao's rules) or in the comment itself.
OUTSIDE = re.compile(
    r"pitfalls\.md|kakao-api\.md|peers\.md|style\.md|seed-kakao-user-token\.md|\.\./shared"
    r"|(?<![\w/])fleet\.md §"
)


def repository_text_files() -> list[Path]:
    """Return the project's own text files (no virtualenv, build output or caches)."""
    found = [ROOT / name for name in TEXT_FILES if (ROOT / name).exists()]
    for top in TEXT_ROOTS:
        for path in sorted((ROOT / top).rglob("*")):
            parts = set(path.relative_to(ROOT).parts)
            if (
                path.is_file()
                and path.suffix in TEXT_SUFFIXES
                and not parts & {"__pycache__", ".venv", "node_modules"}
                and not any(part.endswith(".egg-info") for part in parts)
                and path != Path(__file__).resolve()  # the pattern above names them
            ):
                found.append(path)
    return found


def module_name(path: Path) -> str:
    """Return how README names a module: ``store.py``, ``fleet/`` for a package's files."""
    relative = path.relative_to(PACKAGE)
    return f"{relative.parts[0]}/" if len(relative.parts) > 1 else relative.name


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_module_says_what_it_is_for_in_one_line(path: Path) -> None:
    """Each module starts with a docstring whose first paragraph is one line."""
    docstring = ast.get_docstring(ast.parse(path.read_text(), str(path)))
    assert docstring, f"{path.relative_to(ROOT)} has no module docstring"
    summary = docstring.split("\n\n")[0]
    assert "\n" not in summary, f"{path.relative_to(ROOT)}: the summary is not one line"
    assert len(summary) <= 100, f"{path.relative_to(ROOT)}: the summary is longer than a line"


def readme_module_table() -> str:
    """Return README's module table (the rows after its ``| module | owns |`` header)."""
    text = (ROOT / "README.md").read_text()
    start = text.index("| module | owns |")
    end = text.index("\n\n", start)
    return text[start:end]


def test_readme_lists_every_module_and_nothing_else() -> None:
    """README's module table names each module (a package by its directory) in its first
    column, and every name there is a module or package of the code."""
    table = readme_module_table()
    listed = set()
    for row in table.splitlines()[2:]:
        first_column = row.split("|")[1]
        listed.update(re.findall(r"`([\w/]+(?:\.py|/))`", first_column))
    present = {module_name(path) for path in MODULES} - {"__init__.py", "__main__.py"}
    assert present - listed == set(), "modules missing from README's table"
    assert listed - present == set(), "README's table names modules that do not exist"


def test_readme_names_every_file_of_the_packages() -> None:
    """The ``fleet/`` and ``emulator/`` rows name each module of their package."""
    table = readme_module_table()
    for package in ("fleet", "emulator"):
        [row] = [line for line in table.splitlines() if line.startswith(f"| `{package}/`")]
        for path in sorted((PACKAGE / package).glob("*.py")):
            if path.stem != "__init__":
                assert f"`{path.stem}`" in row, f"README's {package}/ row misses {path.stem}"


def test_the_readme_reading_order_names_existing_modules() -> None:
    """Every module the reading order names exists."""
    text = (ROOT / "README.md").read_text()
    start = text.index("Reading order for the code:")
    order = text[start : text.index("\n\n", start)]
    named = re.findall(r"`(\w+\.py|\w+/)`", order)
    assert len(named) >= 8, order
    present = {module_name(path) for path in MODULES}
    assert set(named) <= present, set(named) - present


def test_no_file_cites_a_file_outside_the_repository() -> None:
    """No comment, docstring, unit, script or page points at the notes this project was
    written from (they are not part of it); docs/ holds the facts instead."""
    files = repository_text_files()
    assert len(files) > 100, len(files)  # the walk found the repository
    hits = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in files
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert hits == [], "\n".join(hits)


def test_the_outside_pattern_catches_what_it_should() -> None:
    """The check can fail: the references it is for match, a link to docs/fleet.md does not."""
    for cited in ("see pitfalls.md §3.1", "(kakao-api.md §8)", "../shared/fleet.md", "fleet.md §4"):
        assert OUTSIDE.search(cited), cited
    for fine in ("docs/fleet.md §12", "[docs/fleet.md](docs/fleet.md)", "docs/kakao.md"):
        assert not OUTSIDE.search(fine), fine
