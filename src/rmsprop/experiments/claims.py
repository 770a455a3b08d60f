"""The claims about RMSProp and the rules that judge them from measured numbers.

Each rule is a pure function of the aggregated results (see runner.aggregate): the same numbers
always give the same verdict, and the evidence quotes the numbers used. "RMSProp" in a claim is
plain RMSProp: per task, the better of the torch-preset and seed-document forms.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .optimizers import PLAIN_RMSPROP

SUPPORTED, NOT_SUPPORTED, MIXED = "supported", "not supported", "mixed"


def _rms(task: dict) -> tuple[str, dict]:
    name = min(PLAIN_RMSPROP, key=lambda n: task["optimizers"][n]["final_mean"])
    return name, task["optimizers"][name]


def _final(task: dict, name: str) -> float:
    return task["optimizers"][name]["final_mean"]


def _fmt(x: float) -> str:
    return "inf (diverged)" if not math.isfinite(x) else f"{x:.4g}"


def claim_adagrad_decay(tasks: dict) -> dict:
    """Rule: on the long-horizon task, Adagrad's median effective lr at the end is below its
    value at the start (it shrinks), RMSProp's end/start ratio is higher than Adagrad's, and
    RMSProp's final loss is lower. All three: supported; the lr part or the loss part alone:
    mixed; neither: not supported."""
    task = tasks["long-horizon"]
    rms_name, rms = _rms(task)
    ada = task["optimizers"]["Adagrad"]

    def ratio(entry):
        med = entry["effective_lr"]["median"]
        return med[-1] / med[0] if med and med[0] > 0 else math.nan

    r_rms, r_ada = ratio(rms), ratio(ada)
    lr_part = r_ada < 1 and r_rms > r_ada
    loss_part = rms["final_mean"] < ada["final_mean"]
    verdict = SUPPORTED if lr_part and loss_part else MIXED if lr_part or loss_part else NOT_SUPPORTED
    evidence = (
        f"long-horizon task, best lr of each: effective lr end/start ratio {rms_name} {r_rms:.3g} vs Adagrad "
        f"{r_ada:.3g}; final loss {rms_name} {_fmt(rms['final_mean'])} vs Adagrad {_fmt(ada['final_mean'])}"
    )
    return {
        "claim": "RMSProp fixes Adagrad's learning rate that shrinks towards zero",
        "verdict": verdict,
        "evidence": evidence,
    }


def claim_per_parameter(tasks: dict) -> dict:
    """Rule: at the end of the long-horizon run, RMSProp's effective lr differs across the
    parameters: 90th / 10th percentile >= 2: supported; >= 1.2: mixed; else not supported.
    (SGD's ratio is 1 by construction.)"""
    rms_name, rms = _rms(tasks["long-horizon"])
    e = rms["effective_lr"]
    spread = e["p90"][-1] / e["p10"][-1] if e["p10"] and e["p10"][-1] > 0 else math.nan
    verdict = SUPPORTED if spread >= 2 else MIXED if spread >= 1.2 else NOT_SUPPORTED
    evidence = (
        f"long-horizon task, {rms_name}: effective lr p90/p10 across parameters at the end = {spread:.3g}"
    )
    return {
        "claim": "RMSProp adapts the step size of each parameter",
        "verdict": verdict,
        "evidence": evidence,
    }


def claim_non_stationary(tasks: dict) -> dict:
    """Rule: on the non-stationary task (tracking MSE) and the RNN task (test MSE), RMSProp at its
    best lr beats both SGD and Adagrad at theirs. Both tasks: supported; one: mixed; none: not
    supported."""
    wins, parts = 0, []
    for key in ("non-stationary", "rnn"):
        task = tasks[key]
        rms_name, rms = _rms(task)
        others = {n: _final(task, n) for n in ("SGD", "Adagrad")}
        won = all(rms["final_mean"] < v for v in others.values())
        wins += won
        parts.append(
            f"{key}: {rms_name} {_fmt(rms['final_mean'])} vs "
            + ", ".join(f"{n} {_fmt(v)}" for n, v in others.items())
            + f" (Adam {_fmt(_final(task, 'Adam'))})"
        )
    verdict = SUPPORTED if wins == 2 else MIXED if wins == 1 else NOT_SUPPORTED
    return {
        "claim": "RMSProp performs well on non-stationary targets (e.g. RNN training)",
        "verdict": verdict,
        "evidence": "; ".join(parts),
    }


def claim_better_than_adagrad(tasks: dict) -> dict:
    """Rule, over all tasks: RMSProp converges better when its best final metric beats
    Adagrad's on a majority of tasks; it is more stable when its fraction of good lrs (within 10%
    of its best improvement) is at least Adagrad's on a majority. Both: supported; one: mixed;
    neither: not supported."""
    better = stabler = 0
    for task in tasks.values():
        _, rms = _rms(task)
        ada = task["optimizers"]["Adagrad"]
        better += rms["final_mean"] < ada["final_mean"]
        stabler += rms["good_lr_fraction"] >= ada["good_lr_fraction"]
    n = len(tasks)
    converge, stable = better > n / 2, stabler > n / 2
    verdict = SUPPORTED if converge and stable else MIXED if converge or stable else NOT_SUPPORTED
    evidence = (
        f"better final metric than Adagrad on {better}/{n} tasks; "
        f"at least Adagrad's fraction of good learning rates on {stabler}/{n} tasks"
    )
    return {
        "claim": "RMSProp is more stable than Adagrad and converges better",
        "verdict": verdict,
        "evidence": evidence,
    }


def claim_needs_lr(tasks: dict) -> dict:
    """Rule: on each task, count the lrs of the grid within 10% of RMSProp's best improvement.
    If fewer than half the grid is good on a majority of tasks, the lr must be chosen: supported;
    on some tasks: mixed; on none: not supported. The spread of the best lr across tasks is quoted."""
    narrow, best_lrs = 0, []
    for task in tasks.values():
        _, rms = _rms(task)
        narrow += rms["good_lr_fraction"] < 0.5
        best_lrs.append(rms["best_lr"])
    n = len(tasks)
    verdict = SUPPORTED if narrow > n / 2 else MIXED if narrow > 0 else NOT_SUPPORTED
    span = math.log10(max(best_lrs) / min(best_lrs))
    evidence = f"fewer than half the lr grid within 10% of the best on {narrow}/{n} tasks; the best lr spans {span:.1f} decades across tasks"
    return {
        "claim": "RMSProp still requires manual selection of the learning rate",
        "verdict": verdict,
        "evidence": evidence,
    }


def claim_adam_faster(tasks: dict) -> dict:
    """Rule: supported if Adam's best final metric beats RMSProp's by at least 5% (relative) on
    at least one task; not supported if RMSProp is within 5% of Adam or better everywhere."""
    wins = []
    for key, task in tasks.items():
        _, rms = _rms(task)
        adam = _final(task, "Adam")
        if adam < rms["final_mean"] * 0.95:
            wins.append(f"{key} (Adam {_fmt(adam)} vs RMSProp {_fmt(rms['final_mean'])})")
    verdict = SUPPORTED if wins else NOT_SUPPORTED
    evidence = (
        ("Adam ahead by >= 5% on: " + "; ".join(wins))
        if wins
        else "Adam is not 5% ahead of RMSProp on any task"
    )
    return {
        "claim": "RMSProp may converge more slowly than Adam on some tasks",
        "verdict": verdict,
        "evidence": evidence,
    }


ALL_TASKS = ("seed", "long-horizon", "non-stationary", "rnn", "digits", "rosenbrock")
# Each rule with the tasks and optimizers it needs; a run without them leaves the claim unjudged.
RULES: list[tuple[Callable[[dict], dict], tuple[str, ...], tuple[str, ...]]] = [
    (claim_adagrad_decay, ("long-horizon",), ("Adagrad",)),
    (claim_per_parameter, ("long-horizon",), ()),
    (claim_non_stationary, ("non-stationary", "rnn"), ("SGD", "Adagrad", "Adam")),
    (claim_better_than_adagrad, ALL_TASKS, ("Adagrad",)),
    (claim_needs_lr, ALL_TASKS, ()),
    (claim_adam_faster, ALL_TASKS, ("Adam",)),
]


def judge(tasks: dict) -> tuple[list[dict], list[str]]:
    """Every claim the run can decide, with verdict, evidence and the rule that decided it; and
    the names of the rules skipped because the run lacks a task or optimizer they need."""
    judged, skipped = [], []
    for rule, need_tasks, need_optimizers in RULES:
        have = all(t in tasks for t in need_tasks) and all(
            n in task["optimizers"] for task in tasks.values() for n in (*need_optimizers, *PLAIN_RMSPROP)
        )
        if not have:
            skipped.append(rule.__name__)
            continue
        result = rule(tasks)
        result["rule"] = " ".join((rule.__doc__ or "").split())
        judged.append(result)
    return judged, skipped
