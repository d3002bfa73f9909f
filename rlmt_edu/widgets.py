"""Sliders that redraw a chapter's plot: an addition to the default plot each chapter shows without them.

A notebook first draws the default plot with a plain call, so the figure is there in a static HTML view, on
GitHub and under nbval; then ``slider_plot`` offers the same plot with sliders, for a reader running the
notebook in Jupyter. Without ``ipywidgets`` installed it says so and returns None.
"""

from __future__ import annotations

from collections.abc import Callable


def slider_plot(draw: Callable[..., object], **sliders: tuple[float, float, float, float]):
    """Sliders that call ``draw(**values)`` and show its figure, one per keyword.

    Each keyword maps a parameter of ``draw`` to ``(low, high, step, start)``. ``draw`` makes its own figure
    (e.g. ``plot_kl_fits``). Returns the ``ipywidgets`` widget, or None when ipywidgets is not installed.
    """
    for name, spec in sliders.items():
        if not (isinstance(spec, tuple) and len(spec) == 4 and spec[0] <= spec[3] <= spec[1] and spec[2] > 0):
            raise ValueError(f"{name}: expected (low, high, step, start) with low <= start <= high and step > 0, "
                             f"got {spec!r}")
    try:
        import ipywidgets
    except ImportError:
        print("(install ipywidgets, e.g. pip install -e '.[notebooks]', to get sliders for this plot)")
        return None
    import matplotlib.pyplot as plt

    def redraw(**values):
        draw(**values)
        plt.show()

    controls = {
        name: ipywidgets.FloatSlider(min=low, max=high, step=step, value=start, description=name,
                                     continuous_update=False)
        for name, (low, high, step, start) in sliders.items()
    }
    return ipywidgets.interactive(redraw, **controls)
