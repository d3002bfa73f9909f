"""``rlmt-edu book``: run the chapter notebooks headless, in order, and write a static HTML book.

    rlmt-edu book                      # every chapter -> runs/book/index.html
    rlmt-edu book --chapters 06-09     # a subset
    rlmt-edu book --device cuda        # every notebook's choose_device() picks the GPU

Each chapter runs in a fresh Jupyter kernel (``nbclient``), cell by cell, with a progress bar over chapters.
For each chapter the book keeps its executed notebook (``notebooks/NN_name.ipynb``), an HTML page with its
figures (``NN_name.html``), its wall time, the kernel's peak memory and the kernel process's own log
(``logs/NN_name.log``). The chapters that train a method call
``results.record_result``, which writes their rows under ``results/``; the index page lists the chapters and
shows the results table (also ``results.md`` and ``results.json``). A chapter whose cell raises stops the book
with ``ChapterFailed`` naming the chapter and the cell; the pages of the chapters before it stay, and so does
the failed chapter's notebook as far as it ran (``notebooks/NN_name.failed.ipynb``).

The pages are self-contained: figures are embedded, nothing is fetched from the network, and the widgets'
live views are left out (each chapter draws its default figure without them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from html import escape
from pathlib import Path

from rlmt_edu.paths import REPO, RUNS
from rlmt_edu.results import RESULTS_ENV, load_results, results_html, results_markdown, results_table
from rlmt_edu.utils import DEVICE_ENV, atomic_write_text

NOTEBOOKS = REPO / "notebooks"
BOOK = RUNS / "book"
CHAPTER_FILE = re.compile(r"^(\d\d)_(\w+)\.ipynb$")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
_PEAK_CELL = ("import resource, sys\n"
              "_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "print(_peak / 2**20 if sys.platform == 'darwin' else _peak / 2**10)")


@dataclasses.dataclass(frozen=True)
class Chapter:
    number: str  #: "07"
    name: str  #: "07_trpo"
    path: Path
    title: str  #: the notebook's first heading


@dataclasses.dataclass
class ChapterRun:
    chapter: Chapter
    wall_s: float
    peak_mb: float | None


class ChapterFailed(RuntimeError):
    """A chapter's cell raised: names the chapter, the cell (0-based index in the notebook) and the error."""

    def __init__(self, chapter: Chapter, cell: int, error: str):
        self.chapter, self.cell, self.error = chapter, cell, error
        super().__init__(f"chapter {chapter.name} failed at cell {cell}: {error}")


def _title(path: Path) -> str:
    import nbformat

    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return path.stem


def list_chapters(folder: str | Path = NOTEBOOKS) -> list[Chapter]:
    """The chapter notebooks ``NN_name.ipynb`` in ``folder``, in order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"notebooks: expected a folder of chapter notebooks, got {str(folder)!r}")
    chapters = []
    for path in sorted(folder.glob("*.ipynb")):
        match = CHAPTER_FILE.match(path.name)
        if match:
            chapters.append(Chapter(match.group(1), path.stem, path, _title(path)))
    if not chapters:
        raise ValueError(f"notebooks: expected chapter notebooks named NN_name.ipynb in {str(folder)!r}, got none")
    return chapters


def select_chapters(spec: str | None, chapters: Sequence[Chapter]) -> list[Chapter]:
    """The chapters that ``spec`` names: None or ``"all"`` for every one, else numbers and ranges separated by
    commas: ``"06-09"``, ``"3,7"``, ``"00-02,11"``. An unknown chapter raises ``ValueError`` naming ``chapters``."""
    if spec is None or spec.strip() == "all":
        return list(chapters)
    by_number = {int(c.number): c for c in chapters}
    known = ", ".join(c.number for c in chapters)
    wanted: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise ValueError(f"chapters: expected numbers or ranges like 06-09, got {spec!r}")
        low, high = int(match.group(1)), int(match.group(2) or match.group(1))
        if low > high:
            raise ValueError(f"chapters: expected a range from low to high, got {part.strip()!r}")
        missing = [n for n in (low, high) if n not in by_number]
        if missing:
            raise ValueError(f"chapters: expected chapters among {known}, got {missing[0]:02d} in {spec!r}")
        wanted += [n for n in range(low, high + 1) if n in by_number and n not in wanted]
    return [by_number[n] for n in sorted(wanted)]


def check_writable(out: str | Path) -> Path:
    """Create ``out`` and write (and remove) a probe file in it; a ``ValueError`` naming ``out`` if that fails.
    Called before any chapter runs, so a book never fails at its end for want of a place to write."""
    out = Path(out)
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ValueError(f"out: expected a folder that can be written, got {str(out)!r} "
                         f"({str(blocker)!r} is a file, not a folder)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".rlmt-edu-probe."):
            pass
    except OSError as error:
        raise ValueError(f"out: expected a folder that can be written, got {str(out)!r} ({error.strerror})") from None
    return out


@contextlib.contextmanager
def _kernel_environment(**values: str | None) -> Iterator[None]:
    """Set environment variables for the kernels started inside the block (a kernel inherits them)."""
    def apply(settings: dict) -> None:
        for key, value in settings.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    saved = {key: os.environ.get(key) for key in values}
    try:
        apply(values)
        yield
    finally:
        apply(saved)


def _error_text(outputs) -> str:
    for output in outputs:
        if output.get("output_type") == "error":
            return f"{output.get('ename')}: {output.get('evalue')}"
    return "the cell raised"


def run_chapter(chapter: Chapter, *, timeout: int = 1200, kernel_name: str = "python3", log: Path | None = None):
    """Execute ``chapter`` in a fresh kernel, cell by cell. Returns ``(executed notebook, wall s, peak MB)``;
    raises ``ChapterFailed`` (with ``.notebook``, run up to the failing cell) if a cell raises. The kernel
    process's own stdout and stderr (not the cells' outputs) go to ``log`` when given."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    notebook = nbformat.read(chapter.path, as_version=4)
    client = NotebookClient(notebook, timeout=timeout, kernel_name=kernel_name,
                            resources={"metadata": {"path": str(chapter.path.parent)}})
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        streams = {}
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            handle = stack.enter_context(log.open("w"))
            streams = {"stdout": handle, "stderr": handle}
        stack.enter_context(client.setup_kernel(**streams))
        for index, cell in enumerate(notebook.cells):
            try:
                client.execute_cell(cell, index)
            except (CellExecutionError, CellTimeoutError) as error:
                text = (f"no result within {timeout} s" if isinstance(error, CellTimeoutError)
                        else _error_text(cell.get("outputs", [])))
                failure = ChapterFailed(chapter, index, text)
                failure.notebook = notebook
                raise failure from None
        wall = time.perf_counter() - start
        notebook.cells.append(nbformat.v4.new_code_cell(_PEAK_CELL))  # run in the same kernel, then taken out
        probe = client.execute_cell(notebook.cells[-1], len(notebook.cells) - 1)
        notebook.cells.pop()
    peak = None
    for output in probe.outputs:
        if output.get("name") == "stdout":
            with contextlib.suppress(ValueError):
                peak = float(output["text"].strip())
    return notebook, wall, peak


def _static(notebook):
    """A copy of ``notebook`` without the widgets' live views (a static page cannot run them)."""
    import copy

    notebook = copy.deepcopy(notebook)
    notebook.metadata.pop("widgets", None)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            for output in cell.get("outputs", []):
                output.get("data", {}).pop(WIDGET_VIEW, None)
            cell.outputs = [o for o in cell.get("outputs", []) if o.get("output_type") not in ("display_data",)
                            or o.get("data")]
    return notebook


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem; line-height: 1.45;
       color: #1f2328; }
nav { margin-bottom: 1.5rem; font-size: 0.95rem; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #d0d7de; padding: 0.25rem 0.5rem; text-align: left; }
th { background: #f6f8fa; }
pre { background: #f6f8fa; padding: 0.6rem; overflow-x: auto; font-size: 0.85rem; }
.jp-OutputArea-output pre { background: #fff; border-left: 3px solid #d0d7de; }
img { max-width: 100%; }
.failed { color: #b42318; }
"""


def _page(title: str, nav: str, body: str) -> str:
    from pygments.formatters import HtmlFormatter

    css = _STYLE + HtmlFormatter().get_style_defs(".highlight")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{css}</style></head><body><nav>{nav}</nav>{body}</body></html>\n")


def chapter_page(notebook, chapter: Chapter, chapters: Sequence[Chapter]) -> str:
    """The HTML page of one executed chapter: its cells and outputs, figures embedded, with links around it."""
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter(template_name="basic").from_notebook_node(_static(notebook))
    position = [c.name for c in chapters].index(chapter.name)
    links = ['<a href="index.html">contents</a>']
    if position > 0:
        links.append(f'<a href="{chapters[position - 1].name}.html">previous</a>')
    if position + 1 < len(chapters):
        links.append(f'<a href="{chapters[position + 1].name}.html">next</a>')
    return _page(f"{chapter.number} {chapter.title}", " · ".join(links), body)


def index_page(runs: Sequence[ChapterRun], table: Sequence[dict], *, failed: ChapterFailed | None,
               command: str, stale: Sequence[str], earlier: Sequence[ChapterRun] = ()) -> str:
    """The book's first page: the chapters run (wall time, peak memory), those kept from an earlier run
    (``earlier``, marked), and the results table."""
    def row(run: ChapterRun, mark: str) -> str:
        peak = "—" if run.peak_mb is None else f"{run.peak_mb:.0f}"
        return (f'<tr><td>{run.chapter.number}</td><td><a href="{run.chapter.name}.html">'
                f"{escape(run.chapter.title)}</a>{mark}</td><td>{run.wall_s:.1f}</td><td>{peak}</td></tr>")

    listed = sorted([(r, "") for r in runs] + [(r, " (earlier run)") for r in earlier], key=lambda x: x[0].chapter.name)
    rows = "".join(row(run, mark) for run, mark in listed)
    total = sum(run.wall_s for run in runs)
    body = [f"<h1>rlmt_edu: the book</h1><p>Made by <code>{escape(command)}</code>.</p>",
            "<h2>Chapters</h2><table><thead><tr><th>#</th><th>chapter</th><th>wall time (s)</th>"
            f"<th>peak memory (MB)</th></tr></thead><tbody>{rows}</tbody></table>"
            f"<p>{len(runs)} chapters run this time, in {total:.0f} s.</p>"]
    if failed is not None:
        body.append(f'<p class="failed">Stopped: {escape(str(failed))}</p>')
    body.append("<h2>Results</h2><p>Every method of the book, measured the same way: greedy answers to every "
                "held-out question of the toy world; gold is the world's hidden score (per category); proxy is "
                "the reward the method optimised, on the same answers; KL to SFT is Eq. (8) per response token on "
                "the SFT model's answers; length in words; s / run is one training run in its chapter. Seeds are "
                "averaged; the gold column gives the lowest and highest seed.</p>")
    body.append(results_html(table) if table else "<p>No chapter that trains a method was run.</p>")
    if stale:
        body.append(f"<p>Rows kept from an earlier run of their chapter: {escape(', '.join(stale))}.</p>")
    return _page("rlmt_edu: the book", "contents", "".join(body))


def run_book(chapters: Sequence[Chapter] | None = None, *, out: str | Path = BOOK, device: str | None = None,
             timeout: int = 1200, progress: bool = True, command: str = "rlmt-edu book",
             all_chapters: Sequence[Chapter] | None = None) -> list[ChapterRun]:
    """Run ``chapters`` (default: every chapter) in order and write the book under ``out``. Returns the runs.

    ``device`` is handed to every notebook's ``choose_device()`` (``RLMT_EDU_DEVICE``). The results of the
    chapters run replace their earlier rows in ``out/results``; rows of chapters not run are kept and marked.
    """
    from tqdm.auto import tqdm

    from rlmt_edu.utils import choose_device

    all_chapters = list(all_chapters or list_chapters())
    chapters = list(all_chapters if chapters is None else chapters)
    if device is not None:
        choose_device(device)  # a device that is not here fails now, not in the first notebook
    out = check_writable(out)
    results = out / "results"
    (out / "notebooks").mkdir(exist_ok=True)
    numbers = {c.number for c in chapters}
    for path in results.glob("*_seed*.json") if results.is_dir() else []:
        if json.loads(path.read_text()).get("chapter") in numbers:
            path.unlink()
    environment = {RESULTS_ENV: str(results.resolve()), DEVICE_ENV: device,
                   "MPLBACKEND": "module://matplotlib_inline.backend_inline"}  # figures inline, whatever the shell set
    runs: list[ChapterRun] = []
    failed = None
    bar = tqdm(chapters, desc="book", unit="chapter", disable=not progress, file=sys.stderr)
    try:
        with _kernel_environment(**environment):
            for chapter in bar:
                bar.set_postfix_str(chapter.name)
                try:
                    notebook, wall, peak = run_chapter(chapter, timeout=timeout,
                                                       log=out / "logs" / f"{chapter.name}.log")
                except ChapterFailed as error:
                    failed = error
                    _write_notebook(error.notebook, out / "notebooks" / f"{chapter.name}.failed.ipynb")
                    raise
                _write_notebook(notebook, out / "notebooks" / f"{chapter.name}.ipynb")
                atomic_write_text(out / f"{chapter.name}.html", chapter_page(notebook, chapter, chapters))
                runs.append(ChapterRun(chapter, wall, peak))
                peak_text = "" if peak is None else f", peak {peak:.0f} MB"
                bar.write(f"{chapter.name}: {wall:.1f} s{peak_text}", file=sys.stderr)
    finally:
        bar.close()
        rows = load_results(results)
        table = results_table(rows)
        stale = sorted({row["label"] for row in table if row["chapter"] not in numbers})
        atomic_write_text(out / "results.json", json.dumps({"rows": rows, "table": table}, indent=1))
        atomic_write_text(out / "results.md", results_markdown(table))
        earlier = [r for r in _earlier_runs(out / "chapters.json", all_chapters)
                   if r.chapter.number not in numbers and (out / f"{r.chapter.name}.html").exists()]
        atomic_write_text(out / "chapters.json", json.dumps(
            [{"chapter": r.chapter.name, "wall_s": round(r.wall_s, 1), "peak_mb": r.peak_mb}
             for r in sorted([*runs, *earlier], key=lambda r: r.chapter.name)], indent=1))
        atomic_write_text(out / "index.html", index_page(runs, table, failed=failed, command=command, stale=stale,
                                                         earlier=earlier))
    return runs


def _earlier_runs(path: Path, chapters: Sequence[Chapter]) -> list[ChapterRun]:
    """The chapter runs recorded in a book's ``chapters.json`` by an earlier ``run_book`` (none if absent)."""
    if not path.exists():
        return []
    by_name = {c.name: c for c in chapters}
    return [ChapterRun(by_name[e["chapter"]], e["wall_s"], e["peak_mb"]) for e in json.loads(path.read_text())
            if e.get("chapter") in by_name]


def _write_notebook(notebook, path: Path) -> None:
    import nbformat

    atomic_write_text(path, nbformat.writes(notebook))

