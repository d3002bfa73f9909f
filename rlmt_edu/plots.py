"""Plots that read a History (or plain metric dicts) by key. Every chapter ends its experiments here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from rlmt_edu.utils import History


def _smooth(values: Sequence[float], window: int) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    head = np.array([values[: i + 1].mean() for i in range(window - 1)])
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])


def plot_history(
    history: History,
    keys: Sequence[str],
    *,
    ax=None,
    title: str | None = None,
    ylabel: str | None = None,
    smooth: int = 1,
    labels: Sequence[str] | None = None,
):
    """One line per key of ``history`` against the step. Returns the Axes.

    ``smooth`` > 1 adds a running mean over that many points (the raw values stay visible, faded), but only to
    a series logged at every step, i.e. whose consecutive points are exactly one step apart (a training loss,
    the sampled reward). A running mean over points one step apart averages neighbouring batches; over a sparse
    series (an evaluation every k steps: ``eval/...``, ``critic/heldout_loss``, ``critic/explained_variance``,
    or anything else logged with gaps) it would average measurements made far apart in training, so such a
    series is always drawn raw, with markers, whatever ``smooth`` says.
    """
    if isinstance(keys, str):
        keys = [keys]
    if labels is not None and len(labels) != len(keys):
        raise ValueError(f"labels: expected {len(keys)} labels, one per key, got {len(labels)}")
    if not isinstance(smooth, int) or isinstance(smooth, bool) or smooth < 1:
        raise ValueError(f"smooth: expected an int >= 1 (points in the running mean), got {smooth!r}")
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    for i, key in enumerate(keys):
        steps, values = history.series(key)
        label = labels[i] if labels is not None else key
        every_step = all(b - a == 1 for a, b in zip(steps, steps[1:]))  # False for a sparse evaluation series
        if smooth > 1 and len(values) >= smooth and every_step:
            line = ax.plot(steps, values, alpha=0.25, linewidth=1)[0]
            ax.plot(steps, _smooth(values, smooth), color=line.get_color(), label=label)
        else:
            ax.plot(steps, values, marker="o" if len(values) < 30 else None, markersize=3, label=label)
    ax.set_xlabel("step")
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    return ax


def plot_seeds(
    runs: Mapping[str, Sequence[History]],
    key: str,
    *,
    ax=None,
    title: str | None = None,
    ylabel: str | None = None,
    smooth: int = 1,
):
    """Compare configurations run over several seeds: for each label of ``runs`` (label -> one History per
    seed), the mean of ``key`` across seeds as a line and the min-max range of the seeds as a band.

    Every seed must log ``key`` at the same steps. ``smooth`` > 1 applies a running mean to each seed first;
    leave it at 1 for a sparse evaluation series, whose neighbouring points are far apart in training.
    Returns the Axes.
    """
    if not isinstance(runs, Mapping) or not runs:
        raise ValueError(f"runs: expected a non-empty dict label -> list of Histories, got {runs!r:.60}")
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    for label, histories in runs.items():
        if len(histories) == 0:
            raise ValueError(f"runs: expected at least one History for {label!r}, got none")
        series = [history.series(key) for history in histories]  # raises, naming the key, if it was never logged
        steps = series[0][0]
        if any(s != steps for s, _ in series):
            raise ValueError(f"runs: expected every seed of {label!r} to log {key!r} at the same steps")
        values = np.array([_smooth(v, smooth) for _, v in series])  # (seeds, steps)
        line = ax.plot(steps, values.mean(axis=0), marker="o" if len(steps) < 30 else None, markersize=3,
                       label=f"{label} (mean of {len(histories)})")[0]
        ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.2,
                        linewidth=0)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel or key)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    return ax


def panel_axes(axes, count: int, *, figsize: tuple[float, float] = (18, 3.8)) -> list:
    """``axes`` as a flat list of ``count`` Axes, or a new 1 × ``count`` figure's when ``axes`` is None; a chapter's
    multi-panel figure draws into either."""
    if axes is None:
        _, axes = plt.subplots(1, count, figsize=figsize, layout="constrained")
    axes = list(np.asarray(axes).flatten())
    if len(axes) != count:
        raise ValueError(f"axes: expected {count} Axes, got {len(axes)}")
    return axes


def plot_before_after(
    before: Mapping[str, float | Sequence[float]],
    after: Mapping[str, float | Sequence[float]],
    keys: Sequence[str],
    *,
    labels: tuple[str, str] = ("before", "after"),
    ax=None,
    title: str | None = None,
    lower_is_better: Sequence[str] = (),
):
    """Side-by-side bars of the same metrics measured twice (e.g. a model before and after SFT). Returns the Axes.

    A value is one number, or a sequence of them (one per seed): the bar is then their mean and a black line
    spans their min–max. ``lower_is_better`` names the keys, among ``keys``, where a lower value is better
    (an over-refusal rate, a loss). When it names any, the bars come in two groups split by a dashed line,
    headed "higher is better ↑" and "lower is better ↓", so a tall bar never reads as good in one group and
    bad in the other.
    """
    missing = [k for k in keys if k not in before or k not in after]
    if missing:
        raise ValueError(f"keys: {missing} are not in both metric dicts")
    unknown = [k for k in lower_is_better if k not in keys]
    if isinstance(lower_is_better, str) or unknown:
        raise ValueError(f"lower_is_better: expected a sequence of keys among {list(keys)}, got {lower_is_better!r}")
    if len(labels) != 2:
        raise ValueError(f"labels: expected 2 labels (before, after), got {len(labels)}")

    def values(metrics, key) -> np.ndarray:
        value = np.atleast_1d(np.asarray(metrics[key], dtype=float))
        if value.ndim != 1 or value.size == 0:
            raise ValueError(f"{key}: expected a number or a non-empty sequence of numbers, got {metrics[key]!r}")
        return value

    higher = [k for k in keys if k not in lower_is_better]
    lower = [k for k in keys if k in lower_is_better]
    ordered = higher + lower
    if ax is None:
        _, ax = plt.subplots(figsize=(1.3 * len(keys) + 2, 3.5))
    x = np.arange(len(ordered))
    width = 0.38
    top = 0.0
    for offset, metrics, label in ((-width / 2, before, labels[0]), (width / 2, after, labels[1])):
        runs = [values(metrics, k) for k in ordered]
        means = np.array([r.mean() for r in runs])
        bars = ax.bar(x + offset, means, width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
        spread = [i for i, r in enumerate(runs) if r.size > 1]
        if spread:  # min–max over seeds (clipped at 0: the mean of equal floats may miss them by rounding)
            lows = np.array([runs[i].min() for i in spread])
            highs = np.array([runs[i].max() for i in spread])
            yerr = np.clip([means[spread] - lows, highs - means[spread]], 0, None)  # (2, n)
            ax.errorbar(x[spread] + offset, means[spread], yerr=yerr, fmt="none", ecolor="black", elinewidth=1,
                        capsize=3)
        top = max(top, max(r.max() for r in runs))
    ax.set_xticks(x, [k.split("/")[-1] for k in ordered], rotation=20, ha="right")
    ax.set_ylim(0, max(1.05, top * 1.15) * (1.12 if lower else 1.0))  # room for the group headings
    if lower:
        if higher:
            ax.axvline(len(higher) - 0.5, color="grey", linestyle="--", linewidth=1)
        heading = ax.get_xaxis_transform()  # x in data units, y as a fraction of the axes
        for group, first, text in ((higher, 0, "higher is better ↑"), (lower, len(higher), "lower is better ↓")):
            if group:
                ax.text(first + (len(group) - 1) / 2, 0.97, text, transform=heading, ha="center", va="top",
                        fontsize=9, color="dimgrey")
    if title:
        ax.set_title(title)
    ax.legend(frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.grid(axis="y", alpha=0.3)
    return ax


def save_figure(fig, path) -> None:
    """Save a figure atomically (temporary file in the same folder, then rename)."""
    import os
    import tempfile
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plot_token_strip(
    tokens: Sequence[str],
    values: Sequence[float],
    *,
    ax=None,
    title: str | None = None,
    cmap: str = "coolwarm",
    center: float | None = 0.0,
    fmt: str = "{:+.2f}",
    label: str | None = None,
):
    """Tokens in a row, each box coloured by its value (e.g. a mask, a per-token advantage A = R - V).

    ``center`` fixes the colour scale's middle (0 for advantages: blue below, red above); None spans min..max.
    """
    import matplotlib.colors as mcolors

    if len(tokens) != len(values):
        raise ValueError(f"values: expected one value per token ({len(tokens)}), got {len(values)}")
    values = np.asarray(values, dtype=float)
    if center is None:
        norm = mcolors.Normalize(vmin=values.min(), vmax=values.max() if values.max() > values.min() else values.min() + 1)
    else:
        span = max(abs(values - center).max(), 1e-9)
        norm = mcolors.TwoSlopeNorm(vcenter=center, vmin=center - span, vmax=center + span)
    colormap = plt.get_cmap(cmap)
    if ax is None:
        _, ax = plt.subplots(figsize=(max(4.0, 0.75 * len(tokens)), 1.3))
    for i, (token, value) in enumerate(zip(tokens, values)):
        ax.add_patch(plt.Rectangle((i, 0), 0.95, 1, color=colormap(norm(value))))
        ax.text(i + 0.475, 0.62, token, ha="center", va="center", fontsize=9)
        ax.text(i + 0.475, 0.25, fmt.format(value), ha="center", va="center", fontsize=7)
    ax.set_xlim(0, len(tokens))
    ax.set_ylim(0, 1)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=10)
    if label:
        ax.figure.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=colormap), ax=ax, label=label, fraction=0.02)
    return ax
