"""Every `kvdepot ...` command the README and docs/ show parses against today's CLI, so that a
reader who copies one gets the command, not a usage error.

Commands are taken from shell code blocks (lines that start with `kvdepot`, after optional
variable assignments and a path such as `.venv-vllm/bin/`) and from inline code that starts
with `kvdepot`. Shell operators end a command; `<name>` marks a placeholder, not a command.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from kvdepot.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_COMMAND = re.compile(r"^\s*(?:\$\s+)?(?:[A-Z_][A-Z0-9_]*=\S*\s+)*(?:\S*/)?kvdepot\s+(\S.*)$")
_SHELL_OPERATORS = ("|", "||", "&&", "&", ";", ">", ">>", "2>&1")


def documented_commands() -> list[tuple[str, str]]:
    """(file name, the command's arguments after `kvdepot`), in document order."""
    found = []
    for path in DOCS:
        text = path.read_text()
        for block in re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", text, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                if (match := _COMMAND.match(line)) is not None:
                    found.append((path.name, match.group(1)))
        for span in re.findall(r"`([^`\n]+)`", text):
            if (match := _COMMAND.match(span)) is not None and "<" not in span:
                found.append((path.name, match.group(1)))
    return found


def _argv(arguments: str) -> list[str]:
    words = shlex.split(arguments, comments=True)
    for i, word in enumerate(words):
        if word in _SHELL_OPERATORS:
            return words[:i]
    return words


def test_the_docs_show_commands() -> None:
    found = documented_commands()
    assert len(found) > 30
    assert ("README.md", "bench all --quick") in found


@pytest.mark.parametrize(("where", "arguments"), documented_commands())
def test_a_documented_command_parses(where: str, arguments: str) -> None:
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            args, rest = build_parser().parse_known_args(_argv(arguments))
    except SystemExit as exc:
        assert exc.code == 0, f"{where}: `kvdepot {arguments}`: {errors.getvalue().strip()}"
        return  # --help or --version
    benchmark = getattr(args, "benchmark", None)
    if not (benchmark is not None and benchmark.parses_own_flags):
        assert rest == [], f"{where}: `kvdepot {arguments}`: unrecognized {rest}"
