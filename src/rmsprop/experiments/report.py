"""Plots, report.md and a self-contained report.html from the results of `rmsprop compare`."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from .tasks import TASKS

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


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("the report needs matplotlib: pip install 'rmsprop[report]'") from exc
    return plt


def _grid(n: int):
    plt = _plt()
    cols = 3
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat)


def plot_curves(results: dict, path: Path) -> Path:
    """Loss curves at each optimizer's best lr, mean over seeds with a +-1 std band."""
    tasks = results["tasks"]
    plt, fig, axes = _grid(len(tasks))
    for ax, (name, task) in zip(axes, tasks.items(), strict=False):
        for opt, e in task["optimizers"].items():
            c = e["curve"]
            if not c["mean"]:
                continue
            lo = [m - s for m, s in zip(c["mean"], c["std"], strict=True)]
            hi = [m + s for m, s in zip(c["mean"], c["std"], strict=True)]
            color = PALETTE.get(opt)
            ax.plot(c["steps"], c["mean"], label=f"{opt} (lr {e['best_lr']:g})", color=color, lw=1.3)
            ax.fill_between(c["steps"], lo, hi, color=color, alpha=0.15, lw=0)
        if TASKS[name].log_scale:
            ax.set_yscale("log")
        if "baseline" in next(iter(task["optimizers"].values())):
            ax.axhline(1 / 6, color="k", ls=":", lw=1, label="predict the mean (1/6)")
        ax.set_title(TASKS[name].title, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=6)
    fig.suptitle("Loss at each optimizer's best learning rate (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_sensitivity(results: dict, path: Path) -> Path:
    """Final metric against lr for every optimizer: how much the lr matters."""
    tasks = results["tasks"]
    plt, fig, axes = _grid(len(tasks))
    for ax, (name, task) in zip(axes, tasks.items(), strict=False):
        for opt, e in task["optimizers"].items():
            lrs = [float(k) for k in e["sweep"]]
            ys = [v["mean"] if math.isfinite(v["mean"]) else float("nan") for v in e["sweep"].values()]
            ax.plot(lrs, ys, marker="o", ms=3, label=opt, color=PALETTE.get(opt), lw=1.2)
            diverged = [
                lr for lr, v in zip(lrs, e["sweep"].values(), strict=True) if not math.isfinite(v["mean"])
            ]
            if diverged:
                top = max((y for y in ys if y == y), default=1.0)
                ax.scatter(diverged, [top] * len(diverged), marker="x", color=PALETTE.get(opt), s=20)
        ax.set_xscale("log")
        if TASKS[name].log_scale:
            ax.set_yscale("log")
        ax.set_title(f"{TASKS[name].title}\n(x: diverged)", fontsize=9)
        ax.set_xlabel("learning rate")
        ax.set_ylabel(TASKS[name].metric)
        ax.legend(fontsize=6)
    fig.suptitle("Learning-rate sensitivity (mean over seeds; lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_effective_lr(results: dict, path: Path) -> Path | None:
    task = results["tasks"].get("long-horizon")
    if task is None:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for opt, e in task["optimizers"].items():
        eff = e.get("effective_lr")
        if not eff or not eff["median"]:
            continue
        color = PALETTE.get(opt)
        ax.plot(eff["steps"], eff["median"], label=f"{opt} (lr {e['best_lr']:g})", color=color)
        ax.fill_between(eff["steps"], eff["p10"], eff["p90"], color=color, alpha=0.12, lw=0)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("effective lr per parameter (median; band: p10-p90)")
    ax.set_title("Long horizon: Adagrad's step size can only shrink; RMSProp's follows the gradients")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
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
    fig, ax = plt.subplots(figsize=(7.5, 6))
    ax.contour(x, y, np.log10(f + 1e-3), levels=25, cmap="Greys", linewidths=0.6)
    for opt, e in task["optimizers"].items():
        p = np.array(e.get("path", []))
        if p.size and np.all(np.isfinite(p)):
            p = p[(np.abs(p) < 10).all(1)]
            ax.plot(p[:, 0], p[:, 1], label=f"{opt} (lr {e['best_lr']:g})", color=PALETTE.get(opt), lw=1.2)
    ax.plot([1], [1], "k*", ms=12, label="minimum (1, 1)")
    ax.set_xlim(-2, 2)
    ax.set_ylim(-1, 3)
    ax.set_title("Rosenbrock: trajectories at each optimizer's best lr (seed 0)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(x: float) -> str:
    return "diverged" if not math.isfinite(x) else f"{x:.4g}"


def task_table(name: str, task: dict) -> list[list[str]]:
    rows = [["optimizer", "best lr", f"{TASKS[name].metric} (mean ± std)", "good lrs", "diverged lrs"]]
    for opt, e in sorted(task["optimizers"].items(), key=lambda kv: kv[1]["final_mean"]):
        rows.append(
            [
                opt,
                f"{e['best_lr']:g}",
                f"{_fmt(e['final_mean'])} ± {e['final_std']:.2g}",
                f"{round(100 * e['good_lr_fraction'])}%",
                f"{round(100 * e['diverged_fraction'])}%",
            ]
        )
    return rows


def claims_table(claims: list[dict]) -> list[list[str]]:
    return [["claim", "verdict", "evidence"]] + [[c["claim"], c["verdict"], c["evidence"]] for c in claims]


def _md(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out)


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write(results: dict, out: Path) -> list[Path]:
    """Write the PNGs, report.md and report.html into ``out``; return the paths."""
    out.mkdir(parents=True, exist_ok=True)
    images = [
        ("Loss curves", plot_curves(results, out / "curves.png")),
        ("Learning-rate sensitivity", plot_sensitivity(results, out / "lr_sensitivity.png")),
        ("Effective learning rate", plot_effective_lr(results, out / "effective_lr.png")),
        ("Rosenbrock trajectories", plot_rosenbrock(results, out / "rosenbrock.png")),
    ]
    images = [(title, p) for title, p in images if p is not None]
    setup = results["setup"]
    intro = (
        f"Tasks: {', '.join(results['tasks'])}. Optimizers: {', '.join(setup['optimizers'])}. "
        f"Learning rates: {', '.join(f'{lr:g}' for lr in setup['lrs'])}; seeds: {setup['seeds']} "
        f"(from {setup['seed']}); {'quick' if setup['quick'] else 'full'} sizes. Every optimizer is judged at its "
        "best lr (lowest mean final metric over seeds). A 'good' lr gets within 10% of that optimizer's best "
        "improvement over the untrained model. 'RMSProp' in the claims is plain RMSProp: the better of the torch "
        "and seed-document forms on each task. Verdicts come from the rules listed under each claim, applied to "
        "the numbers in results.json."
    )
    md = [
        "# RMSProp's claims, tested",
        "",
        intro,
        "",
        "## Claims",
        "",
        _md(claims_table(results["claims"])),
        "",
    ]
    for c in results["claims"]:
        md += [f"- **{c['claim']}** — rule: {c['rule']}"]
    if results.get("claims_skipped"):
        md += [
            "",
            f"Not judged (a needed task or optimizer was not run): {', '.join(results['claims_skipped'])}",
        ]
    md += [""]
    for title, p in images:
        md += [f"## {title}", "", f"![{title}]({p.name})", ""]
    for name, task in results["tasks"].items():
        md += [
            f"## {TASKS[name].title}",
            "",
            (TASKS[name].run.__doc__ or "").strip().replace("\n    ", " "),
            "",
        ]
        md += [_md(task_table(name, task)), ""]
    (out / "report.md").write_text("\n".join(md))

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>RMSProp's claims, tested</title><style>",
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.45}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;font-size:14px;vertical-align:top}th{background:#f3f3f3}img{max-width:100%}"
        ".rule{color:#555;font-size:13px}",
        "</style></head><body><h1>RMSProp's claims, tested</h1>",
        f"<p>{html.escape(intro)}</p><h2>Claims</h2>",
        _html_table(claims_table(results["claims"])),
        "<ul>"
        + "".join(
            f"<li class='rule'><b>{html.escape(c['claim'])}</b>: {html.escape(c['rule'])}</li>"
            for c in results["claims"]
        )
        + "</ul>",
    ]
    for title, p in images:
        data = base64.b64encode(p.read_bytes()).decode()
        parts.append(
            f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>"
        )
    for name, task in results["tasks"].items():
        doc = (TASKS[name].run.__doc__ or "").strip()
        parts.append(f"<h2>{html.escape(TASKS[name].title)}</h2><p>{html.escape(' '.join(doc.split()))}</p>")
        parts.append(_html_table(task_table(name, task)))
    parts.append("</body></html>")
    (out / "report.html").write_text("".join(parts))
    return [out / "report.md", out / "report.html", *(p for _, p in images)]
