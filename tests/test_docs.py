"""The documents stay findable: a short front page, an index of docs/, and links that resolve."""
from __future__ import annotations

import re
from pathlib import Path

from shared.paths import REPO_ROOT

DOCS = REPO_ROOT / "docs"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = [line.lstrip("#").strip() for line in page.read_text().splitlines() if line.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_the_front_page_is_short() -> None:
    assert len((REPO_ROOT / "README.md").read_text().splitlines()) <= 250


def test_the_docs_index_lists_every_document() -> None:
    index = (DOCS / "README.md").read_text()
    linked = {(DOCS / target.split("#")[0]).resolve() for target in LINK.findall(index)}
    documents = {p.resolve() for p in DOCS.rglob("*.md")} - {(DOCS / "README.md").resolve()}
    unlisted = sorted(str(p.relative_to(REPO_ROOT)) for p in documents - linked)
    assert not unlisted, f"docs/README.md does not list {unlisted}"


def test_every_relative_link_of_the_documents_resolves() -> None:
    broken = []
    for page in [REPO_ROOT / "README.md", *DOCS.rglob("*.md")]:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists() or (anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved)):
                broken.append(f"{page.relative_to(REPO_ROOT)}: {target}")
    assert not broken, broken
