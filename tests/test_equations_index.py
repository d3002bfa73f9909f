"""The equation index is complete and true: every equation has a function, a test and (once written) a
notebook cell that uses it, and the README's table is the one the index generates."""

import ast
import inspect
import json
import re
from pathlib import Path

import pytest

from rlmt_edu.equations import INDEX, NUMBERED, markdown_table

ROOT = Path(__file__).resolve().parent.parent


def test_every_numbered_equation_is_indexed():
    labels = {eq.label for eq in INDEX}
    assert [n for n in NUMBERED if n not in labels] == []


@pytest.mark.parametrize("eq", INDEX, ids=lambda eq: f"{eq.label}:{eq.function.rsplit('.', 1)[-1]}")
def test_function_exists_and_its_docstring_names_the_equation(eq):
    function = eq.resolve()
    doc = inspect.getdoc(function) or ""
    if eq.label.startswith("Eq. "):
        number = eq.label.split()[1]
        assert re.search(rf"Eq(uation)?\.?\s*\(?{number}\)?\b", doc), f"{eq.function} docstring lacks {eq.label}"
    else:
        assert len(doc) > 80, f"{eq.function} needs a docstring with its formula"


@pytest.mark.parametrize("eq", INDEX, ids=lambda eq: f"{eq.label}:{eq.function.rsplit('.', 1)[-1]}")
def test_function_has_tests_named_after_it(eq):
    path = ROOT / eq.test
    assert path.exists(), f"missing test module {eq.test}"
    name = eq.function.rsplit(".", 1)[-1]
    tree = ast.parse(path.read_text())
    tests = [n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test")]
    assert any(name in t for t in tests), f"no test function in {eq.test} mentions {name}"


@pytest.mark.parametrize("eq", INDEX, ids=lambda eq: f"{eq.label}:{eq.function.rsplit('.', 1)[-1]}")
def test_existing_notebook_uses_the_function(eq):
    path = ROOT / eq.notebook
    if not path.exists():
        pytest.skip(f"{eq.notebook} is not written yet")
    code = "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
    assert eq.function.rsplit(".", 1)[-1] in code


def test_readme_equation_table_is_generated_from_the_index():
    readme = (ROOT / "README.md").read_text()
    assert markdown_table(ROOT) in readme, "run `python -m rlmt_edu.equations` and paste the table into README.md"
