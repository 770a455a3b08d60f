"""`rmsprop compare`: tasks learn, the results schema, the verdict rules, determinism."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from rmsprop.experiments import claims
from rmsprop.experiments.optimizers import OPTIMIZERS, effective_lr
from rmsprop.experiments.runner import aggregate, run_compare, run_job, to_json
from rmsprop.experiments.tasks import TASKS


@pytest.mark.parametrize("name", list(TASKS))
def test_each_task_lowers_its_loss(name):
    result = TASKS[name].run(lambda ps: torch.optim.Adam(ps, lr=1e-2), 0, True)
    assert math.isfinite(result["final"])
    assert result["curve"][-1] < result["curve"][0]
    assert result["final"] < result["initial"]


def test_effective_lr_formulas():
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.tensor([1.0, 2.0, 4.0])
    ada = torch.optim.Adagrad([p], lr=0.1, eps=0.0)
    ada.step()
    torch.testing.assert_close(effective_lr(ada, [p]), 0.1 / torch.tensor([1.0, 2.0, 4.0]))
    rms = OPTIMIZERS["RMSprop (torch)"]([p], 0.1)
    rms.step()
    v = 0.01 * torch.tensor([1.0, 4.0, 16.0])
    torch.testing.assert_close(effective_lr(rms, [p]), 0.1 / (v.sqrt() + 1e-8))


@pytest.fixture(scope="module")
def small_results():
    return run_compare(quick=True, tasks=["seed", "rosenbrock"], seeds=2, workers=1)


def test_results_schema(small_results):
    data = json.loads(to_json(small_results))  # strict JSON: diverged runs are null
    assert set(data["tasks"]) == {"seed", "rosenbrock"}
    for task in data["tasks"].values():
        assert set(task["optimizers"]) == set(OPTIMIZERS)
        for entry in task["optimizers"].values():
            assert {"best_lr", "final_mean", "final_std", "sweep", "good_lr_fraction", "curve"} <= set(entry)
            assert len(entry["sweep"]) == 3 and all(v["seeds"] == 2 for v in entry["sweep"].values())
    for c in data["claims"]:
        assert set(c) >= {"claim", "verdict", "evidence", "rule"}
        assert c["verdict"] in {"supported", "not supported", "mixed"}
    # claims needing tasks that were not run are listed, not judged
    assert "claim_adagrad_decay" in data["claims_skipped"]


def test_same_seed_same_numbers_whatever_the_worker_count(small_results):
    again = run_compare(quick=True, tasks=["seed", "rosenbrock"], seeds=2, workers=2)
    assert to_json(again) == to_json(small_results)


def test_best_lr_and_regret_on_known_runs():
    def run(opt, lr, seed, final):
        return {
            "task": "t",
            "optimizer": opt,
            "lr": lr,
            "seed": seed,
            "final": final,
            "initial": 1.0,
            "curve": [1.0, final],
            "steps": [0, 9],
        }

    runs = [run("A", lr, s, f) for s in (0, 1) for lr, f in ((0.1, 0.5), (0.01, 0.2), (0.001, math.inf))]
    entry = aggregate(runs, [0.001, 0.01, 0.1])["t"]["optimizers"]["A"]
    assert entry["best_lr"] == 0.01 and entry["final_mean"] == 0.2
    assert entry["regret"][repr(0.1)] == pytest.approx((0.5 - 0.2) / (1.0 - 0.2))
    assert entry["diverged_fraction"] == pytest.approx(1 / 3)
    assert entry["good_lr_fraction"] == pytest.approx(1 / 3)


# --------------------------------------------------------------------------- verdict rules
def _synthetic() -> dict:
    """Numbers under which RMSProp wins everything that can be won."""

    def entry(final, good=0.3, lr=0.01, eff=None):
        e = {"final_mean": final, "good_lr_fraction": good, "best_lr": lr}
        if eff is not None:
            e["effective_lr"] = eff
        return e

    grows = {"median": [1.0, 10.0], "p10": [1.0, 1.0], "p90": [1.0, 5.0]}
    shrinks = {"median": [1.0, 0.1], "p10": [0.1, 0.1], "p90": [1.0, 0.1]}
    tasks = {}
    for name in claims.ALL_TASKS:
        opts = {
            "SGD": entry(1.0),
            "SGD+momentum": entry(0.9),
            "Adagrad": entry(0.8, good=0.2, eff=shrinks),
            "Adam": entry(0.5),
            "RMSprop (torch)": entry(0.4, eff=grows),
            "RMSprop (seed)": entry(0.45, eff=grows),
        }
        tasks[name] = {"optimizers": opts}
    return tasks


def _verdict(tasks, rule):
    return rule(tasks)["verdict"]


def test_adagrad_decay_claim_flips():
    tasks = _synthetic()
    assert _verdict(tasks, claims.claim_adagrad_decay) == "supported"
    tasks["long-horizon"]["optimizers"]["Adagrad"]["final_mean"] = 0.1  # Adagrad now ends lower
    assert _verdict(tasks, claims.claim_adagrad_decay) == "mixed"
    tasks["long-horizon"]["optimizers"]["Adagrad"]["effective_lr"] = {
        "median": [1.0, 100.0],
        "p10": [1, 1],
        "p90": [1, 1],
    }
    assert _verdict(tasks, claims.claim_adagrad_decay) == "not supported"


def test_per_parameter_claim_flips():
    tasks = _synthetic()
    assert _verdict(tasks, claims.claim_per_parameter) == "supported"  # p90/p10 = 5
    for n in ("RMSprop (torch)", "RMSprop (seed)"):
        tasks["long-horizon"]["optimizers"][n]["effective_lr"] = {
            "median": [1, 1],
            "p10": [1, 1.0],
            "p90": [1, 1.5],
        }
    assert _verdict(tasks, claims.claim_per_parameter) == "mixed"
    for n in ("RMSprop (torch)", "RMSprop (seed)"):
        tasks["long-horizon"]["optimizers"][n]["effective_lr"]["p90"] = [1, 1.0]
    assert _verdict(tasks, claims.claim_per_parameter) == "not supported"


def test_non_stationary_claim_flips():
    tasks = _synthetic()
    assert _verdict(tasks, claims.claim_non_stationary) == "supported"
    tasks["rnn"]["optimizers"]["SGD"]["final_mean"] = 0.01
    assert _verdict(tasks, claims.claim_non_stationary) == "mixed"
    tasks["non-stationary"]["optimizers"]["Adagrad"]["final_mean"] = 0.01
    assert _verdict(tasks, claims.claim_non_stationary) == "not supported"


def test_better_than_adagrad_claim_flips():
    tasks = _synthetic()
    assert _verdict(tasks, claims.claim_better_than_adagrad) == "supported"
    for t in tasks.values():
        t["optimizers"]["Adagrad"]["good_lr_fraction"] = 0.9
    assert _verdict(tasks, claims.claim_better_than_adagrad) == "mixed"
    for t in tasks.values():
        t["optimizers"]["Adagrad"]["final_mean"] = 0.01
    assert _verdict(tasks, claims.claim_better_than_adagrad) == "not supported"


def test_needs_lr_claim_flips():
    tasks = _synthetic()
    assert _verdict(tasks, claims.claim_needs_lr) == "supported"  # 30% of the grid is good
    for i, t in enumerate(tasks.values()):
        for n in ("RMSprop (torch)", "RMSprop (seed)"):
            t["optimizers"][n]["good_lr_fraction"] = 0.3 if i == 0 else 0.8
    assert _verdict(tasks, claims.claim_needs_lr) == "mixed"
    for t in tasks.values():
        for n in ("RMSprop (torch)", "RMSprop (seed)"):
            t["optimizers"][n]["good_lr_fraction"] = 0.8
    assert _verdict(tasks, claims.claim_needs_lr) == "not supported"


def test_adam_claim_flips():
    tasks = _synthetic()
    assert _verdict(tasks, claims.claim_adam_faster) == "not supported"  # RMSProp 0.4 < Adam 0.5
    tasks["digits"]["optimizers"]["Adam"]["final_mean"] = 0.3
    result = claims.claim_adam_faster(tasks)
    assert result["verdict"] == "supported" and "digits" in result["evidence"]


def test_judge_skips_claims_whose_inputs_are_missing():
    tasks = copy.deepcopy(_synthetic())
    del tasks["long-horizon"]
    judged, skipped = claims.judge(tasks)
    assert "claim_adagrad_decay" in skipped and "claim_per_parameter" in skipped
    assert all(c["verdict"] in {"supported", "mixed", "not supported"} for c in judged)


def test_a_diverged_run_scores_infinity():
    result = run_job(("rosenbrock", "SGD", 1.0, 0, True))
    assert result["final"] == math.inf
