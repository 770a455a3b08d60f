"""The claims about RMSProp and the rules that judge them from measured numbers.

Each rule is a pure function of the aggregated results (see runner.run_compare) and of the name
of the one RMSProp configuration it judges: the same numbers always give the same verdict, and
the evidence quotes the numbers used. The general claims judge plain RMSProp in torch's form;
every variant gets its own rows under the same rules and the same baselines.

Shared conventions, stated once:

- Every number compared comes from the report seeds, at the lr each optimizer chose on the
  selection seeds (or 10x either side of it, for the sensitivity and stability probes).
- A *win* of A over B on a task: the 95% paired bootstrap interval of mean(score A - score B)
  over the report seeds lies wholly below 0 (measures.outcome); otherwise a tie or a loss. The
  score is the metric, diverged runs counted as the untrained model, on log10 for log-scale tasks.
- Edge flags: when an optimizer's chosen lr is the largest or smallest it tried, it might do
  better outside the search. A comparison whose outcome such an lr could change (a win over an
  optimizer at its edge; a non-win of an optimizer at its edge) is *unknown*. The rule is then
  evaluated with every unknown counted for and against RMSProp; if the two verdicts differ, the
  claim is "unjudged" and says which flags it rests on.
- "Majority" means more than half of the tasks the rule looks at.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import measures
from .measures import LOSS, TIE, WIN
from .optimizers import RMSPROP, RMSPROP_VARIANTS

SUPPORTED, NOT_SUPPORTED, MIXED, UNJUDGED = "supported", "not supported", "mixed", "unjudged"
UNKNOWN = "unknown"

DECAY_TASKS = ("long-horizon", "text")  # long runs whose loss keeps falling: where a decaying lr shows
ADAPT_TASKS = ("digits", "text", "rl")  # real inputs of unequal scale and frequency
NONSTATIONARY_TASKS = ("non-stationary", "rl", "rnn", "text")  # moving targets, and RNN training
SPREAD_THRESHOLD = 2.0  # effective-lr p90/p10 at or above this: the step sizes differ across parameters
REGRET_THRESHOLD = 0.1  # losing more than 10% of the task's attainable improvement matters
TARGET_FRACTION = 0.9  # steps to reach 90% of the progress both optimizers make


@dataclass(frozen=True)
class Part:
    """One elementary check of a rule: holds (True), fails (False) or unknown (None) because an
    edge flag could change it."""

    holds: bool | None
    text: str
    flag: str | None = None


# --------------------------------------------------------------------------- accessors
def _entry(task: dict, name: str) -> dict:
    return task["optimizers"][name]


def _scores(task: dict, name: str) -> list[float]:
    return _entry(task, name)["runs"]["best"]["scores"]


def _edge(task: dict, name: str) -> str | None:
    return _entry(task, name).get("edge_reason")


def _fmt(x: float) -> str:
    return "inf" if not math.isfinite(x) else f"{x:.4g}"


def _mean_final(task: dict, name: str) -> str:
    finals = _entry(task, name)["report"]
    if not all(math.isfinite(f) for f in finals):
        return f"{sum(not math.isfinite(f) for f in finals)}/{len(finals)} diverged"
    return _fmt(statistics.fmean(finals))


def _interval(numbers: tuple[float, float, float], log: bool) -> str:
    mean, lo, hi = numbers
    unit = " (log10)" if log else ""
    return f"diff{unit} {mean:+.3g} [95% {lo:+.3g}, {hi:+.3g}]"


def compare(task_name: str, task: dict, a: str, b: str) -> tuple[str, str, str | None]:
    """The outcome of A against B on a task's report scores (WIN, TIE, LOSS or UNKNOWN), the
    evidence, and the edge flag behind an UNKNOWN."""
    result, numbers = measures.outcome(_scores(task, a), _scores(task, b))
    flag = None
    if result == WIN and _edge(task, b):
        flag = f"{task_name}: {b}'s {_edge(task, b)}"
    elif result != WIN and _edge(task, a):
        flag = f"{task_name}: {a}'s {_edge(task, a)}"
    text = (
        f"{task_name}: {a} {_mean_final(task, a)} vs {b} {_mean_final(task, b)}, "
        f"{_interval(numbers, task['log_scale'])} -> {result}"
    )
    return (UNKNOWN if flag else result), text, flag


def _decide(parts: list[Part], verdict_of: Callable[[list[bool]], str]) -> tuple[str, list[str]]:
    """The verdict with every unknown part counted as holding and as failing; unjudged when the
    two differ. Returns the verdict and the edge flags it rests on."""
    flags = [p.flag for p in parts if p.holds is None and p.flag]
    best = verdict_of([True if p.holds is None else p.holds for p in parts])
    worst = verdict_of([False if p.holds is None else p.holds for p in parts])
    if best == worst:
        return best, flags
    return UNJUDGED, flags


def _by_count(held: int, total: int) -> str:
    """Majority: supported; at least one: mixed; none: not supported."""
    if held > total / 2:
        return SUPPORTED
    return MIXED if held > 0 else NOT_SUPPORTED


def _result(claim: str, rms: str, parts: list[Part], verdict_of, summary: str) -> dict:
    verdict, flags = _decide(parts, verdict_of)
    flags = list(dict.fromkeys(flags))  # one task's flag can stand behind two of its checks
    held = sum(p.holds is True for p in parts)
    unknown = sum(p.holds is None for p in parts)
    summary += f" (holds in {held} of {len(parts)} checks" + (
        f", {unknown} open on an edge flag)" if unknown else ")"
    )
    if verdict == UNJUDGED:
        summary = "Rests on an lr at the edge of its search (" + "; ".join(flags) + "). " + summary
    return {
        "claim": claim,
        "rmsprop": rms,
        "verdict": verdict,
        "evidence": summary + ". " + "; ".join(p.text for p in parts),
        "summary": summary,
        "details": [p.text for p in parts],
        "edge_flags": flags,
        "ties": sum(" -> tie" in p.text for p in parts),
    }


# --------------------------------------------------------------------------- the rules
def claim_adagrad_decay(tasks: dict, rms: str = RMSPROP) -> dict:
    """Rule: on the long runs whose loss keeps falling (long-horizon, text), two checks per task:
    RMSProp makes a larger share of its improvement in the second half of training than Adagrad
    (late share = (value at the half - final) / (start - final) of the smoothed training curve,
    paired over report seeds, a win beyond the noise), and RMSProp's final metric beats Adagrad's
    beyond the noise. All checks hold: supported; some: mixed; none: not supported."""
    parts = []
    for name in DECAY_TASKS:
        task = tasks[name]
        log = task["log_scale"]
        shares = {
            o: [measures.late_share(c, log) for c in _entry(task, o)["curves"]["per_seed"]]
            for o in (rms, "Adagrad")
        }
        result, numbers = measures.outcome([-s for s in shares[rms]], [-s for s in shares["Adagrad"]])
        flag = None
        if result == WIN and _edge(task, "Adagrad"):
            flag = f"{name}: Adagrad's {_edge(task, 'Adagrad')}"
        elif result != WIN and _edge(task, rms):
            flag = f"{name}: {rms}'s {_edge(task, rms)}"
        late_text = (
            f"{name} late share {rms} {statistics.fmean(shares[rms]):.2f} vs Adagrad "
            f"{statistics.fmean(shares['Adagrad']):.2f} (diff {-numbers[0]:+.2f} [95% {-numbers[2]:+.2f}, "
            f"{-numbers[1]:+.2f}]) -> {result}"
        )
        parts.append(Part(None if flag else result == WIN, late_text, flag))
        result, text, flag = compare(name, task, rms, "Adagrad")
        parts.append(Part(None if flag else result == WIN, text, flag))
    return _result(
        "RMSProp fixes Adagrad's learning rate that shrinks towards zero",
        rms,
        parts,
        lambda held: SUPPORTED if all(held) else MIXED if any(held) else NOT_SUPPORTED,
        f"{rms} keeps improving late and ends lower than Adagrad",
    )


def _spread(task: dict, name: str) -> float:
    ratios = [q["p90"] / q["p10"] for q in _entry(task, name)["effective_lr_end"] if q["p10"] > 0]
    return statistics.median(ratios) if ratios else math.nan


def claim_per_parameter(tasks: dict, rms: str = RMSPROP) -> dict:
    """Rule: on real data whose inputs differ in scale and frequency (digits: mostly blank border
    pixels; text: rare characters; rl: observations of unequal scale), per task: RMSProp's
    per-parameter step sizes do differ (median over report seeds of p90/p10 of the effective lr
    at the end >= 2; SGD's is 1) and that buys a win over SGD (the same update with one step size
    for all, tuned alike) beyond the noise. Both on a majority of these tasks: supported; on at
    least one: mixed; none: not supported."""
    parts = []
    for name in ADAPT_TASKS:
        task = tasks[name]
        spread = _spread(task, rms)
        result, text, flag = compare(name, task, rms, "SGD")
        adapts = spread >= SPREAD_THRESHOLD
        holds = None if flag and adapts else adapts and result == WIN
        parts.append(Part(holds, f"{text} (effective lr p90/p10 {_fmt(spread)})", flag if adapts else None))
    return _result(
        "RMSProp adapts the step size of each parameter",
        rms,
        parts,
        lambda held: _by_count(sum(held), len(held)),
        f"tasks where {rms}'s step sizes differ across parameters and it beats SGD",
    )


def claim_non_stationary(tasks: dict, rms: str = RMSPROP) -> dict:
    """Rule: on the moving-target and recurrent tasks (non-stationary regression, A2C on CartPole,
    the adding problem, the character LSTM), per task: RMSProp beats both SGD and Adagrad beyond
    the noise. A majority of these tasks: supported; at least one: mixed; none: not supported."""
    parts = []
    for name in NONSTATIONARY_TASKS:
        task = tasks[name]
        results = [compare(name, task, rms, b) for b in ("SGD", "Adagrad")]
        flags = [f for _, _, f in results if f]
        won = all(r == WIN for r, _, _ in results)
        lost = any(r in (TIE, LOSS) for r, _, _ in results)
        holds = True if won else False if lost else None
        parts.append(Part(holds, "; ".join(t for _, t, _ in results), "; ".join(flags) or None))
    return _result(
        "RMSProp performs well on non-stationary targets (e.g. RNN training)",
        rms,
        parts,
        lambda held: _by_count(sum(held), len(held)),
        f"tasks where {rms} beats both SGD and Adagrad",
    )


def unstable_runs(task: dict, name: str) -> list[int]:
    """Per report seed: how many of the three report runs (the chosen lr, 10x below, 10x above)
    diverged or had a loss spike."""
    runs = _entry(task, name)["runs"]
    per_seed = None
    for probe in ("best", "lower", "upper"):
        bad = [int(d or s > 0) for d, s in zip(runs[probe]["diverged"], runs[probe]["spikes"], strict=True)]
        per_seed = bad if per_seed is None else [a + b for a, b in zip(per_seed, bad, strict=True)]
    return per_seed or []


def claim_better_than_adagrad(tasks: dict, rms: str = RMSPROP) -> dict:
    """Rule, over all tasks. Converges better: RMSProp's final metric beats Adagrad's beyond the
    noise on a majority of tasks. More stable: over every (task, report seed), the count of
    unstable report runs (diverged, or a spike giving back over half the progress made; at the
    chosen lr and 10x either side) is lower for RMSProp, by a paired bootstrap interval wholly
    below 0. Both: supported; one: mixed; neither: not supported."""
    parts = []
    for name, task in tasks.items():
        result, text, flag = compare(name, task, rms, "Adagrad")
        parts.append(Part(None if flag else result == WIN, text, flag))
    mine = [u for t in tasks.values() for u in unstable_runs(t, rms)]
    theirs = [u for t in tasks.values() for u in unstable_runs(t, "Adagrad")]
    result, numbers = measures.outcome(mine, theirs)
    parts.append(
        Part(
            result == WIN,
            f"unstable report runs: {rms} {sum(mine)}/{3 * len(mine)} vs Adagrad {sum(theirs)}/{3 * len(theirs)} "
            f"(per task and seed {_interval(numbers, False)}) -> {result}",
        )
    )

    def verdict_of(held: list[bool]) -> str:
        converge = sum(held[:-1]) > (len(held) - 1) / 2
        stable = held[-1]
        return SUPPORTED if converge and stable else MIXED if converge or stable else NOT_SUPPORTED

    return _result(
        "RMSProp is more stable than Adagrad and converges better",
        rms,
        parts,
        verdict_of,
        f"{rms} beats Adagrad's final metric beyond the noise on {sum(' -> win' in p.text for p in parts[:-1])}"
        f"/{len(parts) - 1} tasks; unstable runs: {parts[-1].text.rsplit('-> ', 1)[1]}",
    )


def regret_at_10x(tasks_entry: dict, name: str) -> float:
    """How much a 10x wrong lr costs: the worse of the report runs at the chosen lr / 10 and x 10,
    minus the chosen lr's, as a fraction of the task's attainable improvement (untrained score
    minus the best optimizer's). NaN when no optimizer improved on the untrained model."""
    entry = _entry(tasks_entry, name)
    runs = entry["runs"]
    untrained = measures.to_scale(tasks_entry["initial"], tasks_entry["log_scale"])
    best_of_task = min(
        statistics.fmean(e["runs"]["best"]["scores"]) for e in tasks_entry["optimizers"].values()
    )
    span = untrained - best_of_task
    if span <= 0:
        return math.nan
    chosen = statistics.fmean(runs["best"]["scores"])
    off = max(statistics.fmean(runs[p]["scores"]) for p in ("lower", "upper"))
    return (off - chosen) / span


def claim_needs_lr(tasks: dict, rms: str = RMSPROP) -> dict:
    """Rule: per task, RMSProp needs its lr when a 10x wrong lr (either way) loses more than 10%
    of the task's attainable improvement (regret_at_10x > 0.1). A majority of tasks: supported;
    at least one: mixed; none: not supported. Adam's and SGD's counts under the same test are
    the yardstick quoted with it."""
    parts = []
    counts = {}
    for o in (rms, "Adam", "SGD"):
        counts[o] = sum(regret_at_10x(t, o) > REGRET_THRESHOLD for t in tasks.values())
    for name, task in tasks.items():
        regrets = {o: regret_at_10x(task, o) for o in (rms, "Adam", "SGD")}
        text = f"{name}: regret at 10x " + ", ".join(f"{o} {r:.2f}" for o, r in regrets.items())
        flag = f"{name}: {rms}'s {_edge(task, rms)}" if _edge(task, rms) else None
        held = regrets[rms] > REGRET_THRESHOLD if math.isfinite(regrets[rms]) else None
        parts.append(
            Part(
                None if flag else held,
                text,
                flag or (None if held is not None else f"{name}: nobody learned"),
            )
        )
    return _result(
        "RMSProp still requires manual selection of the learning rate",
        rms,
        parts,
        lambda held: _by_count(sum(held), len(held)),
        f"a 10x wrong lr costs over 10% of the attainable improvement on {counts[rms]}/{len(tasks)} tasks for "
        f"{rms} (Adam {counts['Adam']}, SGD {counts['SGD']})",
    )


def speed_target(task: dict, a: str, b: str) -> float:
    """The level both optimizers reach: 90% of the way from the start of their mean (smoothed)
    training curves to the higher of the two lowest points, on the task's scale."""
    log = task["log_scale"]
    lows, starts = [], []
    for o in (a, b):
        mean = measures.smooth(
            [
                measures.to_scale(v, log) if math.isfinite(v) else math.inf
                for v in _entry(task, o)["curves"]["mean"]
            ]
        )
        lows.append(min(mean))
        starts.append(mean[0])
    start = statistics.fmean(starts)
    return start + TARGET_FRACTION * (max(lows) - start)


def steps_to_target(task: dict, name: str, target: float) -> list[float]:
    curves = _entry(task, name)["curves"]
    return [
        measures.steps_to_target(curves["steps"], c, target, task["log_scale"]) for c in curves["per_seed"]
    ]


def claim_adam_faster(tasks: dict, rms: str = RMSPROP) -> dict:
    """Rule: on every task that converges to one target (all but the non-stationary one), count
    the training steps each needs to reach a common target (90% of the progress both make, on
    the smoothed curve; never: one logging interval past the end), paired over report seeds.
    Adam faster beyond the noise on a majority of these tasks: supported; on at least one:
    mixed; on none: not supported."""
    parts = []
    faster_rms = 0
    for name, task in tasks.items():
        if not task.get("has_convergence_speed", True):
            continue
        target = speed_target(task, "Adam", rms)
        adam, mine = steps_to_target(task, "Adam", target), steps_to_target(task, rms, target)
        result, numbers = measures.outcome(adam, mine)
        faster_rms += result == LOSS
        flag = None
        if result == WIN and _edge(task, rms):
            flag = f"{name}: {rms}'s {_edge(task, rms)}"
        elif result != WIN and _edge(task, "Adam"):
            flag = f"{name}: Adam's {_edge(task, 'Adam')}"
        text = (
            f"{name}: steps to target Adam {statistics.fmean(adam):.0f} vs {rms} {statistics.fmean(mine):.0f} "
            f"({_interval(numbers, False)}) -> Adam {result}"
        )
        parts.append(Part(None if flag else result == WIN, text, flag))
    return _result(
        "RMSProp may converge more slowly than Adam on some tasks",
        rms,
        parts,
        lambda held: _by_count(sum(held), len(held)),
        f"Adam reaches the common target faster beyond the noise on {sum(' -> Adam win' in p.text for p in parts)}"
        f"/{len(parts)} tasks, "
        f"{rms} faster on {faster_rms}",
    )


ALL_TASKS = ("seed", "long-horizon", "non-stationary", "rnn", "digits", "rosenbrock", "rl", "text")
# Each rule with the tasks it needs (None: whatever tasks were run) and the baselines it needs; a
# run without them leaves the claim unjudged and lists it in claims_skipped.
RULES: list[tuple[Callable[..., dict], tuple[str, ...] | None, tuple[str, ...]]] = [
    (claim_adagrad_decay, DECAY_TASKS, ("Adagrad",)),
    (claim_per_parameter, ADAPT_TASKS, ("SGD",)),
    (claim_non_stationary, NONSTATIONARY_TASKS, ("SGD", "Adagrad")),
    (claim_better_than_adagrad, None, ("Adagrad",)),
    (claim_needs_lr, None, ("Adam", "SGD")),
    (claim_adam_faster, None, ("Adam",)),
]


def judge(tasks: dict, variants: Sequence[str] = RMSPROP_VARIANTS) -> tuple[list[dict], list[str]]:
    """Every claim the run can decide, for plain RMSProp first and then for each variant run,
    with verdict, evidence and the rule that decided it; and the names of the rules skipped for
    plain RMSProp because the run lacks a task or optimizer they need."""
    judged, skipped = [], []
    for rms in variants:
        for rule, need_tasks, baselines in RULES:
            have = all(t in tasks for t in need_tasks or ()) and all(
                n in task["optimizers"] for task in tasks.values() for n in (*baselines, rms)
            )
            if not have:
                if rms == RMSPROP:
                    skipped.append(rule.__name__)
                continue
            result = rule(tasks, rms)
            result["rule"] = " ".join((rule.__doc__ or "").split())
            result["primary"] = rms == RMSPROP
            judged.append(result)
    return judged, skipped
