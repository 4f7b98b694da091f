"""Sections of docs/results.md that other scripts generate, kept between marker comments.

``benchmarks/results.py`` rewrites docs/results.md wholesale; every section another script writes
(e.g. ``benchmarks/timeseries_results.py``) sits between ``<!-- NAME:begin -->`` and
``<!-- NAME:end -->`` and is carried over unchanged by :func:`generated_sections`. Each script thus
owns its text and its one command.
"""

from __future__ import annotations

import re
from pathlib import Path

_BLOCK = re.compile(r"<!-- (?P<name>[a-z0-9_-]+):begin -->\n.*?<!-- (?P=name):end -->\n", re.S)


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->\n", f"<!-- {name}:end -->\n"


def generated_sections(path: Path) -> str:
    """Every marked section of the file at ``path`` (in order, with their markers), or "" when none."""
    if not path.is_file():
        return ""
    return "".join(m.group(0) + "\n" for m in _BLOCK.finditer(path.read_text()))


def write_section(path: Path, name: str, body: str) -> None:
    """Replace section ``name`` of the file at ``path`` by ``body`` (Markdown), or append it."""
    begin, end = _markers(name)
    block = begin + body.rstrip("\n") + "\n" + end
    text = path.read_text() if path.is_file() else "# Results\n\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)
