"""The `rmsprop` command: thin argparse front-ends to the library's jobs."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence

__all__ = ["main"]


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


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from .bench.runner import run_bench, save

    if args.threads:
        torch.set_num_threads(args.threads)
    results = run_bench(
        quick=args.quick,
        configs=args.configs,
        compile_torch=not args.no_compile,
        first_step=not args.no_first_step,
    )
    if "first_step" in results:
        f = results["first_step"]
        print(
            f"\nfirst step in a fresh process: fused {f['fused']['first_step_s']:.3f} s, "
            f"foreach {f['foreach']['first_step_s']:.3f} s "
            f"(fused costs {f['fused_first_minus_foreach_first_s']:+.3f} s more)"
        )
    for path in save(results, Path(args.out), plot=args.plot):
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

    from tqdm import tqdm

    from .experiments import report
    from .experiments.runner import default_workers, run_compare, run_details

    workers = args.workers or default_workers()
    start = time.perf_counter()
    try:
        results = run_compare(
            quick=args.quick,
            tasks=args.tasks,
            optimizers=args.optimizers,
            selection_seeds=args.selection_seeds,
            report_seeds=args.report_seeds,
            seed=args.seed,
            workers=workers,
            progress=lambda total: tqdm(total=total, desc="training runs", unit="run", smoothing=0.05),
        )
        results["setup"]["run"] = run_details(time.perf_counter() - start, workers, " ".join(sys.argv))
        paths = report.write(results, out)
    except KeyboardInterrupt:
        print("\nrmsprop compare: interrupted; the workers are stopped and no report was written", file=sys.stderr)
        return 130
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

    parser = argparse.ArgumentParser(prog="rmsprop", description="RMSProp for PyTorch.")
    parser.add_argument("--version", action="version", version=f"rmsprop {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train the seed document's SimpleNet example")
    demo.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="use a preset instead of the seed example's lr=0.01, alpha=0.9, eps=1e-8",
    )
    demo.add_argument("--epochs", type=_positive_int, default=10)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)

    from .bench.runner import CONFIGS

    bench = sub.add_parser("bench", help="measure step throughput of every implementation side by side")
    bench.add_argument(
        "--quick", action="store_true", help="three configurations, fewer repeats, no torch.compile"
    )
    bench.add_argument(
        "--configs", nargs="+", choices=list(CONFIGS), metavar="NAME", help=f"from {list(CONFIGS)}"
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
    bench.set_defaults(run=_bench)

    from .experiments import FULL_TIME, QUICK_TIME
    from .experiments.optimizers import OPTIMIZERS
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
    compare.add_argument(
        "--optimizers", nargs="+", choices=list(OPTIMIZERS), metavar="NAME", help=f"from {list(OPTIMIZERS)}"
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
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
