"""The notebooks as committed: executed top to bottom, without errors, with their figures stored.

nbval re-runs each notebook and compares the cells marked ``# NBVAL_CHECK_OUTPUT``; this file checks what a
reader sees on GitHub without running anything.
"""

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))
assert NOTEBOOKS, "no chapter notebooks found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_saved_executed_in_order_with_figures_and_no_errors(path):
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code" and cell.source.strip()]
    counts = [cell.execution_count for cell in code]
    assert None not in counts, f"{path.name}: some cells were never run"
    assert counts == list(range(1, len(code) + 1)), f"{path.name}: not run top to bottom, once, in one kernel"
    outputs = [output for cell in code for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"], f"{path.name}: a stored error"
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, f"{path.name}: no figure stored (executed with a non-inline matplotlib backend?)"
    assert "%matplotlib inline" in code[0].source
