"""The README's python blocks run as written, on the bundled model, so the front page never drifts.

Every fenced ```python block of README.md is executed in a fresh namespace. A block that needs a GPU
or a download says so on the line before it, as an HTML comment the rendered page hides:
``<!-- readme-test: skip (needs a GPU) -->``; such a block is reported as skipped, never silently.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(
    r"(?:<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]*)\)\s*-->\s*\n)?```python\n(?P<code>.*?)```", re.S
)


def _blocks() -> list:
    text = README.read_text()
    params = []
    for number, match in enumerate(_BLOCK.finditer(text), start=1):
        line = text[: match.start("code")].count("\n") + 1
        marks = [pytest.mark.skip(reason=match["reason"])] if match["reason"] else []
        params.append(pytest.param(match["code"], line, id=f"block{number}-line{line}", marks=marks))
    return params


def test_readme_has_python_blocks():
    assert _blocks(), "README.md has no ```python block"


@pytest.mark.parametrize("code,line", _blocks())
def test_readme_block_runs(code, line, capsys):
    compiled = compile(code, f"README.md (block at line {line})", "exec")
    exec(compiled, {"__name__": "readme"})
