import json

import nbformat
import pytest

from fiseclip_lib.cli import main
from fiseclip_lib.report import list_notebooks, run_reports


def write_nb(path, params_src, body_src):
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell(params_src)
    p.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# test"), p, nbformat.v4.new_code_cell(body_src)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))


@pytest.fixture
def books(tmp_path):
    d = tmp_path / "nbs"
    d.mkdir()
    write_nb(d / "00_ok.ipynb", 'label = "default"\npretrained = "none"',
             'print("RESULT: label is " + label)')
    write_nb(d / "02_widget.ipynb", 'label = "w"\npretrained = "none"',
             'import os\nfrom fiseclip_lib import workbench as wb\nimport ipywidgets as W\n'
             'seen = []\nw = wb.explore(lambda x=1: seen.append(x), x=W.IntSlider(value=3))\n'
             'print("RESULT: headless=" + os.environ.get("FISECLIP_HEADLESS", "") + " widget=" + str(w) '
             '+ " static=" + str(seen))')
    write_nb(d / "01_fragile.ipynb", "divisor = 1\npretrained = \"openai\"",
             'x = 1 / divisor\nprint("RESULT: fine <b>")')
    return d


def test_failure_keeps_other_reports_and_sets_exit_code(books, tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("divisor: 0\nlabel: from-params\n")
    out = tmp_path / "reports"
    code = main(["report", "--params", str(params), "--notebooks", str(books), "--out", str(out)])
    assert code == 1
    index = json.loads((out / "index.json").read_text())
    status = {r["name"]: r["status"] for r in index["reports"]}
    assert status == {"00_ok": "ok", "01_fragile": "failed", "02_widget": "ok"}
    widget = next(r for r in index["reports"] if r["name"] == "02_widget")
    assert widget["result"] == "headless=1 widget=None static=[3]"  # static view, no widget without a frontend
    ok_html = (out / "00_ok.html").read_text()
    assert "label is from-params" in ok_html  # parameters reach the notebook
    assert 'id="fiseclip-provenance"' in ok_html and "RANDOM WEIGHTS" in ok_html and "git commit" in ok_html
    failed_html = (out / "01_fragile.html").read_text()
    assert "ZeroDivisionError" in failed_html and 'id="fiseclip-provenance"' in failed_html
    page = (out / "index.html").read_text()
    assert "00_ok.html" in page and "01_fragile.html" in page and "label is from-params" in page
    assert (out / "00_ok.ipynb").is_file() and (out / "01_fragile.ipynb").is_file()


def test_results_are_escaped_in_html(books, tmp_path):
    results = run_reports(tmp_path / "r", {}, only="01", notebooks_dir=books)
    assert results[0]["status"] == "ok" and results[0]["result"] == "fine <b>"
    assert "fine &lt;b&gt;" in (tmp_path / "r" / "index.html").read_text()


def test_only_selects_and_rejects_unknown(books):
    assert [b.stem for b in list_notebooks(books, "00")] == ["00_ok"]
    assert [b.stem for b in list_notebooks(books, "00,02_widget")] == ["00_ok", "02_widget"]
    with pytest.raises(Exception, match="no such notebook"):
        list_notebooks(books, "07")


def test_shipped_notebooks_have_a_parameters_cell_and_import_the_library():
    from pathlib import Path

    books = sorted(Path(__file__).resolve().parent.parent.joinpath("notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert [b.stem[:2] for b in books] == ["00", "01", "02", "03", "04"]
    for b in books:
        nb = nbformat.read(str(b), as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, b.name
        assert nb.cells[0].cell_type == "markdown"
        src = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert "fiseclip_lib" in src and "wb.result(" in src and "show_provenance" in src
