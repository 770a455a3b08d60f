"""Plots, report.md and a self-contained report.html from the results of `rmsprop compare`.

Everything is written into a temporary folder inside ``out`` and moved into place file by file
only once all of it exists, so an interrupted report leaves the previous files (or none), never
a half-written one.
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
import shutil
import statistics
import tempfile
from pathlib import Path

from . import claims as claim_rules
from . import measures
from .optimizers import DESCRIPTIONS, RMSPROP, RMSPROP_VARIANTS, STATE_FORMAT_STUDY, hyperparameters

# The optimizers of the main figures: the baselines and the RMSProp the general claims judge.
MAIN = ("SGD", "SGD+momentum", "Adagrad", "Adam", RMSPROP)
PALETTE = {
    "SGD": "#7f7f7f",
    "SGD+momentum": "#bcbd22",
    "Adagrad": "#8c564b",
    "Adam": "#1f77b4",
    "RMSprop (torch)": "#d62728",
    "RMSprop (seed)": "#ff7f0e",
    "RMSprop centered": "#9467bd",
    "RMSprop momentum": "#2ca02c",
}
THICK = {"RMSprop (torch)": 2.8}  # the configuration the general claims judge stands out


def _style(opt: str, lw: float) -> dict:
    return {"color": PALETTE.get(opt), "lw": THICK.get(opt, lw), "zorder": 5 if opt in THICK else 2}


MARKERS = {
    "RMSprop (torch)": "o",
    "RMSprop (seed)": "s",
    "RMSprop centered": "^",
    "RMSprop momentum": "D",
    "SGD": "v",
    "SGD+momentum": "<",
    "Adagrad": ">",
    "Adam": "P",
}


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("the report needs matplotlib: pip install 'rmsprop[report]'") from exc
    plt.rcParams.update({"font.size": 12, "axes.titlesize": 13, "legend.fontsize": 12, "axes.labelsize": 12})
    return plt


def _panels(n: int, cols: int = 4, height: float = 3.6):
    plt = _plt()
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.1 * cols, height * rows + 1.0), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat)


# The panel figures' layout, in inches: fixed room below and between rows (tick labels, axis
# label, title), and room on the left of each column measured from its y tick labels and y label.
# tight_layout measured every artist of every panel, several times, and took 10 of the report's
# 14 seconds; this measures a few labels once.
_BOTTOM, _RIGHT, _TITLE, _ROW_GAP, _PAD = 0.65, 0.3, 0.45, 1.0, 0.12
_TICKS, _MIN_GAP = 0.2, 0.45  # a tick and its label's pad; the least gap (x tick labels overhang)


def _y_room(ax, renderer) -> float:
    """Inches taken left of a panel by its y tick labels and its y label."""
    dpi = ax.figure.dpi
    widths = [t.get_window_extent(renderer).width for t in ax.get_yticklabels() if t.get_visible() and t.get_text()]
    room = max(widths, default=0.0) / dpi + _TICKS
    if ax.get_ylabel():
        room += ax.yaxis.label.get_window_extent(renderer).width / dpi + _PAD
    return room


def _panel_margins(fig, legend=None) -> None:
    """Lay out a grid of panels (from :func:`_panels`) and the legend row above it."""
    renderer = fig.canvas.get_renderer()
    width, height = fig.get_size_inches()
    rows, cols = fig.axes[0].get_subplotspec().get_gridspec().get_geometry()
    shown = [ax for ax in fig.axes if ax.get_visible()]
    column = [ax.get_subplotspec().colspan.start for ax in shown]
    left = max((_y_room(ax, renderer) for ax, c in zip(shown, column, strict=True) if c == 0), default=_PAD)
    gap = max(max((_y_room(ax, renderer) for ax, c in zip(shown, column, strict=True) if c > 0), default=0.0), _MIN_GAP)
    top = _TITLE + (legend.get_window_extent(renderer).height / fig.dpi + _PAD if legend is not None else 0)
    panel_w = (width - left - _RIGHT - (cols - 1) * gap) / cols
    panel_h = (height - _BOTTOM - top - (rows - 1) * _ROW_GAP) / rows
    fig.subplots_adjust(
        left=left / width,
        right=1 - _RIGHT / width,
        bottom=_BOTTOM / height,
        top=1 - top / height,
        wspace=gap / panel_w,
        hspace=_ROW_GAP / panel_h,
    )


def _save(plt, fig, path: Path, handles=None, labels=None, ncol: int = 5) -> Path:
    from matplotlib.ticker import NullFormatter

    for ax in fig.axes:  # minor-tick labels on a log axis within one decade overprint each other
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() == "log":
                axis.set_minor_formatter(NullFormatter())
    legend = None
    if handles:
        legend = fig.legend(handles, labels, loc="upper center", ncol=ncol, frameon=False, bbox_to_anchor=(0.5, 1.0))
    _panel_margins(fig, legend)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _present(task: dict, names) -> list[str]:
    return [n for n in names if n in task["optimizers"]]


def plot_curves(results: dict, path: Path, names=MAIN) -> Path:
    """Training curves at each optimizer's chosen lr, mean over report seeds, one panel per task."""
    tasks = results["tasks"]
    plt, fig, axes = _panels(len(tasks))
    handles = {}
    for ax, (name, task) in zip(axes, tasks.items(), strict=False):
        for opt in _present(task, names):
            c = task["optimizers"][opt]["curves"]
            ys = [v if v is not None and math.isfinite(v) else float("nan") for v in c["mean"]]
            (line,) = ax.plot(c["steps"][: len(ys)], ys, **_style(opt, 1.6))
            handles[opt] = line
        if task["log_scale"]:
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("update" if name == "rl" else "step")
        ax.set_ylabel("500 - return (last 20 episodes)" if name == "rl" else "training loss")
    return _save(plt, fig, path, list(handles.values()), list(handles), ncol=len(handles))


def plot_sweeps(results: dict, path: Path, names=MAIN) -> Path:
    """Mean selection score against lr for every lr each optimizer tried: the search and its edges.
    A diverged lr scores as the untrained model and is drawn as an x on that line."""
    tasks = results["tasks"]
    plt, fig, axes = _panels(len(tasks))
    handles = {}
    for ax, (name, task) in zip(axes, tasks.items(), strict=False):
        untrained = task["initial"]
        for opt in _present(task, names):
            e = task["optimizers"][opt]
            lrs, ys, bad = [], [], []
            for lr_text, point in e["selection"].items():
                lr = float(lr_text)
                finals = [f if f is not None else math.inf for f in point["finals"]]
                if any(measures.diverged(f, untrained) for f in finals):
                    bad.append(lr)
                mean = 10 ** point["score"] if task["log_scale"] else point["score"]
                lrs.append(lr)
                ys.append(mean)
            color = PALETTE.get(opt)
            (line,) = ax.plot(lrs, ys, marker=MARKERS.get(opt), ms=5, **_style(opt, 1.4))
            handles[opt] = line
            best = e["best_lr"]
            ax.plot(
                [best], [ys[lrs.index(best)]], marker=MARKERS.get(opt), ms=11, mfc="none", mec=color, mew=2
            )
            if bad:
                ax.scatter(bad, [untrained] * len(bad), marker="x", color=color, s=70, lw=2, zorder=6)
        ax.axhline(untrained, color="k", ls=":", lw=1.2)
        ax.set_xscale("log")
        if task["log_scale"]:
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("learning rate")
    axes[0].set_ylabel("metric (selection seeds)")
    labels = list(handles)
    from matplotlib.lines import Line2D

    extra = [
        Line2D([], [], color="k", ls=":", lw=1.2),
        Line2D([], [], color="k", marker="x", ls="none", ms=9, mew=2),
        Line2D([], [], color="k", marker="o", ls="none", ms=11, mfc="none", mew=2),
    ]
    return _save(
        plt,
        fig,
        path,
        [*handles.values(), *extra],
        [*labels, "untrained model", "diverged (scored as untrained)", "chosen lr"],
        ncol=4,
    )


def plot_seeds(results: dict, path: Path) -> Path:
    """The final metric of every report seed at the chosen lr, per optimizer: the noise the
    verdicts' bootstrap sees. Diverged seeds are an x at the untrained model's value."""
    tasks = results["tasks"]
    plt, fig, axes = _panels(len(tasks), height=3.9)
    for ax, (name, task) in zip(axes, tasks.items(), strict=False):
        names = list(task["optimizers"])
        for row, opt in enumerate(names):
            e = task["optimizers"][opt]
            color = PALETTE.get(opt)
            finals = [f if f is not None else math.inf for f in e["report"]]
            good = [f for f in finals if not measures.diverged(f, task["initial"])]
            bad = len(finals) - len(good)
            ax.scatter(good, [row] * len(good), color=color, s=30, zorder=3)
            if bad:
                ax.scatter(
                    [task["initial"]] * bad, [row] * bad, marker="x", color=color, s=70, lw=2, zorder=4
                )
        ax.axvline(task["initial"], color="k", ls=":", lw=1.2)
        if task.get("baseline") is not None:
            ax.axvline(task["baseline"], color="k", ls="--", lw=1.0)
        if task["log_scale"]:
            ax.set_xscale("log")
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names if ax in axes[::4] else [""] * len(names), fontsize=11)
        ax.set_ylim(len(names) - 0.5, -0.5)
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(name)
        ax.set_xlabel(task["metric"], fontsize=11)
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color="k", ls=":", lw=1.2),
        Line2D([], [], color="k", ls="--", lw=1.0),
        Line2D([], [], color="k", marker="x", ls="none", ms=9, mew=2),
    ]
    return _save(plt, fig, path, handles, ["untrained model", "trivial baseline", "diverged seed"], ncol=3)


def plot_effective_lr(results: dict, path: Path) -> Path | None:
    task = results["tasks"].get("long-horizon")
    if task is None:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(11, 5))
    handles = {}
    for opt in _present(task, ("SGD", "Adagrad", "Adam", RMSPROP)):
        e = task["optimizers"][opt]
        eff = e.get("effective_lr")
        if not eff or not eff["median"]:
            continue
        color = PALETTE.get(opt)
        (line,) = ax.plot(eff["steps"], eff["median"], color=color, lw=2)
        ax.fill_between(eff["steps"], eff["p10"], eff["p90"], color=color, alpha=0.15, lw=0)
        handles[f"{opt} (lr {e['best_lr']:.3g})"] = line
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("effective lr per parameter")
    ax.legend(list(handles.values()), list(handles), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_rosenbrock(results: dict, path: Path) -> Path | None:
    task = results["tasks"].get("rosenbrock")
    if task is None:
        return None
    plt = _plt()
    import numpy as np

    x, y = np.meshgrid(np.linspace(-2, 2, 300), np.linspace(-1, 3, 300))
    f = (1 - x) ** 2 + 100 * (y - x**2) ** 2
    fig, ax = plt.subplots(figsize=(11, 6.5))
    ax.contour(x, y, np.log10(f + 1e-3), levels=25, cmap="Greys", linewidths=0.6)
    for opt in _present(task, MAIN):
        e = task["optimizers"][opt]
        p = np.array(e.get("path", []), dtype=float)
        if p.size and np.all(np.isfinite(p)):
            p = p[(np.abs(p) < 10).all(1)]
            ax.plot(p[:, 0], p[:, 1], label=f"{opt} (lr {e['best_lr']:.3g})", **_style(opt, 1.8))
    ax.plot([1], [1], "k*", ms=14, label="minimum (1, 1)")
    ax.set_xlim(-2, 2)
    ax.set_ylim(-1, 3)
    ax.set_aspect("equal")
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- tables
def _fmt(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "inf"
    return f"{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def _mean_score(entry: dict) -> float:
    return statistics.fmean(entry["runs"]["best"]["scores"])


def _cell(task: dict, entry: dict) -> str:
    finals = [f if f is not None else math.inf for f in entry["report"]]
    bad = sum(measures.diverged(f, task["initial"]) for f in finals)
    good = [f for f in finals if math.isfinite(f)]
    text = (
        _fmt(statistics.fmean(good))
        if len(good) == len(finals)
        else f"{_fmt(statistics.median(finals))} (median)"
    )
    if bad:
        text += f" ({bad}/{len(finals)} diverged)"
    if entry["at_grid_edge"]:
        text += " †"
    return text


def summary_table(results: dict) -> list[list[str]]:
    """Optimizer x task: the mean final metric over report seeds at the chosen lr, the best in
    bold; the untrained model and the trivial baseline below."""
    tasks = results["tasks"]
    names = list(next(iter(tasks.values()))["optimizers"])
    rows = [["", *tasks], ["metric", *(f"*{task['metric']}*" for task in tasks.values())]]
    best = {
        t: min(task["optimizers"], key=lambda o: _mean_score(task["optimizers"][o]))
        for t, task in tasks.items()
    }
    for opt in names:
        row = [opt]
        for t, task in tasks.items():
            cell = _cell(task, task["optimizers"][opt])
            row.append(f"**{cell}**" if best[t] == opt else cell)
        rows.append(row)
    rows.append(["untrained model", *(_fmt(task["initial"]) for task in tasks.values())])
    rows.append(
        [
            "trivial baseline",
            *(_fmt(task["baseline"]) if task.get("baseline") is not None else "—" for task in tasks.values()),
        ]
    )
    return rows


_VERSUS_FLOAT32 = {measures.WIN: "**better**", measures.TIE: "tie", measures.LOSS: "**worse**"}


def state_formats_table(results: dict) -> list[list[str]] | None:
    """Task x state format (the state-format study, `--state-formats`): each format's mean final
    metric at its chosen lr, and its change against float32 state (RMSprop momentum); None when
    the run has no format to compare."""
    base, formats = STATE_FORMAT_STUDY[0], [f for f in STATE_FORMAT_STUDY[1:] if f in results["setup"]["optimizers"]]
    if base not in results["setup"]["optimizers"] or not formats:
        return None
    rows = [["task", "metric", "float32 state", *(f.split(", ", 1)[1] for f in formats)]]
    for t, task in results["tasks"].items():
        ref = task["optimizers"][base]
        row = [t, f"*{task['metric']}*", f"{_cell(task, ref)} at lr {ref['best_lr']:.3g}"]
        for f in formats:
            entry = task["optimizers"][f]
            cell = f"{_cell(task, entry)} at lr {entry['best_lr']:.3g}"
            a, b = ref["report_mean"], entry["report_mean"]
            change = f"{(b - a) / abs(a):+.1%}, " if math.isfinite(a) and math.isfinite(b) and a != 0 else ""
            verdict = measures.outcome(entry["runs"]["best"]["scores"], ref["runs"]["best"]["scores"])[0]
            cell += f" ({change}{_VERSUS_FLOAT32[verdict]})"
            row.append(cell)
        rows.append(row)
    return rows


def baselines_note(results: dict) -> str:
    named = [
        f"{t}: {task['baseline_label']}" for t, task in results["tasks"].items() if task.get("baseline_label")
    ]
    return "Trivial baselines (no training needed): " + "; ".join(named) + "." if named else ""


def claims_table(claims: list[dict], primary: bool = True) -> list[list[str]]:
    rows = [["claim", "RMSProp judged", "verdict", "in short"]]
    for c in claims:
        if c.get("primary", True) == primary:
            rows.append([c["claim"], c["rmsprop"], f"**{c['verdict']}**", c.get("summary", "")])
    return rows


def variants_table(claims: list[dict]) -> list[list[str]]:
    variants = [v for v in RMSPROP_VARIANTS if any(c["rmsprop"] == v for c in claims)]
    order = list(dict.fromkeys(c["claim"] for c in claims))
    rows = [["claim", *variants]]
    for claim in order:
        by = {c["rmsprop"]: c["verdict"] for c in claims if c["claim"] == claim}
        rows.append([claim, *(by.get(v, "—") for v in variants)])
    return rows


def settings_table(results: dict) -> list[list[str]]:
    rows = [["optimizer", "what it is", "hyperparameters (all but the lr, which is searched)"]]
    names = results["setup"]["optimizers"]
    # a run states them (older results files do not: read them from the optimizers here)
    hyper = results["setup"].get("hyperparameters") or hyperparameters(names)
    for opt in names:
        rows.append([opt, DESCRIPTIONS.get(opt, ""), hyper[opt]])
    return rows


def lr_table(results: dict) -> list[list[str]]:
    """Optimizer x task: the chosen lr († at the edge of the lrs tried)."""
    tasks = results["tasks"]
    rows = [["", *tasks]]
    for opt in results["setup"]["optimizers"]:
        cells = []
        for task in tasks.values():
            e = task["optimizers"][opt]
            cells.append(f"{e['best_lr']:.3g}{' †' if e['at_grid_edge'] else ''}")
        rows.append([opt, *cells])
    return rows


def stability_table(results: dict) -> list[list[str]]:
    """Per optimizer: report runs that diverged and runs with a loss spike, at the chosen lr and
    10x either side, summed over the tasks where spikes mean instability."""
    tasks = results["tasks"]
    rows = [
        [
            "optimizer",
            "diverged at the chosen lr",
            "diverged at lr / 10",
            "diverged at 10x lr",
            "runs with a loss spike",
            "regret of a 10x wrong lr (median over tasks)",
        ]
    ]
    for opt in results["setup"]["optimizers"]:
        counts = {p: [0, 0] for p in ("best", "lower", "upper")}
        spikes = [0, 0]
        regrets = []
        for task in tasks.values():
            runs = task["optimizers"][opt]["runs"]
            for p in counts:
                counts[p][0] += sum(runs[p]["diverged"])
                counts[p][1] += len(runs[p]["diverged"])
                if task["spikes_mean_instability"]:
                    spikes[0] += sum(s > 0 for s in runs[p]["spikes"])
                    spikes[1] += len(runs[p]["spikes"])
            r = claim_rules.regret_at_10x(task, opt)
            if math.isfinite(r):
                regrets.append(r)
        rows.append(
            [
                opt,
                *(f"{a}/{b}" for a, b in counts.values()),
                f"{spikes[0]}/{spikes[1]}",
                f"{statistics.median(regrets):.2f}" if regrets else "—",
            ]
        )
    return rows


def task_table(task: dict) -> list[list[str]]:
    rows = [
        [
            "optimizer",
            "chosen lr",
            "lrs tried",
            f"{task['metric']}: per report seed",
            "mean ± std",
            "edge flag",
        ]
    ]
    for opt, e in sorted(task["optimizers"].items(), key=lambda kv: _mean_score(kv[1])):
        finals = [f if f is not None else math.inf for f in e["report"]]
        rows.append(
            [
                opt,
                f"{e['best_lr']:.3g}",
                ", ".join(f"{lr:.3g}" for lr in e["lr_grid"]),
                ", ".join(_fmt(f) for f in finals),
                f"{_fmt(e['report_mean'])} ± {_fmt(e['report_std'])}",
                e["edge_reason"] or "",
            ]
        )
    return rows


# --------------------------------------------------------------------------- markdown and html
def _md(rows: list[list[str]]) -> str:
    def esc(c: str) -> str:
        return c.replace("|", "\\|")

    out = ["| " + " | ".join(map(esc, rows[0])) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(map(esc, r)) + " |" for r in rows[1:]]
    return "\n".join(out)


def _inline(text: str) -> str:
    """HTML-escape, then the markdown the report text uses: **bold**, *italics* and `code`."""
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    out = re.sub(r"(?<![*\w])\*([^*]+?)\*(?![*\w])", r"<i>\1</i>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


def _html_table(rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{_inline(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", title.lower()).strip().replace(" ", "-")


def _figures(results: dict, out: Path) -> list[tuple[str, Path, str]]:
    """(title, path, caption) of every figure."""
    setup = results["setup"]
    figures = [
        (
            "Training curves",
            plot_curves(results, out / "curves.png"),
            f"Training loss at each optimizer's chosen lr, mean over the report seeds {setup['report_seeds']}; "
            "log axes where the loss spans decades. What to see: which optimizer gets low fastest, and whether "
            f"{RMSPROP} (thick red) keeps falling late in training where Adagrad (brown) flattens.",
        ),
        (
            "Learning-rate search",
            plot_sweeps(results, out / "lr_sweeps.png"),
            "Mean metric on the selection seeds for every lr each optimizer tried (circled: the chosen one). "
            "An lr where a run diverged is an x on the dotted untrained-model line: it scored as no training, "
            "never as a good result. What to see: a chosen lr with a worse point on each side is interior; one "
            "at the end of its line is flagged † and the claims resting on it are unjudged.",
        ),
        (
            "Every report seed",
            plot_seeds(results, out / "seeds.png"),
            "The final metric of each report seed at the chosen lr (dots; x: a diverged seed, placed at the "
            "untrained model's value). Log axes where values span decades. What to see: how far apart the seeds "
            "are; a difference between optimizers smaller than this spread is a tie in the verdicts.",
        ),
    ]
    variants = [v for v in RMSPROP_VARIANTS if v in results["setup"]["optimizers"]]
    if len(variants) > 1:  # a quick run has plain RMSProp alone
        figures.insert(
            2,
            (
                "Training curves of the RMSProp variants",
                plot_curves(results, out / "curves_variants.png", names=variants),
                "The four RMSProp configurations, each at its own chosen lr (mean over report seeds). What to see: "
                "whether the torch form, the seed document's form (eps inside the root, alpha 0.9), centering and "
                "momentum change the picture; each is judged on its own rows, never as a best-of.",
            ),
        )
    eff = plot_effective_lr(results, out / "effective_lr.png")
    if eff:
        figures.append(
            (
                "Effective learning rate",
                eff,
                "Long-horizon task: the step size each optimizer applies per parameter, lr / denominator "
                "(median, band p10-p90), at its chosen lr. What to see: Adagrad's can only shrink; RMSProp's "
                "follows the shrinking gradients up.",
            )
        )
    rosen = plot_rosenbrock(results, out / "rosenbrock.png")
    if rosen:
        figures.append(
            (
                "Rosenbrock trajectories",
                rosen,
                "Paths from near (-1.2, 1) at each optimizer's chosen lr (first report seed) over the log contours "
                "of f. What to see: who follows the curved valley to the minimum at (1, 1).",
            )
        )
    return figures


def _intro(results: dict) -> list[str]:
    setup = results["setup"]
    search = setup["search"]
    return [
        f"Tasks: {', '.join(results['tasks'])}. Optimizers: {', '.join(setup['optimizers'])}. "
        f"{'Quick' if setup['quick'] else 'Full'} sizes.",
        f"Learning rates: {search['description']}. The lr is chosen on the selection seeds "
        f"{setup['selection_seeds']} (lowest mean score); every number below comes from the disjoint report seeds "
        f"{setup['report_seeds']}, at the chosen lr and, for sensitivity and stability, at 10x below and above it. "
        f"Every optimizer gets the same {search['budget']} learning rates per task; † marks a chosen lr at the edge "
        "of what was tried, which leaves unjudged the claims it could change.",
        "Noise: a win counts only when the 95% paired bootstrap interval of the difference over report seeds "
        "excludes 0; otherwise it is a tie. A run diverged when its final metric is not better than the untrained "
        "model's (inf/NaN included); it is then scored as the untrained model. Tasks whose metric spans decades are "
        "compared on log10.",
        f"The general claims judge one configuration, plain RMSProp in torch's form ({RMSPROP}); each variant "
        "gets its own row under the same rules. Each verdict comes from the rule printed with it, applied to the "
        "numbers in results.json.",
    ]


def _details(results: dict) -> list[list[str]]:
    setup = results["setup"]
    run = setup.get("run", {})
    rows = [["", ""]]
    for key, label in (
        ("date", "date"),
        ("seconds", "wall time (s)"),
        ("workers", "worker processes"),
        ("machine", "machine"),
        ("command", "command"),
    ):
        if key in run:
            rows.append([label, str(run[key])])
    for name, version in run.get("versions", {}).items():
        rows.append([name, version])
    rows.append(["training runs", str(setup["runs"])])
    return rows


def _blocks(results: dict, figures: list[tuple[str, Path, str]]) -> list[tuple]:
    """The report as a list of blocks, rendered both to markdown and to HTML: ("h2", title),
    ("h3", title), ("p", text), ("table", rows, css class), ("ul", items), ("figure", title,
    path, caption). Text may use **bold**, *italics* and `code`."""
    claims = results["claims"]
    primary = [c for c in claims if c.get("primary", True)]
    blocks: list[tuple] = [("p", p) for p in _intro(results)]
    formats = state_formats_table(results)
    sections = ["Summary", *(["State formats"] if formats else []), "Claims", "RMSProp variants",
                "Settings", "Stability and lr sensitivity"]  # fmt: skip
    sections += [title for title, _, _ in figures] + ["Tasks", "Run details"]
    blocks += [("h2", "Contents"), ("toc", sections)]
    blocks += [
        ("h2", "Summary"),
        (
            "p",
            "Mean final metric over the report seeds at each optimizer's chosen lr (lower is better; the best of "
            "each task in **bold**). † the chosen lr is at the edge of the lrs tried. "
            + baselines_note(results),
        ),
        ("table", summary_table(results), "summary"),
    ]
    if formats:
        blocks += [
            ("h2", "State formats"),
            (
                "p",
                f"{STATE_FORMAT_STUDY[0]} with each `state_dtype`: the mean final metric over the report seeds at "
                "each format's own chosen lr, and in brackets its change against float32 state (lower is better) and "
                "the verdict of the study's noise rule on the paired report seeds (better or worse only when the 95% "
                "bootstrap interval of the difference excludes 0, otherwise a tie). "
                "\"int8\" keeps tensors under `int8_min_numel` (4096 elements) in float32; \"all tensors\" "
                "quantizes every one.",
            ),
            ("table", formats, "summary"),
        ]
    blocks += [
        ("h2", "Claims"),
        ("table", claims_table(claims), "claims"),
    ]
    for c in primary:
        blocks += [
            ("h3", c["claim"]),
            ("p", f"Verdict for {c['rmsprop']}: **{c['verdict']}**. {c.get('summary', '')}."),
            ("p", f"*{c['rule']}*"),
            (
                "ul",
                [re.sub(r"-> ((?:Adam )?\w+)", r"-> **\1**", d) for d in c.get("details", [c["evidence"]])],
            ),
        ]
    if results.get("claims_skipped"):
        skipped = ", ".join(results["claims_skipped"])
        blocks.append(("p", f"Not judged (a needed task or optimizer was not run): {skipped}."))
    blocks += [
        ("h2", "RMSProp variants"),
        (
            "p",
            "The same rules and baselines, each judging one RMSProp configuration (the claims above are the "
            f"{RMSPROP} column). The evidence of every cell is in results.json (claims[i].evidence).",
        ),
        ("table", variants_table(claims), ""),
        ("h2", "Settings"),
        ("table", settings_table(results), ""),
        (
            "p",
            "The lr each optimizer chose on each task (on the selection seeds; † at the edge of those tried):",
        ),
        ("table", lr_table(results), "summary"),
        ("h2", "Stability and lr sensitivity"),
        (
            "p",
            "Report runs at the chosen lr and 10x either side, over all tasks. Diverged: the final metric is no "
            "better than the untrained model's. A loss spike: the smoothed curve gives back more than half the "
            "progress made so far (not counted on the non-stationary task, whose target jumps by design). Regret "
            "of a 10x wrong lr: the worse of lr / 10 and 10x lr, as a fraction of the task's attainable improvement.",
        ),
        ("table", stability_table(results), ""),
    ]
    for title, path, caption in figures:
        blocks += [("h2", title), ("figure", title, path, caption)]
    blocks.append(("h2", "Tasks"))
    for name, task in results["tasks"].items():
        blocks += [
            ("h3", f"{name}: {task['title']}"),
            ("p", task["description"]),
            ("table", task_table(task), ""),
        ]
    blocks += [("h2", "Run details"), ("table", [["item", "value"], *_details(results)[1:]], "")]
    return blocks


def _to_markdown(blocks: list[tuple]) -> str:
    md = ["# RMSProp's claims, tested", ""]
    for block in blocks:
        kind = block[0]
        if kind == "h2":
            md += [f"## {block[1]}", ""]
        elif kind == "h3":
            md += [f"### {block[1]}", ""]
        elif kind == "p":
            md += [block[1], ""]
        elif kind == "toc":
            md += [f"- [{title}](#{_slug(title)})" for title in block[1]] + [""]
        elif kind == "table":
            md += [_md(block[1]), ""]
        elif kind == "ul":
            md += [f"- {item}" for item in block[1]] + [""]
        elif kind == "figure":
            _, title, path, caption = block
            md += [f"![{title}]({path.name})", "", f"*{caption}*", ""]
    return "\n".join(md)


CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1320px;margin:2em auto;padding:0 1em;line-height:1.45;"
    "color:#222}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
    "font-size:14px;vertical-align:top;text-align:left}th{background:#f3f3f3}img{width:100%;height:auto}"
    "figure{margin:1em 0}figcaption{color:#444;font-size:15px;margin-top:.3em}h3{margin-top:1.4em}"
    "table.summary td:not(:first-child){white-space:nowrap}nav ul{columns:2}code{font-size:13px}"
    "li{font-size:14px;margin:.2em 0}"
)


def _to_html(blocks: list[tuple]) -> str:
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>RMSProp's claims, tested</title>"
        f"<style>{CSS}</style></head><body><h1>RMSProp's claims, tested</h1>"
    ]
    for block in blocks:
        kind = block[0]
        if kind == "h2":
            parts.append(f"<h2 id='{_slug(block[1])}'>{html.escape(block[1])}</h2>")
        elif kind == "h3":
            parts.append(f"<h3>{html.escape(block[1])}</h3>")
        elif kind == "p":
            parts.append(f"<p>{_inline(block[1])}</p>")
        elif kind == "toc":
            items = "".join(f"<li><a href='#{_slug(t)}'>{html.escape(t)}</a></li>" for t in block[1])
            parts.append(f"<nav><ul>{items}</ul></nav>")
        elif kind == "table":
            parts.append(_html_table(block[1], block[2]))
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in block[1]) + "</ul>")
        elif kind == "figure":
            _, title, path, caption = block
            data = base64.b64encode(path.read_bytes()).decode()
            parts.append(
                f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{_inline(caption)}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "".join(parts)


def render(results: dict, out: Path) -> list[Path]:
    """Write the PNGs, report.md, report.html and results.json into ``out``; return the paths."""
    from .runner import to_json

    figures = _figures(results, out)
    blocks = _blocks(results, figures)
    (out / "report.md").write_text(_to_markdown(blocks))
    (out / "report.html").write_text(_to_html(blocks))
    (out / "results.json").write_text(to_json(results))
    return [out / "report.html", out / "report.md", out / "results.json", *(p for _, p, _ in figures)]


def write(results: dict, out: Path) -> list[Path]:
    """Render into a temporary folder inside ``out``, then move each file into place; on any
    failure or interruption the temporary folder is removed and ``out`` keeps what it had."""
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-report-", dir=out))
    try:
        written = render(results, staging)
        final = []
        for path in written:
            target = out / path.name
            os.replace(path, target)
            final.append(target)
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)
