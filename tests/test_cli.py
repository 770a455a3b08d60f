"""CLI manners of `rmsprop bench` and `rmsprop demo`, tried as a person would, through a real
process: a user error is one line on stderr and exit 2 before any work; Ctrl-C is one line and
exit 130, with no traceback and no half-written results."""

from __future__ import annotations

import builtins
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import sigint_as_a_terminal_has_it

from rmsprop import cli
from rmsprop.bench import runner

ROOT = Path(__file__).resolve().parents[1]
# A command stopped by Ctrl-C exits 130, or, where the interrupt landed inside an exec() (CPython
# then sets its "unhandled KeyboardInterrupt" flag even though the command caught it), is ended by
# SIGINT at exit: a shell reports both as 130.
STOPPED_BY_CTRL_C = (130, -signal.SIGINT)


def _rmsprop(*args: str, prelude: str = "", **kwargs) -> subprocess.CompletedProcess:
    code = f"{prelude}\nimport sys\nfrom rmsprop.cli import main\nsys.exit(main({list(args)!r}))"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, **kwargs
    )


def _in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """cli.main as the `rmsprop` entry point runs it (sys.exit(main())), in this process: the
    argument errors need no fresh interpreter, and each subprocess costs seconds of torch import."""
    try:
        code = cli.main(list(args))
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def _assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == "", "work started before the error was found: " + result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    # an unknown option is reported by the top-level parser, as "rmsprop: error: ..."
    assert lines[0].startswith(("rmsprop bench: error: ", "rmsprop demo: error: ", "rmsprop: error: ")), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


def _unwritable(tmp_path: Path) -> Path:
    """A folder this process cannot create files in. root may write almost anywhere; /proc it
    cannot create anything in."""
    if os.geteuid() == 0:
        return Path("/proc/rmsprop-bench-out")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return locked / "out"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_bench_refuses_an_out_it_cannot_write_before_measuring(tmp_path):
    """In a real process: the error must come before any measuring, and with no traceback."""
    target = _unwritable(tmp_path)
    _assert_one_line_error(_rmsprop("bench", "--quick", "--out", str(target)), "cannot be written")
    assert not target.exists()


def test_bench_refuses_an_out_that_is_a_file_or_inside_one(tmp_path, capsys):
    existing = tmp_path / "results.txt"
    existing.write_text("keep me")
    _assert_one_line_error(_in_process(capsys, "bench", "--out", str(existing)), "is a file")
    _assert_one_line_error(_in_process(capsys, "bench", "--out", str(existing / "sub")), "cannot be written")
    assert existing.read_text() == "keep me"


def test_bench_plot_without_matplotlib_is_refused_up_front(tmp_path):
    # sys.modules[name] = None makes `import matplotlib` raise ImportError, as if not installed.
    out = tmp_path / "out"
    result = _rmsprop("bench", "--quick", "--plot", "--out", str(out), prelude="import sys; sys.modules['matplotlib'] = None")
    _assert_one_line_error(result, "--plot needs matplotlib", "rmsprop[report]")
    assert not out.exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (("bench", "--threads", "0"), "--threads: must be >= 1"),
        (("bench", "--configs", "nope"), "invalid choice: 'nope'"),
        (("bench", "--bogus"), "unrecognized arguments: --bogus"),
        (("demo", "--epochs", "ten"), "expected a positive integer, got 'ten'"),
        (("demo", "--preset", "adam"), "invalid choice: 'adam'"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(args, needle, capsys):
    _assert_one_line_error(_in_process(capsys, *args), needle, "--help")


def test_bench_without_the_kernel_is_one_line(monkeypatch, capsys, tmp_path):
    from rmsprop.backends import fused_cpu

    monkeypatch.setattr(fused_cpu, "is_available", lambda: False)
    monkeypatch.setattr(fused_cpu, "load_error", lambda: "not built (test)")
    assert cli.main(["bench", "--quick", "--out", str(tmp_path / "o")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip().endswith("unavailable: not built (test)")


def _interrupt_after_first_line(args: list[str]) -> tuple[int, str, float]:
    """Start `rmsprop ARGS`, wait until it has started working (its first line of output), send
    SIGINT as Ctrl-C does, read the rest of its output as a terminal would; return the exit code,
    stderr and the seconds from SIGINT to exit."""
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "rmsprop", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=sigint_as_a_terminal_has_it,
    )  # fmt: skip
    try:
        assert proc.stdout.readline(), "no output before exit: " + proc.stderr.read()
        time.sleep(0.5)  # well inside the work
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
        return proc.returncode, stderr, time.monotonic() - start
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT")
def test_ctrl_c_stops_bench_at_once_and_writes_nothing(tmp_path):
    out = tmp_path / "bench-out"
    code, stderr, seconds = _interrupt_after_first_line(
        ["bench", "--quick", "--no-first-step", "--out", str(out)]
    )
    assert code in STOPPED_BY_CTRL_C, stderr
    assert stderr.strip() == "rmsprop bench: interrupted; no results were written", stderr
    assert seconds < 10, seconds  # one step of the quick configurations is well under a second
    assert not out.exists()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT")
def test_ctrl_c_stops_demo_with_one_line():
    code, stderr, _ = _interrupt_after_first_line(["demo", "--epochs", "100000000"])
    assert code in STOPPED_BY_CTRL_C and stderr.strip() == "rmsprop demo: interrupted; no results were written", stderr


class _RaisesOnNaming:
    def __set_name__(self, owner, name):
        raise KeyboardInterrupt


def test_a_ctrl_c_that_python_turned_into_another_error_is_still_an_interrupt(monkeypatch, capsys, tmp_path):
    # What CPython 3.11 does with a Ctrl-C that lands while a class is built (torch's lazy imports
    # build hundreds of dataclasses): a RuntimeError caused by the KeyboardInterrupt.
    try:
        type("Built", (), {"field": _RaisesOnNaming()})
    except (KeyboardInterrupt, Exception) as exc:
        landed = exc
    assert cli.caused_by_ctrl_c(landed)

    def interrupted(**kwargs):
        raise RuntimeError("while importing") from landed

    monkeypatch.setattr(runner, "run_bench", interrupted)
    assert cli.main(["bench", "--quick", "--out", str(tmp_path / "o")]) == 130
    captured = capsys.readouterr()
    assert captured.err.strip() == "rmsprop bench: interrupted; no results were written"
    assert not (tmp_path / "o").exists()

    def broken(**kwargs):
        try:
            raise ValueError("a bug")
        except ValueError as exc:
            raise RuntimeError("another bug") from exc

    monkeypatch.setattr(runner, "run_bench", broken)
    with pytest.raises(RuntimeError, match="another bug"):  # an error not caused by Ctrl-C is not hidden
        cli.main(["bench", "--quick", "--out", str(tmp_path / "o")])


def _swallows_a_ctrl_c_pressed_inside():
    """What an optional import wrapped in ``except Exception`` does to a Ctrl-C that lands in it
    (after CPython 3.11 has made it a RuntimeError; here the except is broad enough alone)."""
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs here
    except BaseException:
        pass


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT")
def test_a_ctrl_c_inside_the_imports_is_held_not_lost(monkeypatch, capsys, tmp_path):
    # Python's own handler, as in a terminal (a suite run as a background job has SIGINT ignored)
    ran = []
    monkeypatch.setattr(runner, "run_bench", lambda **kwargs: ran.append(1) or {"configs": [], "machine": {}, "quick": True})

    def imports():
        with cli._ctrl_c_held():
            _swallows_a_ctrl_c_pressed_inside()

    monkeypatch.setattr(cli, "_import_what_a_first_step_imports", imports)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert cli.main(["bench", "--quick", "--out", str(tmp_path / "o")]) == 130
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back
        with cli._ctrl_c_held():  # nothing pressed: nothing raised
            pass
    finally:
        signal.signal(signal.SIGINT, previous)
    assert capsys.readouterr().err.strip() == "rmsprop bench: interrupted; no results were written"
    assert not ran and not (tmp_path / "o").exists()


def test_an_error_with_an_interrupt_anywhere_in_its_chain_counts_as_one():
    interrupt = KeyboardInterrupt()
    try:
        raise ValueError("cleanup") from interrupt
    except ValueError as exc:
        direct = exc
    beside = RuntimeError("caused by a bug")
    beside.__cause__, beside.__context__ = ValueError("the bug"), interrupt  # an interrupt behind a cause
    assert cli.caused_by_ctrl_c(direct) and cli.caused_by_ctrl_c(beside)
    plain = RuntimeError("a bug")
    plain.__cause__ = ValueError("its cause")
    assert not cli.caused_by_ctrl_c(plain)
    groups = getattr(builtins, "BaseExceptionGroup", None)  # Python 3.11+
    if groups is not None:
        assert cli.caused_by_ctrl_c(groups("workers", [ValueError("one"), interrupt]))
        assert not cli.caused_by_ctrl_c(groups("workers", [ValueError("one")]))


def test_a_command_imports_what_the_first_step_would_before_it_starts():
    # torch imports torch._dynamo on an optimizer's first step; a Ctrl-C inside those ~900 imports
    # can be swallowed by torch, so the commands import it before their work starts.
    done = _rmsprop(
        "demo", "--epochs", "1",
        prelude="import sys, rmsprop.demo as d\n"
        "d.train_seed_example = lambda *a, **k: print('dynamo' if 'torch._dynamo' in sys.modules else 'not yet')",
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == "dynamo", done.stdout + done.stderr


def _tiny_results() -> dict:
    tiny = runner.Config("tiny fp32", ((1000,), (37,)))
    runner.CONFIGS[tiny.name] = tiny
    try:
        return runner.run_bench(configs=[tiny.name], compile_torch=False, first_step=False, quick=True, log=lambda s: None)
    finally:
        del runner.CONFIGS[tiny.name]


def test_an_interrupted_save_leaves_each_file_whole(tmp_path, monkeypatch):
    results = _tiny_results()
    (tmp_path / "bench.md").write_text("the previous run's table\n")

    def interrupted(_results):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "markdown_table", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runner.save(results, tmp_path, plot=False)
    assert json.loads((tmp_path / "bench.json").read_text())["configs"][0]["name"] == "tiny fp32"
    assert (tmp_path / "bench.md").read_text() == "the previous run's table\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "bench.md"]  # no partial file


def test_bench_reports_and_records_its_own_time(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "run_bench", lambda **kwargs: {"configs": [], "machine": {}, "quick": True})
    assert cli.main(["bench", "--quick", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("0 configurations in ")
    assert json.loads((tmp_path / "bench.json").read_text())["seconds"] >= 0


def test_save_with_plot_writes_a_png(tmp_path):
    paths = runner.save(_tiny_results(), tmp_path / "new" / "folder", plot=True)
    assert [p.name for p in paths] == ["bench.json", "bench.md", "bench.png"]
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_help_states_one_time_per_command(capsys):
    for command, time_stated in (("demo", "Takes a few seconds"), ("bench", "--quick took 3 to 5 minutes")):
        result = _in_process(capsys, command, "--help")
        assert result.returncode == 0 and time_stated in " ".join(result.stdout.split()), result.stdout
