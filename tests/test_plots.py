"""plots: plot_history smooths only series logged at every step, never a sparse evaluation; plot_before_after keeps
higher-is-better and lower-is-better metrics in separate, headed groups and draws the spread of seeds."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from rlmt_edu.plots import plot_before_after, plot_history
from rlmt_edu.utils import History


def _history():
    # a training loss logged at every step 0..39 and a held-out loss at step -1 and every 10 steps (as
    # train_critic logs them): 1.352 at the start, then ~0.07
    rows = [{"step": -1, "heldout": 1.352}]
    for step in range(40):
        row = {"step": step, "train": 1.0 / (step + 1)}
        if (step + 1) % 10 == 0:
            row["heldout"] = 0.07 - 0.001 * step / 10
        rows.append(row)
    return History(rows)


def _lines_at(ax, steps):
    return [np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()
            if list(line.get_xdata()) == list(steps)]


def test_plot_history_never_smooths_a_sparse_evaluation_series():
    history = _history()
    ax = plot_history(history, ["train", "heldout"], smooth=5)
    steps, values = history.series("heldout")
    drawn = _lines_at(ax, steps)
    # one line, the raw values: no running mean mixing 1.352 (step -1) with 0.07 (step 9) into ~0.71
    assert len(drawn) == 1, f"expected one raw line for the sparse series, got {len(drawn)}"
    np.testing.assert_allclose(drawn[0], values)


def test_plot_history_still_smooths_a_series_logged_at_every_step():
    history = _history()
    ax = plot_history(history, ["train", "heldout"], smooth=5)
    steps, values = history.series("train")
    drawn = _lines_at(ax, steps)
    assert len(drawn) == 2  # the faded raw values and the running mean
    assert any(np.allclose(y, values) for y in drawn)
    smoothed = next(y for y in drawn if not np.allclose(y, values))
    assert smoothed[10] == pytest.approx(np.mean(values[6:11]))


def test_plot_history_rejects_a_bad_smooth():
    with pytest.raises(ValueError, match="smooth"):
        plot_history(_history(), ["train"], smooth=0)


# plots.plot_before_after: higher-is-better and lower-is-better metrics in separate, headed groups


def _bar_heights(ax):
    return [round(patch.get_height(), 6) for patch in ax.patches]


def test_plot_before_after_puts_lower_is_better_keys_in_their_own_headed_group():
    before = {"eval/a": 0.1, "eval/over_refusal": 0.9, "eval/b": 0.2}
    after = {"eval/a": 0.6, "eval/over_refusal": 0.3, "eval/b": 0.7}
    ax = plot_before_after(before, after, list(before), lower_is_better=["eval/over_refusal"])
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["a", "b", "over_refusal"]  # the lower-is-better key moved to the right
    assert _bar_heights(ax) == [0.1, 0.2, 0.9, 0.6, 0.7, 0.3]  # before bars, then after bars, in that order
    texts = [t.get_text() for t in ax.texts]
    assert "higher is better ↑" in texts and "lower is better ↓" in texts
    assert [line.get_xdata()[0] for line in ax.get_lines()] == [1.5]  # the dashed line between the groups


def test_plot_before_after_without_lower_is_better_keeps_one_group_and_the_order():
    ax = plot_before_after({"x": 0.5, "y": 0.25}, {"x": 1.0, "y": 0.75}, ["y", "x"])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["y", "x"]
    assert _bar_heights(ax) == [0.25, 0.5, 0.75, 1.0]
    assert not any("better" in t.get_text() for t in ax.texts) and len(ax.get_lines()) == 0  # no headings


def test_plot_before_after_draws_the_mean_and_the_min_max_of_seeds():
    ax = plot_before_after({"x": [0.2, 0.4, 0.9]}, {"x": 0.5}, ["x"])
    assert _bar_heights(ax) == [0.5, 0.5]  # the mean of the three seeds, and the single value
    (segments,) = [c.get_segments() for c in ax.collections]  # one error bar: the seeds' spread
    np.testing.assert_allclose(np.asarray(segments)[0][:, 1], [0.2, 0.9])


def test_plot_before_after_rejects_bad_inputs():
    with pytest.raises(ValueError, match="keys"):
        plot_before_after({"x": 1.0}, {}, ["x"])
    with pytest.raises(ValueError, match="lower_is_better"):
        plot_before_after({"x": 1.0}, {"x": 1.0}, ["x"], lower_is_better=["y"])
    with pytest.raises(ValueError, match="lower_is_better"):
        plot_before_after({"x": 1.0}, {"x": 1.0}, ["x"], lower_is_better="x")
    with pytest.raises(ValueError, match="x"):
        plot_before_after({"x": []}, {"x": 1.0}, ["x"])


def test_plot_before_after_accepts_seeds_that_all_agree():
    ax = plot_before_after({"x": [0.7, 0.7, 0.7]}, {"x": [0.1, 0.2, 0.3]}, ["x"])  # mean of 0.7s != 0.7 in floats
    assert len(ax.collections) == 2
