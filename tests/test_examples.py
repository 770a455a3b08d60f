"""The examples run as a user runs them (in a subprocess, from the repository root)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a3c_cartpole_quick_trains_with_shared_rmsprop(tmp_path):
    """``--quick``: 2 spawned workers x 150 updates on one shared model and one shared RMSprop.
    Checked: every loss finite; every update counted; the shared step counter moved by the
    workers' steps (at most one per update: Hogwild may lose a concurrent increment, never add
    one); and the greedy policy left its starting point. With seed 0 the untrained greedy policy
    always pushes one way and scores 9.2, about the least CartPole gives; after the quick run it
    scored 22-134 in every run and seed tried, so "above the start" is a loose bound on
    learning, not a lucky threshold."""
    out = tmp_path / "a3c.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "a3c_cartpole.py"), "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["losses_finite"] and summary["n_losses"] == 300
    assert summary["updates"] == 300
    assert 0 < summary["shared_step_counter"] <= 300
    assert summary["greedy_return_before"] < 15
    assert summary["greedy_return_after"] > summary["greedy_return_before"]
    assert all(math.isfinite(summary[k]) for k in ("greedy_return_after", "mean_return_last_20_episodes"))
