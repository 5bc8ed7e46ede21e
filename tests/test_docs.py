"""The documentation a reader sees: README.md and docs/*.md.

Every relative link and image resolves to a file that a fresh clone has
(present and not git-ignored), with its #anchor a heading there; docs/cli.md
is what cnnstress.docs_cli generates from the Config metadata; the README
stays short, keeps the commands CI runs, and says nothing about the machines
the project is developed on; the tests docs/reliability.md cites exist.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cnnstress.docs_cli import REGENERATE, cli_reference

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
MAX_README_LINES = 200
# The README's two commands: CI (.ci/run) runs the second one verbatim.
COMMANDS = ("pip install -r requirements.txt && python -m cnnstress run",
            "pip install -r requirements-test.txt && python -m pytest -q")
FORBIDDEN = re.compile(r"issue [0-9]|build machine|was lent|transfer rule|\.gpu/", re.IGNORECASE)

INLINE = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")   # [text](target), ![alt](src)
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)  # [label]: target
HTML = re.compile(r"<(?:img|a)\b[^>]*?\b(?:src|href)=\"([^\"]+)\"", re.IGNORECASE)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def targets(text: str) -> list[str]:
    """Every link and image target in Markdown `text`, code blocks and spans left out."""
    text = CODE_SPAN.sub("", FENCE.sub("", text))
    return [m.group(1) for pattern in (INLINE, REFERENCE, HTML) for m in pattern.finditer(text)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", CODE_SPAN.sub(lambda m: m.group(0)[1:-1], heading).strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.MULTILINE)}


def broken_links(path: Path, text: str | None = None) -> list[str]:
    """The relative targets in `path` (its `text`, default its content) that do not resolve, each with why."""
    problems = []
    for target in targets(path.read_text(encoding="utf-8") if text is None else text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):   # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            problems.append(f"{target}: no such file")
        elif not dest.is_relative_to(REPO):
            problems.append(f"{target}: outside the repository")
        elif _ignored(dest):
            problems.append(f"{target}: git-ignored, so a fresh clone lacks it")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            problems.append(f"{target}: no heading #{anchor} in {dest.name}")
    return problems


def _ignored(path: Path) -> bool:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        return False   # not a checkout: existence is all that can be checked
    return subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO).returncode == 0


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_image_resolves(path):
    assert broken_links(path) == []


def test_the_link_check_catches_broken_links():
    text = ("[ok](stages.md#stress) ![gone](images/missing.png) [bad anchor](stages.md#no-such-stage) "
            "[web](https://example.com/x) `[code](nowhere.md)`\n\n[ref]: ../nowhere.md\n"
            '<img src="images/also-missing.png">\n')
    assert broken_links(REPO / "docs" / "design.md", text) == [
        "images/missing.png: no such file", "stages.md#no-such-stage: no heading #no-such-stage in stages.md",
        "../nowhere.md: no such file", "images/also-missing.png: no such file"]


def test_cli_reference_is_current():
    """docs/cli.md is generated; regenerate it after changing Config or the CLI."""
    assert (REPO / "docs" / "cli.md").read_text(encoding="utf-8") == cli_reference(), \
        f"docs/cli.md is out of date: run `{REGENERATE}`"


def test_cli_reference_names_every_config_field_and_its_help():
    import dataclasses

    from cnnstress.__main__ import flag_name
    from cnnstress.config import Config

    text = cli_reference()
    for f in dataclasses.fields(Config):
        assert f"`{flag_name(f.name)}" in text, f.name
        if f.name != "profile":
            assert " ".join(f.metadata["help"].split()).replace("|", "\\|") in text, f.name


def test_readme_is_short_keeps_the_commands_and_names_no_build_machinery():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_README_LINES
    for command in COMMANDS:
        assert command in text
    assert COMMANDS[1] in (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert [line for line in text.splitlines() if FORBIDDEN.search(line)] == []


def test_the_tests_reliability_md_cites_exist():
    cited = set(re.findall(r"`(test_\w+)`", (REPO / "docs" / "reliability.md").read_text(encoding="utf-8")))
    defined = {m.group(1) for p in (REPO / "tests").glob("test_*.py")
               for m in re.finditer(r"^def (test_\w+)", p.read_text(encoding="utf-8"), re.MULTILINE)}
    assert len(cited) > 20 and sorted(cited - defined) == []
