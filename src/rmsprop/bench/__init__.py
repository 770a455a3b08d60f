"""`rmsprop bench`: step throughput of every implementation, measured side by side in one run."""

from .runner import CONFIGS, IMPLEMENTATIONS, run_bench

__all__ = ["CONFIGS", "IMPLEMENTATIONS", "run_bench"]
