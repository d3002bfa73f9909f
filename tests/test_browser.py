"""The widgets in a real browser, and the static book's figures.

JupyterLab is served on 127.0.0.1 with its own token and temporary settings; a headless Chromium opens each
chapter that has a slider (found by looking for ``slider_plot(`` in its code), runs the cells up to the
slider's, drags the slider and checks that the figure changes and that the browser console reported no error.
Then it opens a static book written by ``rlmt-edu book`` and checks that every figure on every page loads.

Chromium is Debian's ``chromium`` package. ``.ci/run`` installs it and sets ``RLMT_EDU_REQUIRE_BROWSER=1``, so in
CI a missing browser fails this test instead of skipping it.
"""

import json
import os
import time

import nbformat
import pytest

from browser import Browser, JupyterLab, find_chromium
from rlmt_edu import book
from rlmt_edu.paths import REPO

CHROMIUM = find_chromium()
if CHROMIUM is None:
    if os.environ.get("RLMT_EDU_REQUIRE_BROWSER") == "1":
        raise RuntimeError("RLMT_EDU_REQUIRE_BROWSER=1 but no chromium found: apt-get install chromium")
    pytest.skip("no chromium here (apt-get install chromium)", allow_module_level=True)

pytestmark = pytest.mark.slow


def widget_chapters() -> list[tuple[str, int]]:
    """(chapter name, index of its first cell that calls slider_plot) for every chapter with a slider."""
    found = []
    for chapter in book.list_chapters():
        notebook = nbformat.read(chapter.path, as_version=4)
        for index, cell in enumerate(notebook.cells):
            if cell.cell_type == "code" and "slider_plot(" in cell.source and "import" not in cell.source:
                found.append((chapter.name, index))
                break
    return found


WIDGETS = widget_chapters()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium = Browser(CHROMIUM, tmp_path_factory.mktemp("chromium-profile"))
    yield chromium
    chromium.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    server = JupyterLab(REPO, tmp_path_factory.mktemp("jupyter-home"))
    yield server
    server.close()


def test_the_chapters_with_sliders_are_found():
    assert {"06_importance_sampling_and_kl", "08_ppo_and_kl_in_reward", "10_dpo"} <= {name for name, _ in WIDGETS}


def test_the_console_watch_catches_errors(browser):
    """The check below can fail: an error logged or thrown on the page is recorded."""
    browser.errors.clear()
    browser.open("about:blank")
    browser.evaluate("console.error('deliberate'); setTimeout(() => { throw new Error('thrown'); }, 0); 1")
    browser.evaluate("new Promise(resolve => setTimeout(resolve, 200))")
    assert any("deliberate" in e for e in browser.errors) and any("thrown" in e for e in browser.errors)
    browser.errors.clear()


OPEN = """(async () => {{
  const app = window.jupyterapp;
  const panel = app && app.shell.currentWidget;
  if (!panel || !panel.context || !panel.context.path.endsWith({name!r} + ".ipynb")) return false;
  await panel.context.ready;
  await panel.sessionContext.ready;
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  return Boolean(kernel) && kernel.status === "idle" && panel.content.widgets.length > {index};
}})()"""

RUN = """(async () => {{
  const app = window.jupyterapp, panel = app.shell.currentWidget, notebook = panel.content;
  await app.commands.execute("notebook:clear-all-cell-outputs");
  notebook.activeCellIndex = {index};
  await app.commands.execute("notebook:run-all-above");
  await app.commands.execute("notebook:run-cell");
  const errors = [];
  for (let i = 0; i <= {index}; i++) {{
    const cell = notebook.model.cells.get(i);
    if (cell.type !== "code") continue;
    for (const output of cell.outputs.toJSON()) {{
      if (output.output_type === "error") errors.push(`cell ${{i}}: ${{output.ename}}: ${{output.evalue}}`);
    }}
  }}
  return JSON.stringify(errors);
}})()"""

FIGURE = """(() => {{
  const cell = window.jupyterapp.shell.currentWidget.content.widgets[{index}].node;
  const images = cell.querySelectorAll(".widget-output img, .jupyter-widgets-output-area img");
  const image = images[images.length - 1];
  return image && image.complete && image.naturalWidth > 0 ? image.src : "";
}})()"""

HANDLE = """(() => {{
  const cell = window.jupyterapp.shell.currentWidget.content.widgets[{index}].node;
  const handle = cell.querySelector(".widget-slider .noUi-handle");
  if (!handle) return null;
  handle.scrollIntoView({{block: "center"}});
  const box = handle.getBoundingClientRect();
  return [box.left + box.width / 2, box.top + box.height / 2];
}})()"""


@pytest.mark.parametrize("name, index", WIDGETS, ids=[name for name, _ in WIDGETS])
def test_moving_a_slider_redraws_its_figure_without_console_errors(browser, lab, name, index):
    start = time.perf_counter()
    browser.errors.clear()
    browser.open(lab.notebook_url(f"notebooks/{name}.ipynb"))
    browser.wait_for(OPEN.format(name=name, index=index), timeout=180)
    errors = json.loads(browser.evaluate(RUN.format(index=index), timeout=600))
    assert errors == [], f"{name}: cells raised in the browser's kernel: {errors}"
    before = browser.wait_for(FIGURE.format(index=index), timeout=120)
    x, y = browser.wait_for(HANDLE.format(index=index), timeout=60)
    browser.drag(x, y, 80)
    after = browser.wait_for(f"(() => {{ const s = {FIGURE.format(index=index)}; "
                             f"return s && s !== {json.dumps(before)} ? s : ''; }})()", timeout=120)
    assert after != before
    assert browser.errors == [], f"{name}: the browser console reported errors: {browser.errors}"
    print(f"{name}: cells 0-{index} run, slider moved, figure redrawn in {time.perf_counter() - start:.1f} s")


def test_every_figure_of_the_static_book_loads(browser, tmp_path):
    chapters = book.select_chapters("03", book.list_chapters())  # a real chapter, one of the quickest
    book.run_book(chapters, out=tmp_path / "book", progress=False)
    pages = ["index.html", *(f"{c.name}.html" for c in chapters)]
    for page in pages:
        browser.errors.clear()
        browser.open((tmp_path / "book" / page).as_uri())
        browser.wait_for("document.readyState === 'complete'", timeout=60)
        images = browser.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
        if page != "index.html":
            assert images, f"{page}: no figure"
        assert all(complete and width > 0 for complete, width in images), f"{page}: a figure did not load: {images}"
        assert browser.errors == [], f"{page}: the browser console reported errors: {browser.errors}"
    links = browser.evaluate("Array.from(document.links).map(a => a.getAttribute('href'))")
    assert "index.html" in links  # a chapter page links back to the contents
