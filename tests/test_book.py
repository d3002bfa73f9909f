"""``rlmt-edu book`` on small stand-in notebooks (each runs in a real kernel in about a second), and the
results table's rows measured on the committed SFT model."""

import json
import os

import nbformat
import pytest
import torch

from rlmt_edu import book, results
from rlmt_edu.cli import main


def _write(folder, name, cells):
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_markdown_cell(f"# Chapter {name}")] + [nbformat.v4.new_code_cell(c) for c in cells]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, folder / f"{name}.ipynb")


FIGURE = ("import matplotlib.pyplot as plt\n"
          "fig, ax = plt.subplots(figsize=(2, 2)); ax.plot([0, 1], [1, 0]); plt.show()")
ENVIRONMENT = "import os; print(os.environ.get('RLMT_EDU_DEVICE'), bool(os.environ.get('RLMT_EDU_RESULTS')))"


@pytest.fixture
def notebooks(tmp_path):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    _write(folder, "00_first", ["print(6 * 7)", FIGURE])
    _write(folder, "01_second", [ENVIRONMENT])
    _write(folder, "02_broken", ["x = 1", "raise ZeroDivisionError('no such luck')", "print('never')"])
    (folder / "scratch.ipynb").write_text((folder / "00_first.ipynb").read_text())  # not a chapter: left out
    return folder


def test_chapters_are_listed_in_order_and_selected_by_number_and_range(notebooks):
    chapters = book.list_chapters(notebooks)
    assert [c.name for c in chapters] == ["00_first", "01_second", "02_broken"]
    assert chapters[0].title == "Chapter 00_first"
    assert [c.number for c in book.select_chapters("01-02", chapters)] == ["01", "02"]
    assert [c.number for c in book.select_chapters("2,0", chapters)] == ["00", "02"]
    assert [c.number for c in book.select_chapters(None, chapters)] == ["00", "01", "02"]
    assert [c.number for c in book.select_chapters("all", chapters)] == ["00", "01", "02"]


@pytest.mark.parametrize("spec, message", [
    ("07", "expected chapters among 00, 01, 02, got 07"),
    ("00-05", "got 05"),
    ("02-01", "from low to high"),
    ("six", "expected numbers or ranges"),
])
def test_an_unknown_chapter_is_named(notebooks, spec, message):
    with pytest.raises(ValueError, match="chapters: ") as error:
        book.select_chapters(spec, book.list_chapters(notebooks))
    assert message in str(error.value)


def test_the_real_chapters_are_found():
    chapters = book.list_chapters()
    assert [c.number for c in chapters][:3] == ["00", "01", "02"]
    assert all(c.path.exists() for c in chapters)


def test_an_output_folder_that_cannot_be_written_fails_before_any_chapter(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="out: expected a folder that can be written.*is a file"):
        book.check_writable(blocker / "book")
    assert book.check_writable(tmp_path / "new" / "book").is_dir()


def test_the_book_runs_chapters_writes_pages_and_names_a_failed_chapter_with_its_cell(notebooks, tmp_path):
    out = tmp_path / "book"
    chapters = book.list_chapters(notebooks)
    runs = book.run_book(chapters[:2], out=out, device="cpu", progress=False, all_chapters=chapters)
    assert [r.chapter.name for r in runs] == ["00_first", "01_second"]
    assert all(r.wall_s > 0 for r in runs) and all(r.peak_mb and r.peak_mb > 10 for r in runs)
    first = (out / "00_first.html").read_text()
    assert "42" in first and first.count('src="data:image/png;base64,') == 1  # the figure, embedded
    assert 'href="01_second.html">next' in first and "http" not in first.split("<body>")[0]  # nothing fetched
    executed = nbformat.read(out / "notebooks" / "01_second.ipynb", as_version=4)
    assert executed.cells[1].outputs[0]["text"].strip() == "cpu True"  # the device and results folder reached the kernel
    index = (out / "index.html").read_text()
    assert "00_first.html" in index and "01_second.html" in index
    assert json.loads((out / "chapters.json").read_text())[0]["chapter"] == "00_first"
    assert (out / "logs" / "00_first.log").exists()  # the kernel's own chatter, kept off the progress bar

    book.run_book(chapters[1:2], out=out, progress=False, all_chapters=chapters)  # one chapter again
    assert [e["chapter"] for e in json.loads((out / "chapters.json").read_text())] == ["00_first", "01_second"]
    assert "00_first.html\">Chapter 00_first</a> (earlier run)" in (out / "index.html").read_text()

    with pytest.raises(book.ChapterFailed) as failure:
        book.run_book(chapters, out=out, progress=False, all_chapters=chapters)
    assert failure.value.chapter.name == "02_broken" and failure.value.cell == 2
    assert str(failure.value) == "chapter 02_broken failed at cell 2: ZeroDivisionError: no such luck"
    assert (out / "00_first.html").exists() and (out / "01_second.html").exists()  # the chapters before it stay
    partial = nbformat.read(out / "notebooks" / "02_broken.failed.ipynb", as_version=4)
    assert partial.cells[3].get("outputs", []) == []  # it stopped at the failing cell
    assert "Stopped: chapter 02_broken failed at cell 2" in (out / "index.html").read_text()


def test_the_command_names_a_failed_chapter_and_rejects_bad_input(notebooks, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(book, "NOTEBOOKS", notebooks)
    monkeypatch.setattr(book.list_chapters, "__defaults__", (notebooks,))
    assert main(["book", "--chapters", "02", "--out", str(tmp_path / "b"), "--quiet"]) == 2
    assert "rlmt-edu book: chapter 02_broken failed at cell 2: ZeroDivisionError" in capsys.readouterr().err
    assert main(["book", "--chapters", "09", "--out", str(tmp_path / "b"), "--quiet"]) == 2
    assert "rlmt-edu book: chapters: expected chapters among 00, 01, 02, got 09" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["book", "--out", str(tmp_path / "file" / "b"), "--quiet"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["book", "--chapters", "00", "--out", str(tmp_path / "c"), "--quiet"]) == 0
    assert "00_first" in capsys.readouterr().out


# ---- the results table ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_model():
    from rlmt_edu.model import load_checkpoint
    from rlmt_edu.paths import SFT

    model, tokenizer = load_checkpoint(SFT)
    return model.requires_grad_(False), tokenizer


def test_a_row_measures_gold_per_category_proxy_kl_and_length(sft_model, tmp_path, monkeypatch):
    from rlmt_edu.rl import gold_reward, heldout_questions, heldout_scores_by_category

    model, tokenizer = sft_model
    monkeypatch.setenv(results.RESULTS_ENV, str(tmp_path))
    row = results.record_result("sft", model, tokenizer, reference=model, seed=0, wall_s=1.5, proxy="gold",
                                proxy_fn=gold_reward)
    expected = heldout_scores_by_category(model, tokenizer, heldout_questions())
    assert row["gold"] == pytest.approx(expected["eval/gold_score"])
    assert row["gold/safety"] == pytest.approx(expected["eval/gold_score/safety"])
    assert row["proxy"] == pytest.approx(row["gold"])  # the proxy here is gold itself
    assert row["kl_to_sft"] == pytest.approx(0.0, abs=1e-6)  # the SFT model against itself
    assert 1 < row["length"] < 24
    assert json.loads((tmp_path / "sft_seed0.json").read_text()) == row


def test_without_the_book_nothing_is_written(sft_model, tmp_path, monkeypatch):
    model, tokenizer = sft_model
    monkeypatch.delenv(results.RESULTS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    row = results.record_result("dpo", model, tokenizer, reference=model, seed=1, wall_s=0.0, proxy="implicit")
    assert row["proxy"] is None and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "ppo"}, "method: expected one of"),
    ({"seed": 0.5}, "seed: expected an int"),
    ({"wall_s": -1.0}, "wall_s: expected seconds >= 0"),
])
def test_a_bad_row_is_refused(sft_model, kwargs, message):
    model, tokenizer = sft_model
    arguments = {"method": "sft", "seed": 0, "wall_s": 1.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        results.record_result(arguments.pop("method"), model, tokenizer, reference=model, proxy="gold", **arguments)


def test_the_table_averages_seeds_in_the_books_order():
    def row(method, seed, gold, proxy=None):
        label, chapter = results.METHODS[method]
        return {"method": method, "label": label, "chapter": chapter, "seed": seed, "proxy_name": "x",
                "gold": gold, "gold/math": gold, "gold/facts": 1.0, "gold/safety": 0.5, "proxy": proxy,
                "kl_to_sft": 0.1 * seed, "length": 4.0, "wall_s": 2.0}

    table = results.results_table([row("grpo", 0, 0.8, 1.0), row("sft", 0, 0.7), row("grpo", 1, 0.6, 0.0)])
    assert [r["method"] for r in table] == ["sft", "grpo"]
    grpo = table[1]
    assert grpo["seeds"] == 2 and grpo["gold"] == pytest.approx(0.7) and grpo["proxy"] == pytest.approx(0.5)
    assert (grpo["gold_min"], grpo["gold_max"]) == (0.6, 0.8) and grpo["kl_to_sft"] == pytest.approx(0.05)
    text = results.results_markdown(table)
    assert "| GRPO | 09 | 2 | 0.700 (0.600–0.800) |" in text and "| SFT | 01 | 1 | 0.700 |" in text
    assert "<td>—</td>" in results.results_html(table)  # SFT optimises no reward function


def test_the_device_variable_reaches_choose_device(monkeypatch):
    from rlmt_edu.utils import DEVICE_ENV, choose_device

    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert choose_device() == torch.device("cpu")
    monkeypatch.setenv(DEVICE_ENV, "tpu")
    with pytest.raises(ValueError, match="device: expected 'cpu'"):
        choose_device()
    assert os.environ[DEVICE_ENV] == "tpu"


def test_a_device_that_is_not_here_fails_before_any_chapter(notebooks, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    chapters = book.list_chapters(notebooks)
    with pytest.raises(ValueError, match="device: expected an available device, got 'cuda'"):
        book.run_book(chapters, out=tmp_path / "book", device="cuda", progress=False, all_chapters=chapters)
    assert not (tmp_path / "book").exists()  # nothing ran, nothing was written


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_book_hands_cuda_to_every_notebook(notebooks, tmp_path):
    _write(notebooks, "03_gpu", ["from rlmt_edu.utils import choose_device; print(choose_device())"])
    chapters = book.select_chapters("03", book.list_chapters(notebooks))
    book.run_book(chapters, out=tmp_path / "book", device="cuda", progress=False, all_chapters=chapters)
    executed = nbformat.read(tmp_path / "book" / "notebooks" / "03_gpu.ipynb", as_version=4)
    assert executed.cells[1].outputs[0]["text"].strip() == "cuda"
