"""The README and docs/ tell the truth about the commands: the README is read in five minutes,
every link resolves (files and their headings), and every command and option shown in a code
block exists (each script's --help lists it)."""
import os
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
COMMAND = re.compile(r"python3? ((?:bench/)?[\w]+\.py)((?:\s+[^\s#|>]+)*)")


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def headings(page: Path) -> set[str]:
    found, code = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            code = not code
        elif not code and line.startswith("#"):
            found.add(slug(line.lstrip("#")))
    return found


def code_lines(page: Path) -> list[str]:
    """The lines of the page's fenced code blocks, continuation lines (`\\`) joined."""
    lines, code, joined = [], False, ""
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            code = not code
            continue
        if code:
            joined += line.rstrip("\\")
            if not line.endswith("\\"):
                lines.append(joined)
                joined = ""
    return lines


@lru_cache(maxsize=None)
def help_text(script: str, *sub: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / script), *sub, "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{script} {' '.join(sub)} --help: {done.stderr[-500:]}"
    return done.stdout


def test_the_readme_is_read_in_five_minutes():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_resolves(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: link to {target}: no such file"
        if anchor and file.suffix == ".md":
            assert anchor in headings(file), f"{page.name}: link to {target}: no such heading"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_and_option_shown_exists(page):
    shown = 0
    for line in code_lines(page):
        for script, rest in COMMAND.findall(line):
            if not (ROOT / script).is_file():
                pytest.fail(f"{page.name}: `{line.strip()}`: no script {script}")
            words = rest.split()
            sub = [words[0]] if words and re.fullmatch(r"[a-z][a-z-]+", words[0]) and \
                f"{{{words[0]}" in help_text(script) or (words and f",{words[0]}" in help_text(script)) else []
            text = help_text(script, *sub)
            if "is a train.py option" in text:            # a bench that passes the rest on to the runs
                text += help_text("train.py")
            for option in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
                assert option in text, f"{page.name}: `{line.strip()}`: {script} {' '.join(sub)} has no {option}"
            shown += 1
    if page.name in ("README.md", "datasets.md", "running.md", "evaluation.md"):
        assert shown, f"{page.name} shows no command"
