"""The sweep behind `rmsprop compare`: the lr search on selection seeds, then the report runs.

Every (task, optimizer, lr, seed) is one job. Jobs run in worker processes, one torch thread
each, so the result of a job depends only on its arguments: the same seeds give the same
numbers, whatever the number of workers and the order the jobs finish in.

1. Search, on ``selection_seeds``: per (task, optimizer) the same number of learning rates,
   chosen one round at a time by :func:`next_lr_index` from a shared starting grid.
2. Report, on the disjoint ``report_seeds``: the chosen lr, and the lrs 10x below and above it
   (the lr sensitivity and the stability probes). Every reported number comes from these runs.
"""

from __future__ import annotations

import math
import os
import signal
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing import get_context

from . import measures

STEPS_PER_DECADE = 2  # the lr ladder: 10 ** (k / 2), half-decade steps


def ladder_lr(k: int) -> float:
    return 10.0 ** (k / STEPS_PER_DECADE)


@dataclass(frozen=True)
class Search:
    """How learning rates are searched, the same for every task and optimizer."""

    start: tuple[int, ...]  # ladder indices tried first: whole decades
    budget: int  # learning rates tried per (task, optimizer), every optimizer alike
    cap: tuple[int, int]  # the search never leaves these ladder indices (inclusive)

    def describe(self) -> str:
        lo, hi = (f"{ladder_lr(k):g}" for k in self.cap)
        start = ", ".join(f"{ladder_lr(k):g}" for k in self.start)
        return (
            f"{self.budget} learning rates per task and optimizer: first {start}; then, one at a time, "
            "the next decade beyond the best when it is the largest or smallest tried, otherwise the "
            f"half-decade points beside the best; never outside {lo} .. {hi}"
        )


SEARCH_FULL = Search(start=(-8, -6, -4, -2, 0), budget=7, cap=(-10, 4))  # 1e-4 .. 1; cap 1e-5 .. 100
SEARCH_QUICK = Search(start=(-6, -4, -2), budget=4, cap=(-10, 4))  # 1e-3 .. 1e-1
PROBE_OFFSET = STEPS_PER_DECADE  # report runs also at 10x below and 10x above the chosen lr


def next_lr_index(scores: dict[int, float], cap: tuple[int, int]) -> int | None:
    """The search rule. Given the selection score (lower is better) of each ladder index tried:
    if the best is the largest tried, try one decade higher; if the smallest, one decade lower
    (within the cap); otherwise the untried half-decade neighbour of the best on the side of its
    better neighbour, then the other side; failing all that, the untried index nearest the best.
    None when nothing inside the cap is left."""
    best = min(scores, key=lambda k: (scores[k], k))
    lo, hi = min(scores), max(scores)
    if best == hi and hi + STEPS_PER_DECADE <= cap[1]:
        return hi + STEPS_PER_DECADE
    if best == lo and lo - STEPS_PER_DECADE >= cap[0]:
        return lo - STEPS_PER_DECADE

    # k = best +- 1 lies between the best and its decade neighbour 2k - best: try the better side first.
    sides = sorted((best + 1, best - 1), key=lambda k: (scores.get(2 * k - best, math.inf), -k))
    for k in sides:
        if cap[0] <= k <= cap[1] and k not in scores:
            return k
    for distance in range(1, cap[1] - cap[0] + 1):
        for k in (best + distance, best - distance):
            if cap[0] <= k <= cap[1] and k not in scores:
                return k
    return None


def best_index(scores: dict[int, float]) -> int:
    """The chosen lr: the lowest mean selection score; ties go to the smaller lr."""
    return min(scores, key=lambda k: (scores[k], k))


def edge_reason(scores: dict[int, float], search: Search) -> str | None:
    """Why the chosen lr is not known to be the best, or None when it is interior (a tried lr
    on each side of it scored worse)."""
    best = best_index(scores)
    for side, edge, limit in (
        ("largest", max(scores), search.cap[1]),
        ("smallest", min(scores), search.cap[0]),
    ):
        if best == edge:
            why = "at the search cap" if best == limit else f"the budget of {search.budget} lrs ran out"
            return f"best lr {ladder_lr(best):g} is the {side} tried ({why})"
    return None


# --------------------------------------------------------------------------- jobs and workers
def run_job(job: tuple[str, str, float, int, bool]) -> dict:
    """One training run; executed in a worker process."""
    import torch

    from .optimizers import OPTIMIZERS
    from .tasks import TASKS

    torch.set_num_threads(1)
    task, optimizer, lr, seed, quick = job
    result = TASKS[task].run(lambda params: OPTIMIZERS[optimizer](params, lr), seed, quick)
    return {"task": task, "optimizer": optimizer, "lr": lr, "seed": seed, **result}


def _indexed(item: tuple[int, tuple]) -> tuple[int, dict]:
    index, job = item
    return index, run_job(job)


def _worker_init() -> None:
    # Ctrl-C reaches the whole process group: the parent alone handles it and ends the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Workers:
    """Worker processes that run jobs and are ended at once, whatever happens to the parent:
    on any exception (Ctrl-C included) the pool is terminated, not waited for."""

    def __init__(self, count: int):
        self.count = count
        self.pool = None
        if count > 1:
            self.pool = get_context("spawn").Pool(count, initializer=_worker_init)

    def run(self, jobs: list[tuple], tick: Callable[[], None] | None = None) -> list[dict]:
        """The results of ``jobs`` in job order."""
        results: list = [None] * len(jobs)
        if self.pool is None:
            for i, job in enumerate(jobs):
                results[i] = run_job(job)
                if tick:
                    tick()
        else:
            for i, result in self.pool.imap_unordered(_indexed, list(enumerate(jobs))):
                results[i] = result
                if tick:
                    tick()
        return results

    def call(self, fn: Callable, *args):
        """``fn(*args)`` in a worker (one that has imported what the runs import), or here."""
        return self.pool.apply(fn, args) if self.pool is not None else fn(*args)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.pool is None:
            return
        if exc_type is None:
            self.pool.close()
        else:
            self.pool.terminate()
        self.pool.join()


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


# --------------------------------------------------------------------------- aggregation
def _round(x: float, digits: int = 6) -> float:
    return float(f"{x:.{digits}g}") if math.isfinite(x) else x


def _mean_curve(curves: list[list[float]]) -> tuple[list[float], list[float]]:
    n = min(len(c) for c in curves)
    means, stds = [], []
    for i in range(n):
        column = [c[i] for c in curves]
        finite = all(map(math.isfinite, column))
        means.append(statistics.fmean(column) if finite else math.inf)
        stds.append(statistics.pstdev(column) if finite and len(column) > 1 else 0.0)
    return means, stds


def summarize_runs(runs: list[dict], log_scale: bool, spikes_count: bool) -> dict:
    """Per-seed finals of a set of report runs (sorted by seed), their score, divergence and spikes."""
    runs = sorted(runs, key=lambda r: r["seed"])
    return {
        "lr": runs[0]["lr"],
        "finals": [r["final"] for r in runs],
        "scores": [measures.score(r["final"], r["initial"], log_scale) for r in runs],
        "diverged": [measures.diverged(r["final"], r["initial"]) for r in runs],
        "spikes": [measures.count_spikes(r["curve"], log_scale) if spikes_count else 0 for r in runs],
    }


def selection_score(runs: list[dict], log_scale: bool) -> float:
    return statistics.fmean(measures.score(r["final"], r["initial"], log_scale) for r in runs)


def aggregate_pair(
    selection: dict[int, list[dict]], report: dict[str, list[dict]], task, search: Search
) -> dict:
    """Everything results.json holds for one (task, optimizer): the search, the report runs at
    the chosen lr and 10x either side, the curves of the report runs at the chosen lr."""
    scores = {k: selection_score(runs, task.log_scale) for k, runs in selection.items()}
    best = best_index(scores)
    reason = edge_reason(scores, search)
    at_best = sorted(report["best"], key=lambda r: r["seed"])
    summary = {
        name: summarize_runs(runs, task.log_scale, task.spikes_mean_instability)
        for name, runs in report.items()
    }
    finals = summary["best"]["finals"]
    finite = [f for f in finals if math.isfinite(f)]
    curve_mean, curve_std = _mean_curve([r["curve"] for r in at_best])
    entry = {
        "best_lr": ladder_lr(best),
        "lr_grid": [ladder_lr(k) for k in sorted(scores)],
        "at_grid_edge": reason is not None,
        "edge_reason": reason,
        "selection": {
            repr(ladder_lr(k)): {
                "score": scores[k],
                "finals": [r["final"] for r in sorted(selection[k], key=lambda r: r["seed"])],
            }
            for k in sorted(scores)
        },
        "report": finals,
        "report_mean": statistics.fmean(finals) if len(finite) == len(finals) else math.inf,
        "report_std": statistics.pstdev(finals) if len(finite) == len(finals) and len(finals) > 1 else 0.0,
        "initial": statistics.fmean(r["initial"] for r in at_best),
        "runs": summary,
        "curves": {
            "steps": at_best[0]["steps"],
            "per_seed": [[_round(v) for v in r["curve"]] for r in at_best],
            "mean": [_round(v) for v in curve_mean],
            "std": [_round(v) for v in curve_std],
        },
        "effective_lr_end": [r["effective_lr_end"] for r in at_best],
    }
    for key in ("effective_lr", "path"):
        if key in at_best[0]:
            entry[key] = at_best[0][key]
    return entry


# --------------------------------------------------------------------------- the whole study
def run_compare(
    *,
    quick: bool = False,
    tasks: list[str] | None = None,
    optimizers: list[str] | None = None,
    selection_seeds: int | None = None,
    report_seeds: int | None = None,
    seed: int = 0,
    workers: int | None = None,
    progress: Callable[[int], object] | None = None,
) -> dict:
    """Search every task x optimizer, run the report seeds, aggregate, and judge the claims.
    Quick mode: smaller tasks, a shorter search, fewer seeds, and by default only the optimizers
    the general claims compare (the RMSProp variants are for the full run).

    ``progress(total)`` makes a progress bar (an object with ``update()`` and ``close()``)."""
    from .claims import judge
    from .optimizers import DEFAULT_OPTIMIZERS, OPTIMIZERS, QUICK_OPTIMIZERS, hyperparameters
    from .tasks import TASKS, trivial_baseline

    task_names = tasks or list(TASKS)
    opt_names = optimizers or list(QUICK_OPTIMIZERS if quick else DEFAULT_OPTIMIZERS)
    for kind, names, known in (("task", task_names, TASKS), ("optimizer", opt_names, OPTIMIZERS)):
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown {kind} {unknown}; choose from {list(known)}")
    n_sel = selection_seeds if selection_seeds is not None else (1 if quick else 2)
    n_rep = report_seeds if report_seeds is not None else (2 if quick else 3)
    if n_sel < 1 or n_rep < 1:
        raise ValueError("selection_seeds and report_seeds must be >= 1")
    sel_seeds = list(range(seed, seed + n_sel))
    rep_seeds = list(range(seed + n_sel, seed + n_sel + n_rep))  # disjoint from the selection seeds
    search = SEARCH_QUICK if quick else SEARCH_FULL
    pairs = [(t, o) for t in task_names for o in opt_names]
    total = len(pairs) * (search.budget * n_sel + 3 * n_rep)
    bar = progress(total) if progress else None
    tick = bar.update if bar is not None else None

    selection: dict[tuple[str, str], dict[int, list[dict]]] = {p: {} for p in pairs}
    report: dict[tuple[str, str], dict[str, list[dict]]] = {}
    try:
        with Workers(workers or default_workers()) as pool:

            def run_round(wanted: list[tuple[tuple[str, str], int]]) -> None:
                """Run every (pair, ladder index) wanted on the selection seeds."""
                jobs = [(t, o, ladder_lr(k), s, quick) for (t, o), k in wanted for s in sel_seeds]
                keys = [(p, k) for p, k in wanted for _ in sel_seeds]
                for (p, k), result in zip(keys, pool.run(jobs, tick), strict=True):
                    selection[p].setdefault(k, []).append(result)

            def scores_of(p: tuple[str, str]) -> dict[int, float]:
                return {k: selection_score(r, TASKS[p[0]].log_scale) for k, r in selection[p].items()}

            run_round([(p, k) for p in pairs for k in search.start])
            for _ in range(search.budget - len(search.start)):
                wanted = [(p, next_lr_index(scores_of(p), search.cap)) for p in pairs]
                run_round([(p, k) for p, k in wanted if k is not None])
            probes = {}
            for p in pairs:
                best = best_index(scores_of(p))
                probes[p] = {"best": best, "lower": best - PROBE_OFFSET, "upper": best + PROBE_OFFSET}
            jobs = [
                (t, o, ladder_lr(k), s, quick)
                for (t, o), where in probes.items()
                for k in where.values()
                for s in rep_seeds
            ]
            names = [(p, name) for p, where in probes.items() for name in where for _ in rep_seeds]
            for (p, name), result in zip(names, pool.run(jobs, tick), strict=True):
                report.setdefault(p, {}).setdefault(name, []).append(result)
            # read from the optimizers in a worker: building torch's first optimizer imports
            # torch._dynamo (3 s), which the workers have done and this process has not
            hyper = pool.call(hyperparameters, opt_names)
    finally:
        if bar is not None:
            bar.close()

    out: dict = {}
    for t in task_names:
        task = TASKS[t]
        entries = {o: aggregate_pair(selection[(t, o)], report[(t, o)], task, search) for o in opt_names}
        initial = statistics.fmean(e["initial"] for e in entries.values())
        out[t] = {
            "title": task.title,
            "metric": task.metric,
            "log_scale": task.log_scale,
            "spikes_mean_instability": task.spikes_mean_instability,
            "has_convergence_speed": task.has_convergence_speed,
            "description": " ".join((task.run.__doc__ or "").split()),
            "initial": initial,
            "baseline": trivial_baseline(t),
            "baseline_label": task.baseline_label,
            "optimizers": entries,
        }
    claims, skipped = judge(out)
    return {
        "setup": {
            "quick": quick,
            "optimizers": opt_names,
            "hyperparameters": hyper,
            "selection_seeds": sel_seeds,
            "report_seeds": rep_seeds,
            "search": {
                **asdict(search),
                "description": search.describe(),
                "probe": "chosen lr / 10 and x 10",
            },
            "noise": {
                "method": "paired percentile bootstrap of the mean difference over report seeds",
                "level": measures.BOOTSTRAP_LEVEL,
                "resamples": measures.BOOTSTRAP_RESAMPLES,
            },
            "runs": total,
        },
        "tasks": out,
        "claims": claims,
        "claims_skipped": skipped,
    }


def to_json(results: dict) -> str:
    """Strict JSON: non-finite numbers (diverged runs) become null."""
    import json

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(results), indent=1, allow_nan=False)


def run_details(seconds: float, workers: int, command: str) -> dict:
    """When, where and with what the study ran (kept out of run_compare's result, which depends
    only on its arguments)."""
    import datetime
    import platform
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for package in ("rmsprop", "torch", "numpy", "gymnasium", "scikit-learn", "matplotlib"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
        "workers": workers,
        "machine": f"{cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}",
        "command": command,
        "versions": versions,
    }


def from_json(text: str) -> dict:
    """results.json back into the numbers run_compare made: a null inside a list was a non-finite
    number (a diverged run) and becomes inf, so the rules can be applied again to a saved run."""
    import json

    def restore(x):
        if isinstance(x, dict):
            return {k: restore(v) for k, v in x.items()}
        if isinstance(x, list):
            return [math.inf if v is None else restore(v) for v in x]
        return x

    data = restore(json.loads(text))
    for task in data["tasks"].values():
        for entry in task["optimizers"].values():
            if entry.get("report_mean") is None:
                entry["report_mean"] = math.inf
    return data
