"""The `rmsprop` command: thin argparse front-ends to the library's jobs."""

from __future__ import annotations

import argparse
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
