"""Packaging fit for a registry: the license, the metadata, an sdist whose tests can run, a stripped
kernel, and a build without a C compiler that says so where a person can see it."""

from __future__ import annotations

import email.parser
import os
import select
import shutil
import struct
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

import rmsprop
from rmsprop.backends import fused_cpu
from rmsprop.backends.fused_cpu import native

ROOT = Path(__file__).resolve().parents[1]
NOT_BUILT = "the fused CPU kernel was NOT built"


_NOT_SOURCE = ("*.egg-info", ".venv", ".git", "build", "dist", "site", "report", "bench-results", "__pycache__",
               ".hypothesis", ".ruff_cache", ".pytest_cache", "*.so")


def _checkout_copy(dest: Path) -> Path:
    """The project's files as a fresh clone has them. Building from the working tree itself would
    let a stale src/*.egg-info/SOURCES.txt (left by an earlier build) decide the sdist's files."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, text=True,
    )
    if listed.returncode != 0:  # not a git checkout (e.g. an unpacked sdist)
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(*_NOT_SOURCE))
        return dest
    for name in filter(None, listed.stdout.split("\0")):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sdist")
    source = _checkout_copy(tmp_path_factory.mktemp("checkout") / "rmsprop")
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out), str(source)],
        check=True,
        capture_output=True,
        text=True,
    )
    (archive,) = out.glob("rmsprop-*.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(out, filter="data")
    (tree,) = (p for p in out.iterdir() if p.is_dir())
    return tree


def test_sdist_ships_every_test_module_and_what_it_needs(sdist):
    shipped = {p.relative_to(sdist).as_posix() for p in sdist.rglob("*") if p.is_file()}
    for path in sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "examples").glob("*.py")):
        assert path.relative_to(ROOT).as_posix() in shipped, f"{path.name} is missing from the sdist"
    # tests/test_docs.py builds the site: its sources and the data its pages link to
    for name in ("mkdocs.yml", "scripts/mkdocs_hooks.py", "scripts/griffe_torch_docstrings.py"):
        assert name in shipped
    docs = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*") if p.is_file()}
    assert docs <= shipped, sorted(docs - shipped)
    for name in ("LICENSE", "README.md", "CHANGELOG.md", "setup.py", "pyproject.toml", "MANIFEST.in"):
        assert name in shipped
    assert "src/rmsprop/_cpu/rmsprop_cpu.c" in shipped and "src/rmsprop/py.typed" in shipped
    assert not [f for f in shipped if f.endswith((".so", ".pyc")) or f.startswith(("site/", "report/"))]



def test_metadata_names_the_license_file_it_ships(sdist):
    """What a registry reads: PKG-INFO, as built from pyproject.toml."""
    info = email.parser.Parser().parsestr((sdist / "PKG-INFO").read_text())
    assert info["License-Expression"] == "BSD-3-Clause" and info["License-File"] == "LICENSE"
    text = (sdist / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License")
    assert "Copyright (c) 2026, the rmsprop authors" in text
    assert "Neither the name of the copyright holder nor the names of its" in text  # clause 3
    assert info["Author"] == "the rmsprop authors" and "pytorch" in info["Keywords"].split(",")
    classifiers = info.get_all("Classifier")
    assert "Programming Language :: Python :: 3.11" in classifiers and "Typing :: Typed" in classifiers
    # An SPDX expression plus a License :: classifier is an error for setuptools >= 77 and PyPI.
    assert not [c for c in classifiers if c.startswith("License ::")]


def test_sdist_tests_import_and_collect_from_the_sdist_alone(sdist):
    """pytest collects the sdist's suite with the sdist's own rmsprop: every conftest, helper and
    peer module a test imports is in it (collection imports every test module)."""
    env = {**os.environ, "PYTHONPATH": str(sdist / "src"), "PYTHONWARNINGS": "ignore"}
    where = subprocess.run(
        [sys.executable, "-c", "import rmsprop; print(rmsprop.__file__)"],
        cwd=sdist, env=env, capture_output=True, text=True, check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(sdist)
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=sdist, env=env, capture_output=True, text=True,
    )
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    assert " tests collected" in collected.stdout and "error" not in collected.stdout.splitlines()[-1]


def _elf_section_names(path: Path) -> set[str]:
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "64-bit little-endian ELF expected"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab_offset = headers[shstrndx][4]
    names = set()
    for name_offset, *_ in headers:
        start = strtab_offset + name_offset
        names.add(data[start : data.index(b"\0", start)].decode())
    return names


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the ELF check reads a Linux build")
def test_the_compiled_kernel_has_no_debug_info_or_static_symbols():
    path = Path(native.LIB._name)
    sections = _elf_section_names(path)
    assert ".text" in sections and ".dynsym" in sections  # the parser reads real headers
    assert not {s for s in sections if s.startswith(".debug")}, sorted(sections)
    assert ".symtab" not in sections  # -s
    assert path.stat().st_size < 4_000_000  # 7.5 MB with the debug info Python's CFLAGS add
    assert rmsprop.RMSprop is not None and fused_cpu.is_available()  # what ctypes needs survived


def _source_tree(tmp_path: Path) -> Path:
    """What a build needs, copied (pip builds in place; the repository's build/ stays clean)."""
    tree = tmp_path / "src-tree"
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md", "MANIFEST.in"):
        tree.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(
        ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info")
    )
    return tree


def _in_a_terminal(cmd: list[str], env: dict, timeout: float = 240) -> tuple[int, str]:
    """Run ``cmd`` with a pseudo-terminal as its controlling terminal and stdio, as a person's
    shell would; return the exit code and everything the terminal showed."""
    import fcntl
    import pty
    import termios

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        cmd,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
    )
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every process holding the terminal has exited
                break
            if not chunk:
                break
            chunks.append(chunk)
        elif proc.poll() is not None:
            break
    else:
        proc.kill()
    os.close(master)
    return proc.wait(timeout=30), b"".join(chunks).decode(errors="replace")


def _pip_wheel(tree: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "wheel", str(tree), "--no-deps", "--no-build-isolation", "-w", str(out)]


@pytest.mark.skipif(sys.platform == "win32", reason="a POSIX terminal is needed")
def test_a_build_without_a_compiler_says_so_in_a_plain_pip_install(tmp_path):
    """No `pip -v`: pip hides a successful build's output, so the notice must reach the terminal."""
    tree, out = _source_tree(tmp_path), tmp_path / "wheels"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_VERBOSE")}
    env.update(CC="/bin/false", RMSPROP_REQUIRE_KERNEL="")
    code, shown = _in_a_terminal(_pip_wheel(tree, out), env)
    assert code == 0, shown[-3000:]
    assert NOT_BUILT in shown, shown[-3000:]
    assert "5-6x slower" in shown and "RMSPROP_REQUIRE_KERNEL=1" in shown
    (wheel,) = out.glob("rmsprop-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "rmsprop/optimizer.py" in names and not [n for n in names if n.endswith(".so")]


def test_a_build_without_a_compiler_fails_when_the_kernel_is_required(tmp_path):
    tree, out = _source_tree(tmp_path), tmp_path / "wheels"
    env = {**os.environ, "CC": "/bin/false", "RMSPROP_REQUIRE_KERNEL": "1"}
    result = subprocess.run(_pip_wheel(tree, out), env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "RMSPROP_REQUIRE_KERNEL is set" in result.stdout + result.stderr
    assert not list(out.glob("*.whl"))
