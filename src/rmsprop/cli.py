"""The `rmsprop` command: thin argparse front-ends to the library's jobs.

Manners, for every command wrapped in :func:`_user_facing`: a user error (a bad argument, a
missing optional dependency, an ``--out`` that cannot be written) prints one line to stderr and
exits 2 before any work starts; Ctrl-C stops at once with one line and exit 130, and leaves no
half-written results (files are written whole, at the end, or not at all).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["main", "UserError"]

EXIT_USAGE = 2  # argparse's exit code for a bad command line
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


class UserError(Exception):
    """A mistake in the command line or the environment, reported as one line and exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (the usage is one ``--help`` away)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def caused_by_ctrl_c(exc: BaseException) -> bool:
    """Whether a KeyboardInterrupt stands behind ``exc``: as its cause or context, or inside an
    exception group, at any depth.

    CPython 3.11 re-raises an exception from a class's ``__set_name__`` (every dataclass field,
    every ``functools.cached_property``) as the cause of a RuntimeError, so a Ctrl-C that lands
    while a module is being imported can arrive as one."""
    pending, seen = [exc], set()
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        pending += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return False


@contextlib.contextmanager
def _ctrl_c_held():
    """Hold a Ctrl-C pressed inside the block until the block ends, then raise it.

    For imports: a KeyboardInterrupt raised inside a library's import can be swallowed by an
    ``except Exception`` around an optional import (after CPython 3.11 has turned it into a
    RuntimeError, above), and the command would run on as if nothing was pressed. Only where
    Ctrl-C has Python's own handler (not ignored, not a caller's), on the main thread."""
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    pressed: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if pressed:
        raise KeyboardInterrupt


def _import_what_a_first_step_imports() -> None:
    """Import torch._dynamo now, before a command starts its work, with Ctrl-C held: torch
    imports it (about 900 modules, a second or more) on an optimizer's first ``step`` or
    ``zero_grad``, where a Ctrl-C could be swallowed (above)."""
    with _ctrl_c_held():
        import torch._dynamo  # noqa: F401


def _user_facing(prog: str) -> Callable[[Callable[[argparse.Namespace], int]], Callable[..., int]]:
    """Run a command handler with the CLI's manners: UserError -> one line, exit 2; Ctrl-C -> one
    line, exit 130 (anything the handler was writing is its job to write atomically)."""

    def wrap(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(handler)
        def run(args: argparse.Namespace) -> int:
            try:
                _import_what_a_first_step_imports()
                return handler(args)
            except UserError as exc:
                print(f"{prog}: error: {exc}", file=sys.stderr)
                return EXIT_USAGE
            except (KeyboardInterrupt, Exception) as exc:
                if not caused_by_ctrl_c(exc):
                    raise
                print(f"\n{prog}: interrupted; no results were written", file=sys.stderr)
                return EXIT_INTERRUPTED

        return run

    return wrap


def _output_folder(text: str, option: str = "--out") -> Path:
    """Check, before any work, that ``text`` names a folder this process can create files in.

    It may exist (its files are then replaced) or not (it is created when the results are
    saved); it must not be a file. Folders created for the check are removed again, so a run
    stopped later leaves nothing behind.
    """
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {text} is a file; give a folder (it is created if missing)")
    created = []
    try:
        for folder in reversed([path, *path.parents]):
            if not folder.exists():
                folder.mkdir()
                created.append(folder)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UserError(f"{option} {text} cannot be written ({reason})") from None
    finally:
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                pass
    return path


@_user_facing("rmsprop demo")
def _demo(args: argparse.Namespace) -> int:
    from .demo import train_seed_example
    from .presets import PRESETS, from_preset

    if args.preset is None:
        from .optimizer import RMSprop

        def make(model):
            return RMSprop(model.parameters(), lr=0.01, alpha=0.9, eps=1e-8)

        print("rmsprop.RMSprop(lr=0.01, alpha=0.9, eps=1e-08) on the seed example")
    else:
        preset = PRESETS[args.preset]

        def make(model):
            return from_preset(args.preset, model.parameters())

        print(f"preset {args.preset!r} ({preset.peer}): {dict(preset.options)}")
    train_seed_example(make, epochs=args.epochs, seed=args.seed)
    return 0


@_user_facing("rmsprop bench")
def _bench(args: argparse.Namespace) -> int:
    import torch

    from .backends import fused_cpu
    from .bench.runner import plotting_unavailable, run_bench, save

    # Everything that can be wrong with the request is found here, before minutes of measuring.
    out = _output_folder(args.out)
    if args.device == "cuda":
        return _bench_cuda(args, out)
    if args.dry_run:
        raise UserError("--dry-run is for --device cuda")
    if args.plot and (why := plotting_unavailable()):
        raise UserError(why)
    if not fused_cpu.is_available():
        raise UserError(f"the benchmark needs the fused kernel, which is unavailable: {fused_cpu.load_error()}")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = run_bench(
        quick=args.quick,
        configs=args.configs,
        compile_torch=not args.no_compile,
        first_step=not args.no_first_step,
        state_formats=not args.no_state,
        state_only=args.state_only,
    )
    if "first_step" in results:
        f = results["first_step"]
        print(
            f"\nfirst step in a fresh process: fused {f['fused']['first_step_s']:.3f} s, "
            f"foreach {f['foreach']['first_step_s']:.3f} s "
            f"(fused costs {f['fused_first_minus_foreach_first_s']:+.3f} s more)"
        )
    results["seconds"] = round(time.perf_counter() - start, 1)
    for path in save(results, out, plot=args.plot):
        print(f"wrote {path}")
    print(f"{len(results['configs'])} configurations in {results['seconds']} s")
    if results.get("state_formats"):
        print(f"state formats: {len(results['state_formats'])} configurations (bench.md's last tables)")
    return 0


def _bench_cuda(args: argparse.Namespace, out: Path) -> int:
    """`rmsprop bench --device cuda`: the Triton kernel against torch on a GPU (see bench/cuda.py)."""
    import torch

    from .bench.cuda import run_cuda_bench, save_cuda

    for flag, given in (("--plot", args.plot), ("--no-first-step", args.no_first_step)):
        if given:
            raise UserError(f"{flag} is for the CPU benchmark, not --device cuda")
    if not args.dry_run and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA device (--dry-run runs the code on the CPU)")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run_cuda_bench(
        quick=args.quick,
        configs=args.configs,
        compile_torch=not args.no_compile,
        dry_run=args.dry_run,
        checkpoint=lambda partial: save_cuda(partial, out),  # a time-out keeps the rows done
    )
    for key, value in results["acceptance"].items():
        print(f"{key}: {value}")
    for path in save_cuda(results, out):
        print(f"wrote {path}")
    return 0


def _compare_output_folder(text: str):
    """The --out folder, created if missing, or a one-line error before any work starts."""
    import tempfile
    from pathlib import Path

    out = Path(text)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"rmsprop compare: --out {text} is an existing file; give a folder for the report")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise SystemExit(f"rmsprop compare: cannot write to --out {text}: {exc.strerror or exc}") from None
    return out


def _compare(args: argparse.Namespace) -> int:
    import time

    missing = [m for m in ("tqdm", "matplotlib", "sklearn", "gymnasium") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(
            f"rmsprop compare needs the report extra (missing: {', '.join(missing)}): pip install 'rmsprop[report]'"
        )
    out = _compare_output_folder(args.out)

    try:
        with _ctrl_c_held():  # matplotlib, scikit-learn and torch._dynamo: see _ctrl_c_held
            from tqdm import tqdm

            from .experiments import report
            from .experiments.optimizers import STATE_FORMAT_STUDY
            from .experiments.runner import default_workers, run_compare, run_details

            _import_what_a_first_step_imports()
        workers = args.workers or default_workers()
        start = time.perf_counter()  # the runs' time, as before: not the imports'
        results = run_compare(
            quick=args.quick,
            tasks=args.tasks,
            optimizers=list(STATE_FORMAT_STUDY) if args.state_formats else args.optimizers,
            selection_seeds=args.selection_seeds,
            report_seeds=args.report_seeds,
            seed=args.seed,
            workers=workers,
            progress=lambda total: tqdm(total=total, desc="training runs", unit="run", smoothing=0.05),
        )
        results["setup"]["run"] = run_details(time.perf_counter() - start, workers, " ".join(sys.argv))
        paths = report.write(results, out)
    except (KeyboardInterrupt, Exception) as exc:
        if not caused_by_ctrl_c(exc):
            raise
        print("\nrmsprop compare: interrupted; the workers are stopped and no report was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    primary = [c for c in results["claims"] if c["primary"]]
    width = max((len(c["claim"]) for c in primary), default=5)
    print(f"\n{'claim':<{width}}  verdict ({primary[0]['rmsprop'] if primary else 'RMSProp'})")
    for c in primary:
        print(f"{c['claim']:<{width}}  {c['verdict']}")
    print(
        f"\n{len(results['tasks'])} tasks, {results['setup']['runs']} training runs in "
        f"{results['setup']['run']['seconds']} s; wrote " + ", ".join(str(p) for p in paths[:3])
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .presets import PRESETS

    parser = _Parser(prog="rmsprop", description="RMSProp for PyTorch.")
    parser.add_argument("--version", action="version", version=f"rmsprop {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser(
        "demo",
        help="train the seed document's SimpleNet example (a few seconds)",
        description="Train SimpleNet, the example of the seed document (RMSProp.md, the write-up "
        "this project started from), for --epochs full-batch steps and print each loss. "
        "Takes a few seconds, most of it importing torch.",
    )
    demo.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="use a preset instead of the seed example's lr=0.01, alpha=0.9, eps=1e-8",
    )
    demo.add_argument("--epochs", type=_positive_int, default=10)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)

    from .bench.cuda import CUDA_CONFIGS
    from .bench.runner import CONFIGS

    bench = sub.add_parser(
        "bench",
        help="measure step throughput of every implementation side by side (minutes)",
        description="Time one optimizer step of every implementation on the same tensors, interleaved "
        "round-robin, against a native bandwidth bound; write bench.json and bench.md (and bench.png) "
        "into --out. Takes minutes: --quick took 3 to 5 minutes on the README's 2-core machine while "
        "other jobs shared it, and the full run (five configurations, torch.compile) takes longer. "
        "Each run prints its own time and records it in bench.json.",
    )
    bench.add_argument(
        "--quick", action="store_true", help="three configurations, fewer repeats, no torch.compile"
    )
    bench.add_argument(
        "--configs",
        nargs="+",
        choices=list(CONFIGS) + [c for c in CUDA_CONFIGS if c not in CONFIGS],
        metavar="NAME",
        help=f"from {list(CONFIGS)} (cpu) or {list(CUDA_CONFIGS)} (cuda)",
    )
    bench.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cpu: the fused C kernel (default); cuda: the Triton kernel against torch on a GPU",
    )
    bench.add_argument(
        "--dry-run",
        action="store_true",
        help="with --device cuda: run its code on the CPU at tiny sizes, the kernel interpreted (no GPU needed)",
    )
    bench.add_argument(
        "--out", default="bench-results", help="folder for bench.json, bench.md (and bench.png)"
    )
    bench.add_argument("--plot", action="store_true", help="also write bench.png (needs matplotlib)")
    bench.add_argument("--threads", type=_positive_int, default=None, help="torch.set_num_threads first")
    bench.add_argument("--no-compile", action="store_true", help="skip the torch.compile-d torch optimizer")
    bench.add_argument(
        "--no-first-step", action="store_true", help="skip the fresh-process first-step timing"
    )
    bench.add_argument("--no-state", action="store_true", help="skip the fp32 / bf16 / int8 state_dtype rows")
    bench.add_argument(
        "--state-only", action="store_true", help="only the state_dtype rows (10x1M fp32: step time, bytes)"
    )
    bench.set_defaults(run=_bench)

    from .experiments import FULL_TIME, QUICK_TIME
    from .experiments.optimizers import OPTIMIZERS, STATE_FORMAT_STUDY
    from .experiments.tasks import TASKS

    compare = sub.add_parser("compare", help="test RMSProp's claims with real training runs; write a report")
    compare.add_argument(
        "--quick",
        action="store_true",
        help=f"small sizes, 4 lrs, 1 selection + 2 report seeds, no RMSProp variants ({QUICK_TIME})",
    )
    compare.add_argument(
        "--tasks", nargs="+", choices=list(TASKS), metavar="NAME", help=f"from {list(TASKS)}"
    )
    which = compare.add_mutually_exclusive_group()
    which.add_argument(
        "--optimizers", nargs="+", choices=list(OPTIMIZERS), metavar="NAME", help=f"from {list(OPTIMIZERS)}"
    )
    which.add_argument(
        "--state-formats",
        action="store_true",
        help=f"the state-format study instead: {list(STATE_FORMAT_STUDY)} (float32, bf16 and int8 state)",
    )
    compare.add_argument(
        "--selection-seeds",
        type=_positive_int,
        default=None,
        help="seeds the lr is chosen on (default 1 quick, 2 full)",
    )
    compare.add_argument(
        "--report-seeds",
        type=_positive_int,
        default=None,
        help="further seeds every reported number comes from (default 2 quick, 3 full)",
    )
    compare.add_argument("--seed", type=int, default=0, help="first seed (selection seeds first, then report)")
    compare.add_argument(
        "--workers", type=_positive_int, default=None, help="worker processes (default: up to 2)"
    )
    compare.add_argument(
        "--out",
        required=True,
        help=f"folder for results.json, report.md, report.html and the plots (full run: {FULL_TIME})",
    )
    compare.set_defaults(run=_compare)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except (KeyboardInterrupt, Exception) as exc:  # Ctrl-C while torch is still importing
        if not caused_by_ctrl_c(exc):
            raise
        print("\nrmsprop: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
