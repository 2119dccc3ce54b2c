"""README.md and docs/: every relative link and image resolves, and the README stays short.

Plain file checks, no pneumojax import: fast.
"""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").rglob("*.md"))]

README_MAX_LINES = 350
SETUP_WITHIN_LINES = 40


# [text](target) and ![alt](target); the text may wrap onto the next line, the target ends at
# whitespace or ")" (a "title" after it is ignored). Fenced blocks and inline code spans are
# blanked first, so `[a](b)` in code is not a link.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\n\s*\n).)+?\1", re.DOTALL)  # never across a blank line
EXTERNAL = ("http://", "https://", "mailto:")


def _blank(match: re.Match) -> str:
    return re.sub(r"[^\n]", " ", match.group(0))


def _links(page: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link and image outside code."""
    lines = page.read_text(encoding="utf-8").splitlines()
    in_fence = False
    for i, line in enumerate(lines):
        fence = line.lstrip().startswith(("```", "~~~"))
        if fence or in_fence:
            lines[i] = ""
        if fence:
            in_fence = not in_fence
    text = CODE_SPAN.sub(_blank, "\n".join(lines))
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in LINK.finditer(text)]


def _broken(page: Path) -> list[str]:
    broken = []
    for number, target in _links(page):
        if target.startswith(EXTERNAL) or target.startswith("#"):
            continue
        resolved = (page.parent / target.split("#", 1)[0]).resolve()
        if resolved.exists():
            continue
        broken.append(f"{page}:{number}: {target}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    assert _broken(page) == []


def test_links_are_found_and_checked(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        'see [a](a.md#part), ![img](pics/x.png "title"), [web](https://x.org), [m](mailto:a@b)\n'
        "`[not](code-span.md)`\n```\n[inside](fence.md)\n```\n[anchor](#here) [gone](gone.md)\n",
        encoding="utf-8",
    )
    targets = [t for _, t in _links(page)]
    assert targets == ["a.md#part", "pics/x.png", "https://x.org", "mailto:a@b", "#here", "gone.md"]
    (tmp_path / "a.md").write_text("", encoding="utf-8")
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "x.png").write_bytes(b"")
    assert _broken(page) == [f"{page}:6: gone.md"]


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"
    head = "\n".join(lines[:SETUP_WITHIN_LINES])
    assert "make demo" in head
    assert "make test" in head
