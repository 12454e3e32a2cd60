"""The documentation keeps up with the code: every error message raised in dcp_ext/ is on
docs/troubleshooting.md, and every dcp-ext command has a section in docs/cli.md."""

from __future__ import annotations

import os
import re

from tests.support.error_messages import raised_messages

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def _page(name: str) -> str:
    return " ".join(open(os.path.join(DOCS, name), encoding="utf-8").read().split())


def test_troubleshooting_lists_every_error_message():
    page = _page("troubleshooting.md").replace("\\|", "|")  # a '|' in a table cell is written '\|'
    missing = sorted({f"{r.path}:{r.line} {r.key!r}" for r in raised_messages() if " ".join(r.key.split()) not in page})
    assert missing == [], "add these messages (and what to do) to docs/troubleshooting.md:\n" + "\n".join(missing)


def test_cli_reference_covers_every_command():
    from dcp_ext.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    page = open(os.path.join(DOCS, "cli.md"), encoding="utf-8").read()
    for name in sub.choices:
        assert re.search(rf"^## `?{name}\b", page, flags=re.M), f"docs/cli.md has no section for {name}"


#: tokens a writer leaves to fill in later (a measured figure, a name): "@27P", "TODO", "TBD", "XXX"
_PLACEHOLDER = re.compile(r"@\d+[A-Z]\b|\bTODO\b|\bTBD\b|\bXXX\b|\bFIXME\b")


def test_no_placeholder_is_left_in_the_docs():
    root = os.path.dirname(DOCS)
    pages = [os.path.join(DOCS, n) for n in sorted(os.listdir(DOCS)) if n.endswith(".md")]
    pages += [os.path.join(root, n) for n in ("README.md", "CHANGELOG.md")]
    left = [f"{os.path.relpath(p, root)}:{i}: {line.strip()[:80]}" for p in pages
            for i, line in enumerate(open(p, encoding="utf-8"), 1) if _PLACEHOLDER.search(line)]
    assert left == [], "fill in or remove these placeholders:\n" + "\n".join(left)
