"""The docs site builds in strict mode and its API reference covers the public API: every public
name, and every argument of RMSprop and from_preset, in the signature and in the parameter table."""

from __future__ import annotations

import html
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import rmsprop
import rmsprop.integrations.timm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import griffe_torch_docstrings  # noqa: E402

# Arguments whose docstring has no entry yet (the description table then lacks their rows). The
# test fails when this set is wrong either way, so fixing a docstring means updating it here.
UNDOCUMENTED = {"rmsprop.from_preset": {"name", "params", "overrides"}}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def _object_html(page: str, identifier: str) -> str:
    """The HTML of one documented object: from its heading to the next heading of its level."""
    start = page.index(f'id="{identifier}"')
    level = page.rfind("<h", 0, start)
    tag = page[level : level + 3]
    end = page.find(tag + " ", start)
    return page[start : end if end > 0 else len(page)]


def _text(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


@pytest.mark.parametrize("qualname", ["rmsprop.RMSprop", "rmsprop.from_preset"])
def test_every_argument_is_in_the_signature_and_the_parameter_table(site, qualname):
    page = (site / "api.html").read_text()
    obj = eval(qualname)
    section = _object_html(page, qualname)
    signature = _text(section[section.index("doc-signature") : section.index("</pre>")])
    params = [n for n in inspect.signature(obj).parameters]
    for name in params:
        assert re.search(rf"\b{name}\b", signature), f"{name} missing from the rendered signature"
    table = section[section.find("<table") : section.find("</table>")]
    documented = set(re.findall(r"<td>\s*<code>(\w+)</code>\s*</td>", table))
    assert set(params) - documented == UNDOCUMENTED.get(qualname, set())


def test_every_public_name_has_a_section(site):
    page = (site / "api.html").read_text()
    public = [f"rmsprop.{n}" for n in rmsprop.__all__]
    public += [f"rmsprop.integrations.timm.{n}" for n in rmsprop.integrations.timm.__all__]
    public += ["rmsprop.functional.rmsprop", "rmsprop.reference", "rmsprop.demo.SimpleNet"]
    missing = [name for name in public if f'id="{name}"' not in page]
    assert not missing, missing


def test_presets_page_is_generated_from_the_presets(site):
    page = _text((site / "presets.html").read_text())
    for name, preset in rmsprop.PRESETS.items():
        assert f"rmsprop.from_preset('{name}', params) is rmsprop.RMSprop(params, " in page
        for deviation in preset.deviations:
            assert " ".join(deviation.split()) in " ".join(page.split()), deviation[:60]


def test_pages_include_the_readme_and_the_committed_data(site):
    fused = _text((site / "fused-kernel.html").read_text())
    assert "One pass over memory per element" in fused  # the README's section, included
    bench = (site / "benchmarks.html").read_text()
    assert 'src="bench/bench.png"' in bench and (site / "bench" / "bench.json").is_file()
    assert (site / "compare" / "report.html").is_file() and (site / "compare" / "curves.png").is_file()
    assert "RMSPROP_REQUIRE_KERNEL" in (site / "changelog.html").read_text()


def test_docstring_rewrites_split_shared_arguments_and_keep_the_rest():
    text = "Summary.\n\n    Args:\n        a, b: shared.\n        c: own.\n    Returns:\n        x, y: not args.\n"
    fixed = griffe_torch_docstrings.split_shared_entries(text)
    assert "        a: shared.\n        b: shared.\n        c: own." in fixed
    assert "x, y: not args." in fixed  # outside Args
    md = griffe_torch_docstrings.rest_to_markdown(
        "See :class:`X` and :math:`\\eta`.\n\n.. math::\n    a = b\n\n>>> f()  # doctest: +SKIP\n"
    )
    assert "See `X` and `\\eta`." in md and "```text\na = b\n```" in md and "```pycon\n>>> f()\n```" in md
