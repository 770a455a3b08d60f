"""`rmsprop compare`: tasks learn, the lr search, the measures, the verdict rules on synthetic
numbers (each flipped), the results schema, determinism, the report, and the CLI's manners."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from rmsprop.experiments import claims, measures
from rmsprop.experiments.optimizers import OPTIMIZERS, RMSPROP, effective_lr
from rmsprop.experiments.runner import (
    SEARCH_FULL,
    Search,
    edge_reason,
    ladder_lr,
    next_lr_index,
    run_compare,
    run_job,
    to_json,
)
from rmsprop.experiments.tasks import TASKS, trivial_baseline

# A learning rate that trains each task in quick mode (A2C wants a smaller step than the rest).
GOOD_LR = {"rl": 1e-3}


@pytest.mark.parametrize("name", list(TASKS))
def test_each_task_lowers_its_loss_in_quick_mode(name):
    result = TASKS[name].run(lambda ps: torch.optim.Adam(ps, lr=GOOD_LR.get(name, 1e-2)), 0, True)
    assert math.isfinite(result["final"])
    assert result["curve"][-1] < result["curve"][0]
    assert result["final"] < result["initial"]
    baseline = trivial_baseline(name)
    if baseline is not None:  # the trivial predictor is beaten too: the task learns something real
        assert result["final"] < baseline


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


def test_a_diverged_run_scores_infinity_and_counts_as_diverged():
    result = run_job(("rosenbrock", "SGD", 1.0, 0, True))
    assert result["final"] == math.inf
    assert measures.diverged(result["final"], result["initial"])


# --------------------------------------------------------------------------- the lr search
def test_search_extends_past_an_edge_and_refines_an_interior_best():
    cap = SEARCH_FULL.cap
    # best at the largest lr tried (index 0 = lr 1): one decade up
    assert next_lr_index({-4: 3.0, -2: 2.0, 0: 1.0}, cap) == 2
    # best at the smallest: one decade down
    assert next_lr_index({-4: 1.0, -2: 2.0, 0: 3.0}, cap) == -6
    # interior best at 0.01 (index -4): the half-decade point towards its better neighbour (0.1)
    assert next_lr_index({-6: 3.0, -4: 1.0, -2: 2.0}, cap) == -3
    assert next_lr_index({-6: 2.0, -4: 1.0, -2: 3.0}, cap) == -5
    # best at the cap: no decade beyond it; refine inside instead
    assert next_lr_index({-2: 3.0, 0: 2.0, 2: 1.0}, (-10, 2)) == 1


def test_edge_flags_say_why():
    search = Search(start=(-4, -2, 0), budget=3, cap=(-10, 2))
    assert (
        edge_reason({-4: 1.0, -2: 2.0, 0: 1.5}, search)
        == "best lr 0.01 is the smallest tried (the budget of 3 lrs ran out)"
    )
    assert "at the search cap" in edge_reason({0: 2.0, 2: 1.0}, search)
    assert edge_reason({-4: 2.0, -2: 1.0, 0: 3.0}, search) is None
    assert ladder_lr(-3) == pytest.approx(10**-1.5)


# --------------------------------------------------------------------------- measures
def test_divergence_is_failing_to_improve_not_only_inf():
    assert measures.diverged(math.inf, 1.0) and measures.diverged(math.nan, 1.0)
    assert measures.diverged(39.0, 1.06)  # finite, but worse than the untrained model
    assert not measures.diverged(0.5, 1.06)
    assert measures.score(39.0, 1.06, log_scale=False) == 1.06  # scored as no training
    assert measures.score(0.01, 1.0, log_scale=True) == pytest.approx(-2.0)


def test_spikes_count_giving_back_half_the_progress():
    falling = [10.0 - i for i in range(10)]
    assert measures.count_spikes(falling, log_scale=False) == 0
    spiked = falling[:6] + [9.0] * 6 + falling[6:]  # back near the start for a while, then recovers
    assert measures.count_spikes(spiked, log_scale=False) == 1
    assert measures.count_spikes([1.0, 0.5, math.inf], log_scale=False) == 1


def test_steps_to_target_and_late_share():
    steps = list(range(0, 100, 10))
    assert measures.steps_to_target(steps, [1.0] * 10, 0.5, False) == 100.0  # never: one interval past
    assert (
        measures.steps_to_target(steps, [1.0, 0.0] + [0.0] * 8, 0.4, False) == 20.0
    )  # smoothed: 0.5, then 0.33
    still_learning = [1.0 - i / 10 for i in range(11)]
    stalled = [1.0, 0.2, 0.1] + [0.1] * 8
    assert measures.late_share(still_learning, False) > 0.4
    assert measures.late_share(stalled, False) < 0.05


def test_a_difference_inside_the_noise_is_a_tie():
    assert measures.outcome([1.0, 1.0, 1.0], [2.0, 2.1, 1.9])[0] == measures.WIN
    assert measures.outcome([1.0, 3.0, 1.0], [2.0, 2.0, 2.0])[0] == measures.TIE  # one seed disagrees
    assert measures.outcome([3.0, 3.0, 3.0], [2.0, 2.1, 1.9])[0] == measures.LOSS


# --------------------------------------------------------------------------- verdict rules
def _entry(scores, *, edge=None, curve=None, spread=5.0, off=None, unstable=0, steps=None):
    """An optimizer's aggregated numbers as the rules read them."""
    n = len(scores)
    curve = curve or [1.0 - 0.1 * i for i in range(10)]
    run = {"scores": list(scores), "diverged": [False] * n, "spikes": [0] * n}
    bad = {"scores": list(off or scores), "diverged": [i < unstable for i in range(n)], "spikes": [0] * n}
    return {
        "report": list(scores),
        "edge_reason": edge,
        "runs": {"best": run, "lower": dict(bad), "upper": dict(bad)},
        "curves": {
            "steps": steps or list(range(0, 10 * len(curve), 10)),
            "per_seed": [curve] * n,
            "mean": curve,
        },
        "effective_lr_end": [{"p10": 1.0, "median": 2.0, "p90": spread}] * n,
    }


def _tasks(**overrides):
    """Eight tasks where RMSprop (torch) wins what can be won, Adam is faster, lrs matter."""
    linear = [1.0 - 0.1 * i for i in range(10)]
    stall = [1.0, 0.6, 0.55] + [0.55] * 7
    fast = [1.0, 0.3] + [0.1] * 8
    tasks = {}
    for name in claims.ALL_TASKS:
        opts = {
            "SGD": _entry([0.9, 0.92, 0.91], spread=1.0, off=[1.0] * 3),
            "SGD+momentum": _entry([0.8, 0.8, 0.8]),
            "Adagrad": _entry([0.7, 0.71, 0.72], curve=stall, off=[0.75] * 3, unstable=2),
            "Adam": _entry([0.5, 0.5, 0.5], curve=fast, off=[0.9] * 3),
            "RMSprop (torch)": _entry([0.4, 0.41, 0.39], curve=linear, off=[0.9] * 3),
            "RMSprop (seed)": _entry([0.95, 0.95, 0.95], curve=stall, spread=1.0, off=[1.0] * 3),
        }
        tasks[name] = {
            "optimizers": opts,
            "log_scale": False,
            "initial": 1.0,
            "has_convergence_speed": name != "non-stationary",
        }
    for (task, opt), entry in overrides.items():
        tasks[task]["optimizers"][opt] = entry
    return tasks


RULES = [rule for rule, _, _ in claims.RULES]


@pytest.mark.parametrize(
    "rule, expected",
    [
        (claims.claim_adagrad_decay, "supported"),
        (claims.claim_per_parameter, "supported"),
        (claims.claim_non_stationary, "supported"),
        (claims.claim_better_than_adagrad, "supported"),
        (claims.claim_needs_lr, "supported"),
        (claims.claim_adam_faster, "supported"),
    ],
)
def test_each_rule_on_the_synthetic_numbers(rule, expected):
    assert rule(_tasks())["verdict"] == expected


def test_adagrad_decay_flips_when_adagrad_keeps_learning_and_ends_lower():
    tasks = _tasks()
    for name in claims.DECAY_TASKS:
        tasks[name]["optimizers"]["Adagrad"] = _entry(
            [0.3, 0.3, 0.3], curve=[1.0 - 0.1 * i for i in range(10)]
        )
    assert claims.claim_adagrad_decay(tasks)["verdict"] == "not supported"
    tasks["text"]["optimizers"]["Adagrad"] = _entry([0.7, 0.71, 0.72], curve=[1.0, 0.6, 0.55] + [0.55] * 7)
    assert claims.claim_adagrad_decay(tasks)["verdict"] == "mixed"


def test_per_parameter_needs_both_adaptation_and_a_win_over_sgd():
    tasks = _tasks()
    for name in claims.ADAPT_TASKS:  # step sizes that do not differ across parameters
        tasks[name]["optimizers"][RMSPROP]["effective_lr_end"] = [{"p10": 1.0, "median": 1.0, "p90": 1.5}] * 3
    assert claims.claim_per_parameter(tasks)["verdict"] == "not supported"
    tasks = _tasks()
    for name in claims.ADAPT_TASKS[:2]:  # adapts, but SGD does as well
        tasks[name]["optimizers"]["SGD"] = _entry([0.4, 0.41, 0.39], spread=1.0)
    assert claims.claim_per_parameter(tasks)["verdict"] == "mixed"


def test_non_stationary_flips_on_the_baselines():
    tasks = _tasks()
    for name in claims.NONSTATIONARY_TASKS[:3]:
        tasks[name]["optimizers"]["Adagrad"] = _entry([0.2, 0.2, 0.2])
    assert claims.claim_non_stationary(tasks)["verdict"] == "mixed"
    tasks["text"]["optimizers"]["SGD"] = _entry([0.1, 0.1, 0.1])
    assert claims.claim_non_stationary(tasks)["verdict"] == "not supported"


def test_stability_half_of_the_adagrad_claim_flips():
    tasks = _tasks()
    for task in tasks.values():
        task["optimizers"]["Adagrad"] = _entry([0.7, 0.71, 0.72], unstable=0)
        task["optimizers"][RMSPROP] = _entry([0.4, 0.41, 0.39], off=[0.9] * 3, unstable=3)
    assert claims.claim_better_than_adagrad(tasks)["verdict"] == "mixed"  # converges better, less stable


def test_needs_lr_flips_when_a_10x_wrong_lr_costs_nothing():
    tasks = _tasks()
    for task in tasks.values():
        task["optimizers"][RMSPROP]["runs"]["lower"]["scores"] = [0.41] * 3
        task["optimizers"][RMSPROP]["runs"]["upper"]["scores"] = [0.42] * 3
    result = claims.claim_needs_lr(tasks)
    assert result["verdict"] == "not supported"
    assert "Adam 8, SGD 8" in result["evidence"]  # the yardstick is quoted


def test_adam_faster_is_mixed_when_rmsprop_is_faster_on_most():
    tasks = _tasks()
    for name in list(claims.ALL_TASKS)[:5]:
        tasks[name]["optimizers"]["Adam"] = _entry([0.5] * 3, curve=[1.0 - 0.05 * i for i in range(20)])
    assert claims.claim_adam_faster(tasks)["verdict"] == "mixed"


def test_a_best_lr_at_the_grid_edge_leaves_the_claim_unjudged():
    tasks = _tasks()
    edge = "best lr 10 is the largest tried (at the search cap)"
    for name in claims.ADAPT_TASKS:  # SGD might do better beyond its edge: every win over it is open
        tasks[name]["optimizers"]["SGD"]["edge_reason"] = edge
    result = claims.claim_per_parameter(tasks)
    assert result["verdict"] == "unjudged"
    assert edge in result["evidence"] and result["edge_flags"]
    # an edge that cannot change the verdict leaves it standing
    tasks = _tasks()
    tasks["digits"]["optimizers"]["SGD"]["edge_reason"] = edge
    assert claims.claim_per_parameter(tasks)["verdict"] == "supported"


def test_a_win_inside_the_noise_is_a_tie_and_changes_the_verdict():
    tasks = _tasks()
    for name in claims.NONSTATIONARY_TASKS:  # RMSProp ahead of SGD on average, but not on every seed
        tasks[name]["optimizers"]["SGD"] = _entry([0.3, 0.95, 0.95])
    result = claims.claim_non_stationary(tasks)
    assert result["verdict"] == "not supported" and "-> tie" in result["evidence"]


def test_no_best_of_two_each_variant_is_judged_alone():
    tasks = _tasks()  # RMSprop (seed) is worse than every baseline everywhere
    judged, skipped = claims.judge(tasks, variants=("RMSprop (torch)", "RMSprop (seed)"))
    assert not skipped
    by = {(c["claim"], c["rmsprop"]): c for c in judged}
    claim = "RMSProp performs well on non-stationary targets (e.g. RNN training)"
    assert (
        by[(claim, "RMSprop (torch)")]["verdict"] == "supported" and by[(claim, "RMSprop (torch)")]["primary"]
    )
    assert by[(claim, "RMSprop (seed)")]["verdict"] == "not supported"
    # and the torch row does not borrow the seed form's numbers when the torch form is the worse one
    tasks = _tasks()
    for task in tasks.values():
        task["optimizers"]["RMSprop (torch)"], task["optimizers"]["RMSprop (seed)"] = (
            task["optimizers"]["RMSprop (seed)"],
            task["optimizers"]["RMSprop (torch)"],
        )
    assert claims.claim_non_stationary(tasks)["verdict"] == "not supported"


def test_judge_skips_claims_whose_inputs_are_missing():
    tasks = _tasks()
    del tasks["long-horizon"], tasks["text"]
    judged, skipped = claims.judge(tasks, variants=(RMSPROP,))
    assert "claim_adagrad_decay" in skipped and "claim_per_parameter" in skipped
    assert all(c["verdict"] in {"supported", "mixed", "not supported", "unjudged"} for c in judged)


# --------------------------------------------------------------------------- the whole pipeline, tiny
SMALL = {"quick": True, "tasks": ["seed", "rosenbrock"], "optimizers": ["SGD", "Adagrad", "Adam", RMSPROP]}


@pytest.fixture(scope="module")
def small_results():
    return run_compare(**SMALL, workers=1)


def test_results_schema(small_results):
    data = json.loads(to_json(small_results))  # strict JSON: diverged runs are null
    setup = data["setup"]
    assert setup["selection_seeds"] and setup["report_seeds"]
    assert not set(setup["selection_seeds"]) & set(setup["report_seeds"])
    assert set(data["tasks"]) == {"seed", "rosenbrock"}
    budget = setup["search"]["budget"]
    for task in data["tasks"].values():
        assert set(task["optimizers"]) == set(SMALL["optimizers"])
        for entry in task["optimizers"].values():
            assert {"best_lr", "lr_grid", "at_grid_edge", "report"} <= set(entry)
            assert len(entry["lr_grid"]) == budget  # every optimizer tries as many lrs
            assert entry["best_lr"] in entry["lr_grid"]
            assert isinstance(entry["at_grid_edge"], bool)
            assert len(entry["report"]) == len(setup["report_seeds"])
    for c in data["claims"]:
        assert set(c) >= {"claim", "verdict", "evidence", "rule", "rmsprop"}
        assert c["verdict"] in {"supported", "not supported", "mixed", "unjudged"}
        assert c["rmsprop"] == RMSPROP
    assert "claim_adagrad_decay" in data["claims_skipped"]  # needs tasks that were not run
    assert set(setup["hyperparameters"]) == set(SMALL["optimizers"])
    assert "betas=(0.9, 0.999)" in setup["hyperparameters"]["Adam"]


def test_the_hyperparameters_a_run_states_are_the_optimizers_own(small_results):
    """A run states them (read in a worker); an older results file without them gets the same
    table, read from the optimizers when the report is written."""
    from rmsprop.experiments.report import settings_table

    older = copy.deepcopy(small_results)
    del older["setup"]["hyperparameters"]
    assert settings_table(older) == settings_table(small_results)
    assert any("alpha=0.99" in row[2] for row in settings_table(small_results))


def test_same_seed_same_numbers_whatever_the_worker_count(small_results):
    again = run_compare(**SMALL, workers=2)
    assert to_json(again) == to_json(small_results)


def test_report_is_self_contained_and_written_whole(small_results, tmp_path, monkeypatch):
    from rmsprop.experiments import report

    paths = report.write(small_results, tmp_path / "out")
    names = {p.name for p in paths}
    assert {"report.html", "report.md", "results.json", "curves.png", "lr_sweeps.png", "seeds.png"} <= names
    page = (tmp_path / "out" / "report.html").read_text()
    assert "data:image/png;base64," in page and "src='http" not in page
    for section in ("Summary", "Claims", "Settings", "Run details", "Contents"):
        assert section in page
    assert "untrained model" in page and "<b>" in page  # the baseline row, the best in bold

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "plot_seeds", interrupted)
    with pytest.raises(KeyboardInterrupt):
        report.write(small_results, tmp_path / "fresh")
    assert list((tmp_path / "fresh").iterdir()) == []  # nothing half-written, no staging folder left


def test_a_saved_run_gives_the_same_verdicts(small_results):
    from rmsprop.experiments.runner import from_json

    again, _ = claims.judge(from_json(to_json(small_results))["tasks"])
    assert again == small_results["claims"]


# --------------------------------------------------------------------------- the state-format study
def test_state_format_optimizers_keep_their_state_in_their_format():
    """Each entry of the state-format study stores RMSprop momentum's two buffers in its format
    ("int8" leaves a tensor under int8_min_numel in float32, "all tensors" does not), and the
    default study leaves them out."""
    from rmsprop.experiments.optimizers import (
        DEFAULT_OPTIMIZERS,
        OPTIMIZERS,
        STATE_FORMAT_STUDY,
        STATE_FORMATS,
    )

    want = {"RMSprop momentum": (torch.float32, torch.float32), "RMSprop momentum, bf16 state": (torch.bfloat16,) * 2,
            "RMSprop momentum, int8 state": (torch.uint8, torch.float32),
            "RMSprop momentum, int8 state, all tensors": (torch.uint8, torch.uint8)}  # fmt: skip
    assert list(want) == list(STATE_FORMAT_STUDY)
    for name, (large, small) in want.items():
        params = [torch.zeros(5000, requires_grad=True), torch.zeros(10, requires_grad=True)]
        opt = OPTIMIZERS[name](params, 0.01)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        for p, dtype in zip(params, (large, small), strict=True):
            assert {opt.state[p]["square_avg"].dtype, opt.state[p]["momentum_buffer"].dtype} == {dtype}, name
    assert not set(DEFAULT_OPTIMIZERS) & set(STATE_FORMATS)


def test_state_formats_table_compares_each_format_with_float32_state():
    from rmsprop.experiments.report import state_formats_table

    def entry(finals, lr):
        return {"report": finals, "report_mean": sum(finals) / len(finals), "at_grid_edge": False, "best_lr": lr,
                "runs": {"best": {"scores": finals}}}  # fmt: skip

    names = ["RMSprop momentum", "RMSprop momentum, int8 state", "RMSprop momentum, bf16 state"]
    task = {"metric": "loss", "initial": 10.0,
            "optimizers": {names[0]: entry([1.0, 3.0, 2.0], 0.01), names[1]: entry([2.5, 2.5, 2.5], 0.001),
                           names[2]: entry([1.5, 3.5, 2.5], 0.01)}}  # fmt: skip
    results = {"setup": {"optimizers": names}, "tasks": {"seed": task}}
    rows = state_formats_table(results)
    assert rows[0] == ["task", "metric", "float32 state", "bf16 state", "int8 state"]  # the study's order
    # the same +25%: inside the noise for one (seeds disagree), worse for the other (all three agree)
    assert rows[1] == ["seed", "*loss*", "2 at lr 0.01", "2.5 at lr 0.01 (+25.0%, **worse**)",
                       "2.5 at lr 0.001 (+25.0%, tie)"]  # fmt: skip
    results["setup"]["optimizers"] = names[:1]
    assert state_formats_table(results) is None  # no format to compare: no section
