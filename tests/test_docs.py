"""The documentation stays true: docs/flags.md is the live --help of every script, the README
stays short, and every relative link of the README and docs/ leads to a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

import helptext

REPO = Path(__file__).resolve().parents[1]
README_LIMIT = 12 * 1024  # bytes: the reference material lives in docs/
LINK = re.compile(r"\]\(([^)#:]+)(#[^)]*)?\)")  # markdown links without a scheme


def test_flags_page_is_the_live_help():
    assert helptext.FLAGS_PAGE.read_text() == helptext.render(), "run make flags"


def test_every_script_is_on_the_flags_page():
    scripts = {path.name for path in REPO.glob("*.py")
               if "if __name__ == \"__main__\":" in path.read_text()} - {"helptext.py"}
    assert scripts == {script for script, _, _ in helptext.SCRIPTS}


def test_readme_is_short():
    assert (REPO / "README.md").stat().st_size <= README_LIMIT


def test_relative_links_lead_to_files():
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target, _ in LINK.findall(page.read_text()):
            assert (page.parent / target).exists(), f"{page.name}: {target}"
