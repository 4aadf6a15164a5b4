"""The charts of the analysis: ``analyze``'s entropy histogram (log x axis) and forking-token frequency chart,
``overlap``'s entropy change by bucket, and ``compare``'s accuracy curves and entropy percentiles per arm.

Both draw on a bare ``matplotlib.figure.Figure`` with the Agg canvas, so nothing touches pyplot's global state (safe
in notebooks and without a display).
"""

from __future__ import annotations

import math
import warnings

from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "plot_accuracy_curves",
    "plot_entropy_change",
    "plot_entropy_histogram",
    "plot_entropy_percentiles",
    "plot_forking_tokens",
    "save_figure",
]

DPI = 120


def save_figure(figure: Figure, path: str, tight: bool = True) -> str:
    """Returns ``path`` after saving ``figure`` there as a PNG (missing-glyph warnings silenced)."""
    FigureCanvasAgg(figure)
    if tight:
        figure.tight_layout()
    with warnings.catch_warnings():
        # Byte-level tokens can be characters no installed font has; a missing glyph is drawn as a box, not an error.
        warnings.simplefilter("ignore", UserWarning)
        figure.savefig(path, dpi=DPI)
    return path


def plot_entropy_histogram(
    histogram: dict, path: str, threshold: float | None = None, rho: float | None = None, low: float | None = None
) -> str:
    """Returns ``path`` after drawing the histogram of ``stats.log_histogram`` there as a PNG (log x axis).

    Bars are the share of tokens per bin; dashed lines mark the top-rho threshold and the ``low`` cut-off.
    """
    edges, counts = histogram["edges"], histogram["counts"]
    total = max(sum(counts), 1)
    figure = Figure(figsize=(7, 4))
    axes = figure.add_subplot()
    if counts:
        widths = [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
        axes.bar(edges[:-1], [100 * c / total for c in counts], width=widths, align="edge", color="#4c72b0")
    axes.set_xscale("log")
    if edges and edges[-1] < 10 * edges[0]:
        # Within one decade the log ticks carry no label or all read alike ("7e-02"): place plain ticks with as many
        # digits as the spread needs.
        digits = max(2, math.ceil(-math.log10((edges[-1] - edges[0]) / edges[-1])) + 2)
        axes.xaxis.set_major_locator(ticker.MaxNLocator(6))
        axes.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:.{digits}g}"))
        axes.xaxis.set_minor_formatter(ticker.NullFormatter())
    if threshold is not None and threshold > 0:
        axes.axvline(threshold, color="#c44e52", linestyle="--", label=f"top-{rho:g} threshold = {threshold:.4g}")
    if low is not None and edges and low >= edges[0]:
        axes.axvline(low, color="gray", linestyle=":", label=f"H = {low:g}")
    axes.set_xlabel("token entropy H (nats, log scale)")
    axes.set_ylabel("share of tokens (%)")
    axes.set_title(f"Token entropy of {sum(counts):,} completion tokens")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="best")
    return save_figure(figure, path)


def plot_forking_tokens(table: list[dict], path: str, rho: float | None = None) -> str:
    """Returns ``path`` after drawing the forking-token table (``stats.forking_token_table`` rows with a ``token``
    field) as a horizontal bar chart of counts, each bar labelled with its mean entropy."""
    figure = Figure(figsize=(7, max(2.5, 0.32 * len(table) + 1.2)))
    axes = figure.add_subplot()
    # A "$" pair would start matplotlib's mathtext; escaped, it prints as itself.
    labels = [repr(row.get("token", row["token_id"])).replace("$", r"\$") for row in table][::-1]
    counts = [row["count"] for row in table][::-1]
    bars = axes.barh(range(len(table)), counts, color="#dd8452")
    for bar, row in zip(bars, table[::-1], strict=True):
        axes.annotate(
            f" H={row['mean_entropy']:.2f}, {100 * row['share']:.1f}%",
            (bar.get_width(), bar.get_y() + bar.get_height() / 2),
            va="center",
            fontsize=8,
        )
    axes.set_yticks(range(len(table)), labels, fontfamily="monospace", fontsize=8)
    axes.set_xlabel("times selected as a forking token")
    axes.set_xlim(0, max(counts, default=1) * 1.35)
    scope = f"top-{rho:g} " if rho is not None else ""
    axes.set_title(f"Most frequent {scope}forking tokens")
    return save_figure(figure, path)


def plot_entropy_change(rows: list[dict], path: str) -> str:
    """Returns ``path`` after drawing ``stats.entropy_change_by_bucket`` rows there as a PNG: for each bucket of model
    A's entropy, a bar of the mean change B - A and a bar of the mean |B - A| (nats); an empty bucket has no bars and
    its label says so."""
    figure = Figure(figsize=(8, 4))
    axes = figure.add_subplot()
    present = [i for i, row in enumerate(rows) if row["num_tokens"]]
    width = 0.4
    axes.bar(
        [i - width / 2 for i in present],
        [rows[i]["mean_change"] for i in present],
        width,
        color="#4c72b0",
        label="mean change (B - A)",
    )
    axes.bar(
        [i + width / 2 for i in present],
        [rows[i]["mean_abs_change"] for i in present],
        width,
        color="#dd8452",
        label="mean |B - A|",
    )
    axes.axhline(0.0, color="gray", linewidth=0.8)
    counts = [f"n={row['num_tokens']:,}" if row["num_tokens"] else "empty" for row in rows]
    labels = [f"{row['bucket']}\n{count}" for row, count in zip(rows, counts, strict=True)]
    axes.set_xticks(range(len(rows)), labels, fontsize=7)
    axes.set_xlabel("bucket of model A's entropy (percentile range; n = tokens)")
    axes.set_ylabel("entropy change (nats)")
    axes.set_title("Entropy change from model A to model B by model A's entropy")
    if present:
        axes.legend(loc="best")
    return save_figure(figure, path)


def _by_arm(runs) -> dict:
    """Returns ``{arm: [runs]}`` with "all" first, then by selection and rho."""
    arms: dict = {}
    for run in runs:
        arms.setdefault(run.arm, []).append(run)
    return dict(sorted(arms.items(), key=lambda item: (item[0].selection != "all", item[0].selection, item[0].rho)))


def _mean_band(curves: list[tuple[list[int], list[float]]]):
    """Returns ``(steps, mean, se)`` at the steps every curve shares (se 0 with one curve)."""
    shared = sorted(set.intersection(*(set(steps) for steps, _ in curves)))
    means, ses = [], []
    for step in shared:
        values = [dict(zip(steps, ys, strict=True))[step] for steps, ys in curves]
        mean = sum(values) / len(values)
        spread = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
        means.append(mean)
        ses.append(math.sqrt(spread / len(values)))
    return shared, means, ses


def plot_accuracy_curves(runs, metric: str, path: str) -> str:
    """Returns ``path`` after drawing, per arm of ``runs`` (``trl_forking.analysis.study.Run``), ``metric`` against the
    training step: the mean over seeds as a line, mean +- SE as a band, at the steps all the arm's runs evaluated."""
    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    for arm, members in _by_arm(runs).items():
        steps, mean, se = _mean_band([run.curve(metric) for run in members])
        line = axes.plot(
            steps, [100 * m for m in mean], marker="o", markersize=3, label=f"{arm.label} (n={len(members)})"
        )
        low = [100 * (m - s) for m, s in zip(mean, se, strict=True)]
        high = [100 * (m + s) for m, s in zip(mean, se, strict=True)]
        axes.fill_between(steps, low, high, color=line[0].get_color(), alpha=0.2, linewidth=0)
    axes.set_xlabel("training step")
    axes.set_ylabel(f"{metric} (%)")
    axes.set_title(f"Held-out {metric} per arm (mean +- SE over seeds)")
    axes.legend(loc="best", fontsize=8)
    return save_figure(figure, path)


def plot_entropy_percentiles(runs, path: str, percentiles=(50, 80, 95)) -> str:
    """Returns ``path`` after drawing, for each of ``percentiles``, the logged ``forking/entropy_p{p}`` against the
    training step per arm (mean over seeds at the steps every run logged)."""
    figure = Figure(figsize=(4 * len(percentiles), 3.8))
    for index, p in enumerate(percentiles):
        axes = figure.add_subplot(1, len(percentiles), index + 1)
        name = f"forking/entropy_p{p}"
        for arm, members in _by_arm(runs).items():
            curves = []
            for run in members:
                logged = [(entry["step"], entry[name]) for entry in run.log_history if name in entry]
                if logged:
                    curves.append(([s for s, _ in logged], [v for _, v in logged]))
            if curves:
                steps, mean, _ = _mean_band(curves)
                axes.plot(steps, mean, label=arm.label)
        axes.set_yscale("log")
        axes.set_xlabel("training step")
        axes.set_title(f"entropy p{p} (nats)")
        if index == 0:
            axes.legend(loc="best", fontsize=7)
    return save_figure(figure, path)
