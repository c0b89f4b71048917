"""The front page stays a front page: README within 2,000 words, its test command the one CI runs,
and every relative link in README and docs/ pointing at a file that exists."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _body(text: str) -> str:
    """README without its Hugging Face front matter."""
    return text.split("---", 2)[2] if text.startswith("---") else text


def test_readme_is_at_most_2000_words():
    words = len(_body((ROOT / "README.md").read_text()).split())
    assert words <= 2000, f"README.md has {words} words; move the detail into docs/"


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_command = next(c for c in commands if "pytest" in c)
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert ci[-1] == test_command.strip()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text())
    missing = [link for link in links if "://" not in link and not (doc.parent / link).exists()]
    assert not missing, f"{doc.name} links to missing files: {missing}"
