"""MkDocs hooks (mkdocs.yml: hooks): pages made from the project's own sources at build time, so
the site cannot drift from the code or the README.

Directives a page may contain, each alone on a line:

- ``<!-- readme: HEADING -->``: the body of the README section ``## HEADING`` (up to the next
  ``## ``), with its ``docs/...`` links made relative to the page.
- ``<!-- presets -->``: the presets table, option by option, and every preset's peer, argument
  names and numbered deviations, from ``rmsprop.PRESETS``.
- ``<!-- changelog -->``: CHANGELOG.md without its title.

An unknown directive or a README heading that no longer exists stops the build.
"""

from __future__ import annotations

import posixpath
import re
import sys
from pathlib import Path

from mkdocs.exceptions import PluginError

ROOT = Path(__file__).resolve().parents[1]
DIRECTIVE = re.compile(r"^<!-- (readme|presets|changelog)(?:: (.+?))? -->$", re.MULTILINE)
ANY_DIRECTIVE = re.compile(r"^<!-- (\w+)(?::.*)? -->$", re.MULTILINE)


def readme_section(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    if match is None:
        raise PluginError(f"README.md has no section '## {heading}' (named in a docs page)")
    return match.group(1).strip() + "\n"


def _relink(markdown: str, page_path: str) -> str:
    """README links point at docs/...; make them relative to the page (docs/ is docs_dir)."""
    here = posixpath.dirname(page_path)

    def fix(match: re.Match) -> str:
        return f"]({posixpath.relpath(match.group(1), here or '.')})"

    return re.sub(r"\]\(docs/([^)\s]+)\)", fix, markdown)


def _fmt(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"`{value!r}`"


def presets_markdown() -> str:
    sys.path.insert(0, str(ROOT / "src"))
    try:
        from rmsprop import PRESETS, RMSprop
    finally:
        sys.path.pop(0)
    import inspect

    defaults = {
        name: p.default for name, p in inspect.signature(RMSprop).parameters.items() if name != "params"
    }
    keys = [k for k in defaults if any(k in p.options for p in PRESETS.values())]
    head = "| preset | " + " | ".join(f"`{k}`" for k in keys) + " |"
    rows = [head, "|---" * (len(keys) + 1) + "|"]
    rows.append("| *RMSprop's defaults* | " + " | ".join(_fmt(defaults[k]) for k in keys) + " |")
    for name, preset in PRESETS.items():
        cells = [_fmt(preset.options[k]) if k in preset.options else "" for k in keys]
        rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
    out = [
        "Generated from `rmsprop.PRESETS` when the site is built. An empty cell is "
        "`RMSprop`'s default (first row). `from_preset(name, params, **overrides)` applies the "
        "overrides on top.",
        "",
        *rows,
        "",
    ]
    for name, preset in PRESETS.items():
        out += [f"## `{name}`", "", f"Peer: {preset.peer}.", ""]
        options = ", ".join(f"{k}={v!r}" for k, v in preset.options.items())
        out += [f"`rmsprop.from_preset({name!r}, params)` is `rmsprop.RMSprop(params, {options})`.", ""]
        if preset.peer_names:
            names = ", ".join(f"`{theirs}` → `{ours}`" for theirs, ours in preset.peer_names.items())
            out += [f"The peer's argument names, as this library spells them: {names}.", ""]
        out += ["Deviations from the peer:", ""]
        out += [f"{i}. {text}" for i, text in enumerate(preset.deviations, 1)]
        out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:
    for match in ANY_DIRECTIVE.finditer(markdown):
        if match.group(1) not in ("readme", "presets", "changelog"):
            raise PluginError(f"{page.file.src_path}: unknown directive {match.group(0)}")

    def expand(match: re.Match) -> str:
        kind, arg = match.group(1), match.group(2)
        if kind == "readme":
            if not arg:
                raise PluginError(f"{page.file.src_path}: <!-- readme: HEADING --> needs a heading")
            return _relink(readme_section(arg), page.file.src_path)
        if kind == "presets":
            return presets_markdown()
        changelog = (ROOT / "CHANGELOG.md").read_text()
        return changelog.split("\n", 1)[1].lstrip()  # drop "# Changelog": the page has its title

    return DIRECTIVE.sub(expand, markdown)
