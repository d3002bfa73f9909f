"""Every measured number a chapter's prose quotes is printed by one of its cells.

A reader checks a claim like "held-out gold falls to 0.754" by finding 0.754 in an output. This test does the
same for every decimal and every percentage in every markdown cell of every chapter, against the notebook as
committed. A quoted number passes when

- an output (or a setting in a code cell) prints it, or prints a number that rounds to it at the decimals
  quoted (0.83 for a printed 0.829); a percentage also passes as a printed fraction (65% for 0.65 or 0.652);
- it is a section or lemma number (§4.5, §4.5–4.7, Lemma 8.1), or sits in inline code or a code block,
  which are settings the reader types, not measurements;
- it is one of the paper's own numbers, marked as such: the sentence that quotes it says "paper"; or a goal
  the chapter sets itself, which the sentence calls a goal (a target is not a measurement).
"""

import re
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))

QUOTED = re.compile(r"(?<![\w.§])(\d+(?:\.\d+)?\s?%|\d+\.\d+)(?![\w.]*\d)")
DECIMAL = re.compile(r"\d+\.\d+")
PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s?%")
SECTION = re.compile(r"(?:§|Lemma\s|Section\s|Appendix\s)\d+(?:\.\d+)?(?:\s?[–-]\s?\d+(?:\.\d+)?)?")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)
SENTENCE_END = re.compile(r"(?<=[.!?:;])\s+(?=[A-Z*(#\-\d])|\n\s*\n|\n\s*[-*\d]+[.)]?\s")


def printed_text(notebook) -> str:
    """What the cells print (streams, plain text, HTML tables) and the settings their code writes."""
    parts = []
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        parts.append(cell.source)
        for output in cell.outputs:
            if output.output_type == "stream":
                parts.append(output.text)
            for kind in ("text/plain", "text/html", "text/markdown"):
                if kind in output.get("data", {}):
                    parts.append(output["data"][kind])
    return "\n".join(parts)


def _decimals(token: str) -> int:
    return len(token.split(".")[1]) if "." in token else 0


def _rounds_to(number: str, quoted: str, scale: int = 1) -> bool:
    """The printed `number` (times `scale`: 100 for a fraction quoted as a percentage) reads as `quoted`:
    the same digits, or rounded half-up to the places quoted while keeping two significant digits or more
    (5.46 for 5.4623, 0.33 for 0.325 and 65% for 0.652 pass; 0.8 for 0.754 does not)."""
    places = _decimals(quoted)
    x, value = Decimal(number) * scale, Decimal(quoted)
    if x == value:
        return True
    if _decimals(number) - (2 if scale == 100 else 0) <= places or len(value.normalize().as_tuple().digits) < 2:
        return False
    return x.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP) == value


def is_printed(quoted: str, decimals_printed: set[str], percents_printed: set[str]) -> bool:
    """Whether `quoted` (as written in prose, e.g. '0.83' or '65%') is printed, exactly or rounded."""
    if quoted.endswith("%"):
        token = quoted[:-1]
        return any(_rounds_to(p, token) for p in percents_printed) or any(
            _rounds_to(d, token, scale=100) for d in decimals_printed)
    return any(_rounds_to(d, quoted) for d in decimals_printed)


def unprinted_quotes(notebook) -> list[str]:
    printed = printed_text(notebook)
    decimals_printed = set(DECIMAL.findall(printed))
    percents_printed = set(PERCENT.findall(printed))
    missing = []
    for cell in notebook.cells:
        if cell.cell_type != "markdown":
            continue
        text = CODE.sub(" ", cell.source)
        text = SECTION.sub(" ", text)
        for sentence in SENTENCE_END.split(text):
            if not sentence or "paper" in sentence.lower() or "goal" in sentence.lower():
                continue
            for match in QUOTED.finditer(sentence):
                quoted = match.group(1).replace(" ", "")
                if not is_printed(quoted, decimals_printed, percents_printed):
                    context = sentence[max(0, match.start() - 50): match.end() + 30].replace("\n", " ")
                    missing.append(f"{quoted!r} in “…{context}…”")
    return missing


def test_the_checker_catches_an_unprinted_number_and_passes_rounded_and_marked_ones():
    def notebook(markdown, printed):
        nb = nbformat.v4.new_notebook()
        cell = nbformat.v4.new_code_cell("x = 1")
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=printed)]
        nb.cells = [nbformat.v4.new_markdown_cell(markdown), cell]
        return nb

    assert unprinted_quotes(notebook("Gold falls to 0.754.", "gold 0.754\n")) == []
    assert unprinted_quotes(notebook("Gold falls to 0.75.", "gold 0.754\n")) == []
    assert unprinted_quotes(notebook("65% are right.", "accuracy 0.652\n")) == []
    assert unprinted_quotes(notebook("See §4.5–4.7 and Lemma 8.1.", "nothing\n")) == []
    assert unprinted_quotes(notebook("The paper's example gives 10.37.", "nothing\n")) == []
    assert unprinted_quotes(notebook("Run `f(0.02)` again.", "nothing\n")) == []
    assert unprinted_quotes(notebook("The goal is a 65% win rate.", "nothing\n")) == []
    assert len(unprinted_quotes(notebook("Gold falls to 0.761.", "gold 0.754\n"))) == 1
    assert unprinted_quotes(notebook("The exact KL is 5.46 nats.", "KL = 5.4623\n")) == []
    assert unprinted_quotes(notebook("A cosine of 0.85, then 0.33.", "cosine +0.845, -0.325\n")) == []
    assert unprinted_quotes(notebook("A rate of 0.05.", "rate 0.05\n")) == []
    assert len(unprinted_quotes(notebook("About 0.9.", "0.92\n"))) == 1
    assert len(unprinted_quotes(notebook("Gold falls to 0.8 and 45%.", "gold 0.754\n"))) == 2


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_number_quoted_in_prose_is_printed_by_the_notebook(path):
    missing = unprinted_quotes(nbformat.read(path, as_version=4))
    assert missing == [], f"{path.name} quotes numbers no cell prints:\n" + "\n".join(missing)
