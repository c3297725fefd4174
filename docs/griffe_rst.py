"""Griffe extension for the docs build: turn the reST bits of st-daft's docstrings into Markdown.

The docstrings are Google style (``Args:``, ``Returns:``) with a few reStructuredText constructs that
sentence-transformers' Sphinx habits bring along. mkdocstrings renders Markdown, so before rendering:

- ``:class:`~st_daft.x.Y``` (and ``:func:``, ``:meth:``, ``:mod:``, ``:data:``, ``:attr:``, ``:exc:``, ``:obj:``)
  becomes the code span ``Y`` (``~``: last component) or ``st_daft.x.Y``;
- ``:math:`x``` becomes the code span ``x``;
- a ``.. math::`` block becomes a fenced code block;
- a line ending in ``::`` (a reST literal block follows) ends in ``:`` instead, and a line that is only ``::`` goes;
  the indented block after it stays a Markdown code block.

Loaded by mkdocs.yml (``plugins.mkdocstrings.handlers.python.options.extensions``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj|const|math):`([^`]+)`")


def _role(match: re.Match) -> str:
    target = match.group(1).strip()
    if target.startswith("~"):
        target = target[1:].rsplit(".", 1)[-1]
    return f"`{target}`"


def _math_blocks(lines: list[str]) -> list[str]:
    out: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.strip() == ".. math::":
            indent = line[: len(line) - len(line.lstrip())]
            block: list[str] = []
            index += 1
            while index < len(lines) and (not lines[index].strip() or lines[index].startswith(indent + " ")):
                block.append(lines[index].strip())
                index += 1
            while block and not block[-1]:
                block.pop()
            out.extend([indent + "```", *[indent + text for text in block if text], indent + "```", ""])
            continue
        out.append(line)
        index += 1
    return out


def rst_to_markdown(text: str) -> str:
    """The docstring ``text`` with its reST roles, math and literal-block markers in Markdown form."""
    text = ROLE.sub(_role, text)
    lines = []
    for line in _math_blocks(text.splitlines()):
        if line.strip() == "::":
            continue
        if line.rstrip().endswith("::"):
            line = line.rstrip()[:-1]
        lines.append(line)
    return "\n".join(lines)


class RstToMarkdown(griffe.Extension):
    """Rewrites every docstring as it is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
