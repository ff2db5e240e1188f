"""The benchmark's pictures, one PNG per scenario, drawn with matplotlib's Agg backend (no
display needed). Plain data in, a file out: bench/run.py turns its results into series.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: never look for a display

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

# A point: x, y, and whether it passed (drawn filled) or not (hollow).
Point = tuple[float, float, bool]
Series = dict[str, list[Point]]  # one line per server, in the report's order

# One colour per server in every picture, so they read alike.
COLOURS = {
    "chatroom": "tab:blue",
    "asyncio": "tab:orange",
    "threads": "tab:green",
    "redis": "tab:red",
}


def plain_number(value: float, _position: object = None) -> str:
    """A log axis' tick as people write numbers (2,000, not 2e3 in superscript)."""
    return f"{value:,.0f}" if value >= 1 else f"{value:g}"


def some_plain_numbers(value: float, _position: object = None) -> str:
    """The minor ticks worth a label on a log axis: the 2s and 5s of each decade."""
    leading = f"{value:e}"[0]
    return plain_number(value) if leading in "25" else ""


def label_plainly(axes: Axes, x: bool, y: bool) -> None:
    for axis, wanted in ((axes.xaxis, x), (axes.yaxis, y)):
        if wanted:
            axis.set_major_formatter(FuncFormatter(plain_number))
            axis.set_minor_formatter(FuncFormatter(some_plain_numbers))


def plot_series(axes: Axes, series: Series) -> None:
    for name, points in series.items():
        if not points:
            continue
        colour = COLOURS.get(name, "tab:gray")
        xs, ys = [x for x, _, _ in points], [y for _, y, _ in points]
        axes.plot(xs, ys, color=colour, label=name)
        for x, y, passed in points:
            face = colour if passed else "white"
            axes.plot([x], [y], "o", color=colour, markerfacecolor=face)


def latency_against_rate(path: Path, title: str, series: Series, limit_ms: float, dpi: int) -> None:
    """p99 latency against offered rate, log-log; hollow points failed the pass rule."""
    figure = Figure(figsize=(8, 5), layout="constrained")
    axes = figure.subplots()
    plot_series(axes, series)
    axes.axhline(limit_ms, color="black", linestyle="--", linewidth=1)
    axes.annotate(
        f"pass: p99 ≤ {limit_ms:g} ms",
        (0.01, limit_ms),
        xycoords=("axes fraction", "data"),
        xytext=(0, 3),
        textcoords="offset points",
        fontsize=8,
    )
    axes.set_xscale("log")
    axes.set_yscale("log")
    label_plainly(axes, x=True, y=True)
    axes.set_xlabel("offered rate (messages/s, all senders together)")
    axes.set_ylabel("p99 latency (ms)")
    axes.set_title(title + "\n(hollow: the rate failed; the sweep stops there)", fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=dpi)


def scale(path: Path, title: str, join: Series, memory: Series, dpi: int) -> None:
    """Join time and memory per member against the room's size."""
    figure = Figure(figsize=(10, 4.5), layout="constrained")
    left, right = figure.subplots(1, 2)
    plot_series(left, join)
    left.set_ylabel("all joined in (s)")
    left.set_title("join time", fontsize=10)
    plot_series(right, memory)
    right.set_ylabel("server memory per member (KiB)")
    right.set_title("memory per held member", fontsize=10)
    for axes in (left, right):
        axes.set_xlabel("members")
        axes.set_ylim(bottom=0)
        axes.grid(True, alpha=0.3)
        axes.legend()
    figure.suptitle(title + "\n(hollow: not every member joined)", fontsize=10)
    figure.savefig(path, dpi=dpi)


def overload(
    path: Path, title: str, delivered_pct: dict[str, float], growth_mib: dict[str, float], dpi: int
) -> None:
    """Per server: the share delivered at twice its best rate, and how much memory it took."""
    figure = Figure(figsize=(10, 4), layout="constrained")
    left, right = figure.subplots(1, 2)
    for axes, values, label in (
        (left, delivered_pct, "delivered at twice the best rate (%)"),
        (right, growth_mib, "server memory growth (MiB, log scale)"),
    ):
        names = list(values)
        colours = [COLOURS.get(name, "tab:gray") for name in names]
        axes.bar(names, [values[name] for name in names], color=colours)
        axes.set_ylabel(label)
        axes.grid(True, axis="y", alpha=0.3)
    left.set_ylim(0, 100)
    right.set_yscale("log")
    label_plainly(right, x=False, y=True)
    figure.suptitle(title, fontsize=10)
    figure.savefig(path, dpi=dpi)
