"""Griffe extension (mkdocs.yml, mkdocstrings options) that lets the docstrings, written in
torch's style, render as Markdown in the API reference. The docstrings themselves are unchanged.

- An ``Args:`` entry written ``a, b, c: text`` (numpydoc's shared-description form, which the
  Google style griffe parses lacks) becomes one entry per argument, so each gets its own row and
  griffe does not report ``a, b, c`` as an unknown parameter.
- reST roles (``:math:`x```, ``:class:`X```, ``:func:``, ...) become code spans, and a
  ``.. math::`` block a fenced block: shown as written (LaTeX source), without a math renderer.
- Doctest lines (``>>> ...``) become a Python code block (Markdown would read ``>`` as a quote).
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

import griffe

_SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters):\s*$")
_SHARED = re.compile(r"^(\s+)([A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)+)\s*:\s*(.*)$")
_DOCTEST = re.compile(r"^(\s*)(?:>>>|\.\.\.)( |$)")
_SKIP = re.compile(r"\s*# doctest: \+SKIP\s*$")
_ROLE = re.compile(r":(?:math|class|func|meth|attr|mod|obj|data|exc):`([^`]+)`")


def split_shared_entries(text: str) -> str:
    out, in_args, indent = [], False, ""
    for line in text.splitlines():
        section = _SECTION.match(line)
        if section:
            in_args, indent = True, section.group(1)
        elif in_args and line.strip() and not line.startswith(indent + " "):
            in_args = False  # dedented: the next section
        shared = _SHARED.match(line) if in_args else None
        if shared:
            pad, names, rest = shared.groups()
            out += [f"{pad}{name.strip()}: {rest}" for name in names.split(",")]
        else:
            out.append(line)
    return "\n".join(out)


def rest_to_markdown(text: str) -> str:
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        if line.strip() == ".. math::":
            pad = line[: len(line) - len(line.lstrip())]
            block, i = [], i + 1
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith(pad + " ")):
                block.append(lines[i])
                i += 1
            body = textwrap.dedent("\n".join(block)).strip("\n")
            out += [f"{pad}```text", *(pad + b for b in body.splitlines()), f"{pad}```", ""]
            continue
        doctest = _DOCTEST.match(line)
        if doctest:
            pad, block = doctest.group(1), []
            while i < len(lines) and lines[i].strip() and lines[i].startswith(pad):
                block.append(_SKIP.sub("", lines[i][len(pad) :]))
                i += 1
            out += [f"{pad}```pycon", *(pad + b for b in block), f"{pad}```"]
            continue
        out.append(_ROLE.sub(lambda m: f"`{m.group(1)}`", line))
        i += 1
    return "\n".join(out)


class TorchStyleDocstrings(griffe.Extension):
    def _fix(self, obj: griffe.Object) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rest_to_markdown(split_shared_entries(obj.docstring.value))

    def on_class_instance(self, *, node: Any, cls: griffe.Class, agent: Any, **kwargs: Any) -> None:
        self._fix(cls)

    def on_function_instance(self, *, node: Any, func: griffe.Function, agent: Any, **kwargs: Any) -> None:
        self._fix(func)

    def on_module_instance(self, *, node: Any, mod: griffe.Module, agent: Any, **kwargs: Any) -> None:
        self._fix(mod)
