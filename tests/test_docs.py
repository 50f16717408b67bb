"""The documentation's links: every relative link and anchor resolves inside the repository,
and each English page and its Korean counterpart link to each other."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([*ROOT.glob("*.md"), *ROOT.glob("docs/**/*.md")])
LINK_RE = re.compile(r"\]\(([^)\s]+)\)")
HEADING_RE = re.compile(r"(?m)^#{1,6}\s+(.+?)\s*$")
#: English page → its Korean counterpart (both must link to each other).
COUNTERPARTS = {
    "README.md": "README.ko.md",
    "docs/operations.md": "docs/ko/operations.md",
    "docs/fleet.md": "docs/ko/fleet.md",
}


def anchors(page: Path) -> set[str]:
    """Return GitHub's anchors for the headings of ``page``."""
    found = set()
    for heading in HEADING_RE.findall(page.read_text()):
        text = heading.replace("`", "").strip().lower()
        text = re.sub(r"[^\w\- ]", "", text)
        found.add(text.replace(" ", "-"))
    return found


def relative_links(page: Path) -> list[str]:
    """Return the links of ``page`` that are not URLs (code blocks excluded)."""
    text = re.sub(r"(?ms)^```.*?^```", "", page.read_text())
    return [
        link
        for link in LINK_RE.findall(text)
        if not re.match(r"[a-z][a-z0-9+.-]*:", link)  # http:, https:, mailto:
    ]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_and_anchor_resolves_inside_the_repository(page: Path) -> None:
    """A relative link names an existing file or directory of this repository, and an
    #anchor names a heading of its target.
    """
    for link in relative_links(page):
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.is_relative_to(ROOT), f"{link} leaves the repository"
        assert target.exists(), f"{page.name}: {link} does not exist"
        if anchor:
            assert anchor in anchors(target), f"{page.name}: no heading for #{anchor}"


@pytest.mark.parametrize(("english", "korean"), COUNTERPARTS.items())
def test_english_and_korean_pages_link_to_each_other(english: str, korean: str) -> None:
    """Each English page links to its Korean page and back; the migration guide is linked
    from the English operator's guide and links back to it.
    """
    english_page, korean_page = ROOT / english, ROOT / korean

    def targets(page: Path) -> set[Path]:
        return {
            (page.parent / link.partition("#")[0]).resolve()
            for link in relative_links(page)
            if link.partition("#")[0]
        }

    assert korean_page.resolve() in targets(english_page)
    assert english_page.resolve() in targets(korean_page)
    migration = ROOT / "docs" / "ko" / "migration.md"
    assert migration.resolve() in targets(ROOT / "docs" / "operations.md")
    assert (ROOT / "docs" / "operations.md").resolve() in targets(migration)
