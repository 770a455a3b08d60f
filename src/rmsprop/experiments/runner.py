"""The sweep behind `rmsprop compare`: every (task, optimizer, lr, seed) is one job.

Jobs run in worker processes, one torch thread each, so the result of a job depends only on its
arguments: the same seed gives the same numbers, whatever the order the jobs finish in.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context

LR_GRID_FULL = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]  # half-decade steps
LR_GRID_QUICK = [1e-3, 1e-2, 1e-1]  # decade steps
GOOD_REGRET = 0.1  # an lr is "good" when it gets within 10% of the best improvement


def run_job(job: tuple[str, str, float, int, bool]) -> dict:
    """One training run; executed in a worker process."""
    import torch

    from .optimizers import OPTIMIZERS
    from .tasks import TASKS

    torch.set_num_threads(1)
    task, optimizer, lr, seed, quick = job
    result = TASKS[task].run(lambda params: OPTIMIZERS[optimizer](params, lr), seed, quick)
    return {"task": task, "optimizer": optimizer, "lr": lr, "seed": seed, **result}


def run_jobs(
    jobs: list[tuple], workers: int, progress: Callable[[Iterable], Iterable] | None = None
) -> list[dict]:
    """Run the jobs in ``workers`` processes (in this one when 1) and return them in job order."""
    if workers <= 1:
        iterator = map(run_job, jobs)
        results = list(progress(iterator) if progress else iterator)
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(run_job, job): i for i, job in enumerate(jobs)}
            done = as_completed(futures)
            results = [None] * len(jobs)
            for future in progress(done) if progress else done:
                results[futures[future]] = future.result()
    return results


def _mean_curve(curves: list[list[float]]) -> tuple[list[float], list[float]]:
    n = min(len(c) for c in curves)
    means, stds = [], []
    for i in range(n):
        column = [c[i] for c in curves]
        means.append(statistics.fmean(column))
        stds.append(statistics.pstdev(column) if len(column) > 1 else 0.0)
    return means, stds


def aggregate(runs: list[dict], lrs: list[float]) -> dict:
    """Per task and optimizer: each lr's mean/std final metric over seeds, the best lr, the
    curves at the best lr (mean, std), and the lr sensitivity."""
    tasks: dict = {}
    for run in runs:
        tasks.setdefault(run["task"], {}).setdefault(run["optimizer"], {}).setdefault(run["lr"], []).append(
            run
        )
    out: dict = {}
    for task, by_opt in tasks.items():
        out[task] = {"optimizers": {}}
        for opt, by_lr in by_opt.items():
            sweep = {}
            for lr in lrs:
                finals = [r["final"] for r in by_lr.get(lr, [])]
                mean = statistics.fmean(finals) if finals and all(map(math.isfinite, finals)) else math.inf
                std = statistics.pstdev(finals) if len(finals) > 1 and math.isfinite(mean) else 0.0
                sweep[lr] = {"mean": mean, "std": std, "seeds": len(finals)}
            best_lr = min(lrs, key=lambda lr: (sweep[lr]["mean"], lr))
            initial = statistics.fmean(r["initial"] for r in by_lr[best_lr])
            best = sweep[best_lr]["mean"]
            regrets = {
                lr: (s["mean"] - best) / (initial - best)
                if math.isfinite(s["mean"]) and initial > best
                else math.inf
                for lr, s in sweep.items()
            }
            good = [lr for lr, r in regrets.items() if r <= GOOD_REGRET]
            best_runs = sorted(by_lr[best_lr], key=lambda r: r["seed"])
            curve_mean, curve_std = _mean_curve([r["curve"] for r in best_runs])
            entry = {
                "best_lr": best_lr,
                "final_mean": best,
                "final_std": sweep[best_lr]["std"],
                "initial": initial,
                "sweep": {repr(lr): v for lr, v in sweep.items()},
                "regret": {repr(lr): v for lr, v in regrets.items()},
                "good_lr_fraction": len(good) / len(lrs),
                "diverged_fraction": sum(not math.isfinite(s["mean"]) for s in sweep.values()) / len(lrs),
                "curve": {
                    "steps": best_runs[0]["steps"][: len(curve_mean)],
                    "mean": curve_mean,
                    "std": curve_std,
                },
            }
            for key in ("effective_lr", "path", "baseline", "period"):
                if key in best_runs[0]:
                    entry[key] = best_runs[0][key]
            out[task]["optimizers"][opt] = entry
    return out


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def run_compare(
    *,
    quick: bool = False,
    tasks: list[str] | None = None,
    optimizers: list[str] | None = None,
    seeds: int | None = None,
    seed: int = 0,
    workers: int | None = None,
    progress: Callable[[Iterable, int], Iterable] | None = None,
) -> dict:
    """Sweep every task x optimizer x lr x seed, aggregate, and judge the claims."""
    from .claims import judge
    from .optimizers import OPTIMIZERS
    from .tasks import TASKS

    task_names = tasks or list(TASKS)
    opt_names = optimizers or list(OPTIMIZERS)
    for kind, names, known in (("task", task_names, TASKS), ("optimizer", opt_names, OPTIMIZERS)):
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown {kind} {unknown}; choose from {list(known)}")
    n_seeds = seeds if seeds is not None else (2 if quick else 3)
    if n_seeds < 1:
        raise ValueError("seeds must be >= 1")
    lrs = LR_GRID_QUICK if quick else LR_GRID_FULL
    jobs = [
        (t, o, lr, s, quick)
        for t in task_names
        for o in opt_names
        for lr in lrs
        for s in range(seed, seed + n_seeds)
    ]
    bar = (lambda it: progress(it, len(jobs))) if progress else None
    runs = run_jobs(jobs, workers or default_workers(), bar)
    aggregated = aggregate(runs, lrs)
    ordered = {t: aggregated[t] for t in task_names}
    claims, skipped = judge(ordered)
    return {
        "setup": {"quick": quick, "optimizers": opt_names, "lrs": lrs, "seeds": n_seeds, "seed": seed},
        "tasks": ordered,
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
