"""`rmsprop compare` from the command line: bad --out refused before any work, and Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import sigint_as_a_terminal_has_it

from rmsprop import cli


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the study starts."""
    from rmsprop.experiments import runner

    def started(**kwargs):
        raise AssertionError("work started before --out was checked")

    monkeypatch.setattr(runner, "run_compare", started)


def test_out_naming_an_existing_file_is_refused_in_one_line(tmp_path, no_work):
    target = tmp_path / "report.html"
    target.write_text("keep me")
    with pytest.raises(SystemExit) as exc:
        cli.main(["compare", "--quick", "--out", str(target)])
    message = str(exc.value.code)
    assert "existing file" in message and str(target) in message and "\n" not in message
    assert target.read_text() == "keep me"


def test_out_that_cannot_be_created_is_refused_in_one_line(tmp_path, no_work):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exc:
        cli.main(["compare", "--quick", "--out", str(blocker / "sub")])
    message = str(exc.value.code)
    assert message.startswith("rmsprop compare: cannot write to --out") and "\n" not in message


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker processes through /proc")
def test_ctrl_c_stops_at_once_ends_the_workers_and_writes_nothing(tmp_path):
    out = tmp_path / "report"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rmsprop",
            "compare",
            "--quick",
            "--tasks",
            "text",
            "--workers",
            "2",
            "--out",
            str(out),
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job has
        preexec_fn=sigint_as_a_terminal_has_it,
    )
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not re.search(r"\| *[1-9]\d*/\d+", "".join(err)):
            time.sleep(0.2)  # until the workers have finished a first training run
        workers = [p for p in _children(proc.pid) if _alive(p)]
        assert len(workers) >= 2, "".join(err)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group
        started = time.monotonic()
        rc = proc.wait(timeout=30)
        stopped_in = time.monotonic() - started
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=5)
    assert rc == 130
    assert stopped_in < 10
    lines = [line for line in "".join(err).replace("\r", "\n").splitlines() if line.strip()]
    assert "interrupted" in lines[-1] and "Traceback" not in "".join(err)
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in workers if _alive(p)], "orphaned workers"
    assert not any(out.iterdir())  # no report, no staging folder


def test_state_formats_runs_the_state_format_study(tmp_path, monkeypatch):
    """--state-formats hands run_compare RMSprop momentum and its low-bit formats; it cannot be
    combined with --optimizers."""
    from rmsprop.experiments import runner
    from rmsprop.experiments.optimizers import STATE_FORMAT_STUDY

    seen = {}

    def started(**kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_compare", started)
    cli.main(["compare", "--quick", "--state-formats", "--out", str(tmp_path / "out")])
    assert seen["optimizers"] == list(STATE_FORMAT_STUDY)
    with pytest.raises(SystemExit) as exc:
        cli.main(["compare", "--state-formats", "--optimizers", "Adam", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
