"""The measurements the verdicts use, as pure functions of a run's numbers.

Every comparison is made on a task's *score*: the metric with a run that failed to improve on
the untrained model counted as the untrained model (so a diverged run is no better and no worse
than not training), on a log10 scale for tasks whose metric spans decades.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

LOG_FLOOR = 1e-30  # metrics that reach exactly 0 (float underflow) stay finite on a log scale
SPIKE_FRACTION = 0.5  # a spike gives back more than half the progress made so far
SMOOTH_POINTS = 5  # logged points in the running mean applied to noisy curves
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_LEVEL = 0.95
BOOTSTRAP_SEED = 0  # the resampling is part of the rule: fixed, so a verdict is a function of the numbers


def diverged(final: float, initial: float) -> bool:
    """A run diverged when its final metric is not better than the untrained model's: inf/NaN,
    or a finite value at or above the starting one (an MSE of 39 from a start of 1.06)."""
    return not math.isfinite(final) or final >= initial


def to_scale(value: float, log_scale: bool) -> float:
    return math.log10(max(value, LOG_FLOOR)) if log_scale else value


def score(final: float, initial: float, log_scale: bool) -> float:
    """The value compared and averaged: the metric, capped at the untrained model's when the run
    diverged, on log10 for log-scale tasks. Always finite; lower is better."""
    value = initial if diverged(final, initial) else final
    return to_scale(value, log_scale)


def smooth(curve: Sequence[float], points: int = SMOOTH_POINTS) -> list[float]:
    """Trailing running mean over ``points`` logged values (fewer at the start): minibatch and
    episode noise would otherwise decide when a curve first crosses a level."""
    out, window = [], []
    for value in curve:
        window.append(value)
        if len(window) > points:
            window.pop(0)
        out.append(sum(window) / len(window))
    return out


def count_spikes(curve: Sequence[float], log_scale: bool, fraction: float = SPIKE_FRACTION) -> int:
    """Loss spikes in a training curve: the number of times the (smoothed) curve rises from below
    to above ``best + fraction * (start - best)``, where best is the lowest value so far and start
    the first, i.e. the run gives back more than half the progress it had made. On the task's
    scale (log10 for log-scale tasks). A non-finite point counts as a spike and ends the count."""
    values = [to_scale(v, log_scale) if math.isfinite(v) else math.inf for v in curve]
    if not values or not math.isfinite(values[0]):
        return 1 if values else 0
    values = smooth(values) if all(map(math.isfinite, values)) else values
    start, best, above, spikes = values[0], values[0], False, 0
    for v in values[1:]:
        if not math.isfinite(v):
            return spikes + 1
        level = best + fraction * (start - best)
        if v > level and best < start:
            spikes += not above
            above = True
        else:
            above = False
        best = min(best, v)
    return spikes


def steps_to_target(steps: Sequence[int], curve: Sequence[float], target: float, log_scale: bool) -> float:
    """The first logged step at which the smoothed curve (on the task's scale) is at or below
    ``target``; a run that never gets there scores one logging interval past its last step."""
    values = smooth([to_scale(v, log_scale) if math.isfinite(v) else math.inf for v in curve])
    for step, value in zip(steps, values, strict=True):
        if value <= target:
            return float(step)
    interval = steps[-1] - steps[-2] if len(steps) > 1 else 1
    return float(steps[-1] + interval)


def late_share(curve: Sequence[float], log_scale: bool) -> float:
    """Share of a run's improvement made in the second half of training: (value at the half -
    final) / (start - final) of the smoothed curve on the task's scale. 0 for a run that did not
    improve; a run still learning at the end scores high, one that stalled early scores near 0."""
    values = smooth([to_scale(v, log_scale) if math.isfinite(v) else math.inf for v in curve])
    if len(values) < 3 or not all(map(math.isfinite, values)):
        return 0.0
    start, middle, end = values[0], values[len(values) // 2], values[-1]
    if start - end <= 0:
        return 0.0
    return (middle - end) / (start - end)


def paired_interval(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Mean of the paired differences a - b over seeds and its percentile bootstrap interval
    (95%, 2000 resamples of the seeds, fixed resampling seed). With n seeds the interval can
    exclude 0 only when the differences agree in sign often enough; with 3 seeds, all three."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if diff.size == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    picks = rng.integers(0, diff.size, size=(BOOTSTRAP_RESAMPLES, diff.size))
    means = diff[picks].mean(axis=1)
    tail = (1 - BOOTSTRAP_LEVEL) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return float(diff.mean()), float(lo), float(hi)


WIN, TIE, LOSS = "win", "tie", "loss"


def outcome(a: Sequence[float], b: Sequence[float]) -> tuple[str, tuple[float, float, float]]:
    """Whether a (lower is better) beats b beyond the noise: a win when the whole bootstrap
    interval of a - b is below 0, a loss when it is above 0, otherwise a tie."""
    mean, lo, hi = paired_interval(a, b)
    if hi < 0:
        return WIN, (mean, lo, hi)
    if lo > 0:
        return LOSS, (mean, lo, hi)
    return TIE, (mean, lo, hi)
