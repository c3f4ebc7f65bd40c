import json
import re
import time
from datetime import datetime

import nbformat
import pytest

from fiseclip_lib.errors import FiseclipError

from fiseclip_lib.cli import main
from fiseclip_lib.notebook.report import (clean_debris, list_notebooks, markdown_math_to_mathml, result_record, run_reports,
                                 weights_badge)
from helpers import Fresh, cli

RESULT = ('from fiseclip_lib.notebook import workbench as wb\n'
          'wb.result({text}, numbers_from=[{{"model": "m", "weights": "w", "pretrained": {pre}, "kind": "{kind}"}}], '
          'tables={tables})\n')


def write_nb(path, params_src, body_src, markdown="# test"):
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell(params_src)
    p.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(markdown), p, nbformat.v4.new_code_cell(body_src)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))


def make_books(d):
    d.mkdir()
    write_nb(d / "00_ok.ipynb", 'label = "default"\npretrained = "none"\nrun_dir = "x"',
             'import pathlib\np = pathlib.Path(run_dir) / "t.csv"\np.parent.mkdir(parents=True, exist_ok=True)\n'
             'p.write_text("a\\n1\\n")\n'
             + RESULT.format(text='"label is " + label', pre="False", kind="CLIP", tables='{"t": str(p)}'),
             markdown="# test\nThe score $A_V(p) = \\frac{1}{K}\\sum_k d_k$ and $$x^2$$ but `$code$` and \\$5.")
    write_nb(d / "02_widget.ipynb", 'label = "w"\npretrained = "none"',
             'import os\nfrom fiseclip_lib.notebook import workbench as wb\nimport ipywidgets as W\n'
             'seen = []\nw = wb.explore(lambda x=1: seen.append(x), x=W.IntSlider(value=3))\n'
             + RESULT.format(text='"headless=" + os.environ.get("FISECLIP_HEADLESS", "") + " widget=" + str(w) '
                                  '+ " static=" + str(seen)', pre="True", kind="CNN", tables="{}"))
    # a claim written against its numbers ("grows about linearly" on flat data) and a figure that never shows
    write_nb(d / "03_lying.ipynb", 'pretrained = "none"',
             'from fiseclip_lib.notebook import claims\nfrom IPython.display import display\n'
             'rec = claims.state("growth", x=[1, 2, 4], y=[1.0, 1.0, 1.0], what="cost")\n'
             'rec["text"] = claims.growth([1, 2, 4], [1.0, 2.0, 4.0], what="cost")\n'
             'display({"text/markdown": rec["text"], claims.CLAIM_MIME: rec}, raw=True)\n'
             'import matplotlib\nmatplotlib.use("Agg")\nimport matplotlib.pyplot as plt\n'
             'fig, ax = plt.subplots()\nax.plot([1, 2])\nplt.show()\n')
    write_nb(d / "01_fragile.ipynb", "divisor = 1\npretrained = \"openai\"",
             'x = 1 / divisor\n' + RESULT.format(text='"fine <b> $name$"', pre="True", kind="CNN", tables="{}"))
    return d


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """One report series of three small notebooks (01 fails with the params file), then `--only 02` again."""
    import contextlib
    import io

    tmp = tmp_path_factory.mktemp("rep")
    books = make_books(tmp / "nbs")
    params = tmp / "p.yaml"
    params.write_text("divisor: 0\nlabel: from-params $a$\nsigma: 2\n")
    out = tmp / "reports"
    (out / "_runs").mkdir(parents=True)
    (out / ".00_ok.k1l2m3n4.tmp.html").write_text("left by a killed run")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["report", "--params", str(params), "--notebooks", str(books), "--out", str(out)])
    first = {r["name"]: r for r in json.loads((out / "index.json").read_text())["reports"]}
    while datetime.now().astimezone().isoformat(timespec="seconds") == first["02_widget"]["run_date"]:
        time.sleep(0.05)  # run dates have one-second resolution: the rerun must get another one
    again = run_reports(out, {"label": "from-params $a$"}, only="02", notebooks_dir=books, verbose=False)
    return {"out": out, "code": code, "printed": printed.getvalue(), "first": first, "again": again, "books": books}


@pytest.mark.slow  # the `reported` series: notebook kernels
def test_failure_keeps_other_reports_and_sets_exit_code(reported):
    out, printed = reported["out"], reported["printed"]
    assert reported["code"] == 1
    assert "[report] 00_ok: cell 1 of 3" in printed and "[report] 00_ok: cell 3 of 3" in printed
    assert "without encryption" not in printed  # the kernel's log stays out of the terminal
    assert not list(out.glob(".*.tmp.*"))  # debris of a killed run removed at start
    status = {r["name"]: r["status"] for r in reported["first"].values()}
    assert status == {"00_ok": "ok", "01_fragile": "failed", "02_widget": "ok", "03_lying": "failed"}
    widget = reported["first"]["02_widget"]
    assert widget["result"] == "headless=1 widget=None static=[3]"  # static view, no widget without a frontend
    ok_html = (out / "00_ok.html").read_text()
    assert "label is from-params" in ok_html  # parameters reach the notebook
    assert 'id="fiseclip-provenance"' in ok_html and "RANDOM WEIGHTS" in ok_html and "git commit" in ok_html
    assert ok_html.count("RANDOM WEIGHTS") == 1  # one banner per page, in the header
    widget_html = (out / "02_widget.html").read_text()
    # numbers from a pretrained CNN although the `pretrained` parameter is "none": no banner; the widget's state
    # is dropped, so no widget manager is fetched from a CDN
    assert "RANDOM WEIGHTS" not in widget_html and "unpkg" not in widget_html and "<script src" not in widget_html
    assert "widgets" not in nbformat.read(str(out / "02_widget.ipynb"), as_version=4).metadata
    lying = reported["first"]["03_lying"]
    assert lying["error"].startswith("report check: ") and "(+1 more)" in lying["error"]
    assert any("stays flat" in c for c in lying["checks"]) and any("0 image" in c for c in lying["checks"])
    assert "report check" in (out / "03_lying.html").read_text()
    failed_html = (out / "01_fragile.html").read_text()
    assert "ZeroDivisionError" in failed_html and 'id="fiseclip-provenance"' in failed_html
    page = (out / "index.html").read_text()
    assert "00_ok.html" in page and "01_fragile.html" in page and "label is from-params" in page
    assert (out / "00_ok.ipynb").is_file() and (out / "01_fragile.ipynb").is_file()


@pytest.mark.slow  # the `reported` series
def test_config_fields_of_a_params_file_reach_notebooks_as_options(reported):
    nb = nbformat.read(str(reported["out"] / "00_ok.ipynb"), as_version=4)
    assert nb.metadata["fiseclip"]["parameters"]["options"] == {"sigma": 2}


@pytest.mark.slow  # the `reported` series
def test_index_is_a_record_with_links_badges_and_metadata(reported):
    out, first = reported["out"], reported["first"]
    assert [r["name"] for r in reported["again"]] == ["02_widget"]
    rows = {r["name"]: r for r in json.loads((out / "index.json").read_text())["reports"]}
    assert sorted(rows) == ["00_ok", "01_fragile", "02_widget", "03_lying"]  # --only keeps the other rows
    assert rows["00_ok"] == first["00_ok"] and rows["02_widget"]["run_date"] != first["02_widget"]["run_date"]
    ok = rows["00_ok"]
    assert ok["badge"]["level"] == "random" and rows["02_widget"]["badge"]["level"] == "pretrained"
    assert ok["params"]["pretrained"] == "none" and ok["wall_s"] > 0
    assert ok["links"]["tables"] == {"t": "_runs/t.csv"} and (out / ok["links"]["tables"]["t"]).is_file()
    page = (out / "index.html").read_text()
    assert "_runs/t.csv" in page and "00_ok.ipynb" in page and "random CLIP (m)" in page
    nb = nbformat.read(str(out / "00_ok.ipynb"), as_version=4)
    assert nb.metadata["fiseclip"]["result"] == "label is from-params $a$"  # the record travels with the notebook
    assert result_record(nb)["tables"]["t"].endswith("t.csv")


@pytest.mark.slow  # the `reported` series
def test_math_becomes_mathml_and_names_stay_text(reported):
    out = reported["out"]
    page = (out / "00_ok.html").read_text()
    assert "<math" in page and "<mfrac>" in page and 'display="block"' in page
    assert "mathjax" not in page.lower()
    assert not re.search(r"""(src=|import\()["']https?://""", page)  # nothing to fetch: the page reads offline
    assert "$code$" in page  # code spans are not math
    # a `$` in data (here a parameter quoted by the result line) is shown as typed, never typeset
    assert page.count("<math") == 2 and "label is from-params $a$" in page
    assert "label is from-params $a$" in (out / "index.html").read_text()


def test_markdown_math_conversion_rules():
    s = markdown_math_to_mathml(r"a $x_1$ b $$\frac{a}{b}$$ c \$5 and $5, `$y$` d $ e $")
    assert s.count("<math") == 2 and "`$y$`" in s and r"\$5" in s and "$ e $" in s
    assert markdown_math_to_mathml("costs $5 and $6") == "costs $5 and $6"
    assert markdown_math_to_mathml("a $x +\ny$ b").count("<math") == 1  # a formula may wrap
    assert markdown_math_to_mathml("a $x\n\ny$ b") == "a $x\n\ny$ b"  # but not over a paragraph break


def test_badge_levels():
    clip = {"model": "tiny", "pretrained": False, "kind": "CLIP"}
    cnn = {"model": "eff", "pretrained": True, "kind": "CNN"}
    sim = {"model": "SIMULATED text map", "pretrained": None, "kind": "simulated"}
    assert weights_badge([clip], True)["level"] == "random"
    assert weights_badge([cnn, sim], False)["level"] == "pretrained"
    b = weights_badge([clip, cnn], False)
    assert b["level"] == "mixed" and "random CLIP (tiny)" in b["text"] and "pretrained CNN (eff)" in b["text"]
    assert weights_badge([], True)["level"] == "pretrained"
    assert "names no sources" in weights_badge([], False)["text"]  # a guess from the parameter says so


def test_the_page_banner_follows_the_numbers():
    from fiseclip_lib.notebook.report import page_banner

    clip = {"model": "tiny", "pretrained": False, "kind": "CLIP"}
    cnn = {"model": "eff", "pretrained": True, "kind": "CNN"}
    assert page_banner(weights_badge([cnn], False)) == ""  # notebook 02: CNN numbers, random CLIP loaded
    assert "RANDOM WEIGHTS" in page_banner(weights_badge([clip], True))
    mixed = page_banner(weights_badge([clip, cnn], True))
    assert mixed.count("RANDOM WEIGHTS") == 1 and "random CLIP (tiny)" in mixed and "pretrained CNN" not in mixed


def test_stale_temporaries_of_our_naming_are_removed(tmp_path):
    (tmp_path / "_runs" / "a").mkdir(parents=True)
    ours = [tmp_path / ".00_x.ab12cd34.tmp.html", tmp_path / ".index.zz99yy88.tmp.json",
            tmp_path / "_runs" / "a" / ".metrics.q1w2e3r4.tmp.csv"]
    theirs = [tmp_path / ".hidden", tmp_path / "notes.tmp.txt", tmp_path / ".fiseclip.lock",
              tmp_path / ".x.short.tmp.csv"]
    for p in ours + theirs:
        p.write_text("x")
    removed = clean_debris(tmp_path)
    assert sorted(removed) == sorted(ours)
    assert all(p.exists() for p in theirs)


def test_only_selects_and_rejects_unknown(tmp_path):
    books = make_books(tmp_path / "nbs")
    assert [b.stem for b in list_notebooks(books, "00")] == ["00_ok"]
    assert [b.stem for b in list_notebooks(books, "00,02_widget")] == ["00_ok", "02_widget"]
    with pytest.raises(Exception, match="no such notebook"):
        list_notebooks(books, "07")
    for empty in (",", " , ", ""):  # a list that names nothing is a mistake, not "every notebook"
        with pytest.raises(FiseclipError, match="names no notebook"):
            list_notebooks(books, empty)


@pytest.mark.parametrize("timeout", [0, -5, float("nan"), float("inf")])
def test_a_cell_timeout_that_allows_nothing_is_refused_before_any_work(tmp_path, timeout):
    from fiseclip_lib.notebook.report import run_reports

    with pytest.raises(FiseclipError, match="positive number of seconds"):
        run_reports(tmp_path / "out", {}, timeout=timeout, verbose=False)
    assert not (tmp_path / "out").exists()


def test_shipped_notebooks_are_lessons_without_copies():
    from pathlib import Path

    books = sorted(b for b in Path(__file__).resolve().parent.parent.joinpath("notebooks").glob("0*_*.ipynb")
                   if b.stem[:2] != "06")  # 06 reads a finished sweep: a report page, not a lesson
    assert [b.stem[:2] for b in books] == ["00", "01", "02", "03", "04", "05", "07"]  # the lesson series
    for b in books:
        nb = nbformat.read(str(b), as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, b.name
        assert nb.cells[0].cell_type == "markdown"
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{b.name}: clear outputs"
        src = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
        assert f'wb.setup("{b.stem}"' in src, b.name  # one setup call, no copied setup block
        assert "load_encoder(cfg" not in src and "FiseConfig(" not in src, b.name
        assert ".result(" in src and "print(" not in src, b.name
        assert "## Exercises" in text and "## References" in text and "What to look for" in text, b.name
        assert "$" in text, b.name  # equations
    for stem in ("01", "03"):
        nb = nbformat.read(str(next(b for b in books if b.stem.startswith(stem))), as_version=4)
        assert "params/classroom.yaml" in "".join(c.source for c in nb.cells[:2]), stem


def test_every_parameter_line_of_the_shipped_notebooks_is_read_by_papermill():
    """papermill reads a parameter only from a line it can parse (`name = value  # help`); an apostrophe in
    the help text made it skip `norm_image_size` with a warning, so `--params` could not be checked against it."""
    import ast
    from pathlib import Path

    from papermill.translators import PythonTranslator

    for b in sorted(Path(__file__).resolve().parent.parent.joinpath("notebooks").glob("0*.ipynb")):
        cell = next(c for c in nbformat.read(str(b), as_version=4).cells
                    if "parameters" in c.metadata.get("tags", []))
        assigned = [t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign)
                    for t in node.targets]
        read = [p.name for p in PythonTranslator.inspect(cell)]
        assert read == assigned, b.name


@pytest.mark.slow  # a fresh process running a kernel, terminated
def test_a_terminated_report_leaves_no_temporary_file(tmp_path):
    books = tmp_path / "nbs"
    books.mkdir()
    running = tmp_path / "cell-running"  # written by the slow cell once it runs
    write_nb(books / "00_slow.ipynb", "pretrained = 'none'",
             f"import pathlib, time\npathlib.Path({str(running)!r}).write_text('x')\ntime.sleep(120)")
    out = tmp_path / "out"
    proc = Fresh(cli, ["report", "--notebooks", str(books), "--out", str(out)])
    deadline = time.time() + 240
    while time.time() < deadline and not running.exists() and proc.poll() is None:
        time.sleep(0.05)
    assert list(out.glob(".00_slow.*.tmp.ipynb")), "the report never started writing"
    assert running.exists(), "the slow cell never ran"
    proc.terminate()  # SIGTERM
    code, text = proc.wait(120)
    assert code not in (0, None), text
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]


def _kernel_children() -> list[int]:
    """Live kernel processes started by this process."""
    import os
    from pathlib import Path

    found = []
    for d in Path("/proc").iterdir():
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and b"ipykernel" in cmd:
            found.append(int(d.name))
    return found


@pytest.mark.slow  # notebook kernels
def test_warm_kernels_bind_no_names_and_none_outlives_the_series(tmp_path, monkeypatch):
    """The next notebook's kernel imports its modules ahead of time, but binds no name (a notebook that uses a
    module before importing it still fails), and no kernel is left running: not after the series, not after an
    interrupt while a warm kernel was still importing."""
    import fiseclip_lib.notebook.report as R

    books = tmp_path / "nbs"
    books.mkdir()
    write_nb(books / "00_a.ipynb", "pretrained = 'none'", "x = 1")
    write_nb(books / "01_b.ipynb", "pretrained = 'none'", "pid = os.getpid()\nimport os")  # os used too early
    write_nb(books / "02_c.ipynb", "pretrained = 'none'", "import os\npid = os.getpid()")
    assert R._imports_of(books / "01_b.ipynb") == ["os"]
    res = run_reports(tmp_path / "out", {}, notebooks_dir=books, verbose=False)
    assert [(r["status"], r["error"].split(":")[0]) for r in res] == [("ok", ""), ("failed", "NameError"),
                                                                       ("ok", "")]
    assert _kernel_children() == []

    def interrupted(self, timeout):
        raise KeyboardInterrupt

    monkeypatch.setattr(R._WarmKernel, "ready", interrupted)  # Ctrl-C while 01's warm kernel is importing
    with pytest.raises(KeyboardInterrupt):
        run_reports(tmp_path / "out2", {}, notebooks_dir=books, verbose=False)
    assert _kernel_children() == []


def test_recorded_versions_are_those_of_the_module_an_import_would_load(tmp_path, monkeypatch):
    """Read from the installed distribution without importing it, unless another copy comes first on sys.path
    (a checkout, an editable install): then that copy's own version."""
    import sys
    from importlib import metadata

    from fiseclip_lib.plumbing.provenance import _module_version

    monkeypatch.delitem(sys.modules, "papermill", raising=False)  # restored afterwards
    assert _module_version("papermill", "papermill") == metadata.version("papermill")
    assert "papermill" not in sys.modules  # the version came without the import
    (tmp_path / "papermill").mkdir()
    (tmp_path / "papermill" / "__init__.py").write_text('__version__ = "0.0-shadow"\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _module_version("papermill", "papermill") == "0.0-shadow"
    assert _module_version("no_such_module_xyz", "no-such-dist") is None


@pytest.mark.slow  # a notebook kernel
def test_a_notebook_papermill_cannot_read_stops_the_series_before_it_starts(tmp_path, capsys):
    books = tmp_path / "nbs"
    books.mkdir()
    write_nb(books / "00_ok.ipynb", "pretrained = 'none'", "x = 1")
    (books / "01_broken.ipynb").write_text('{"cells": [ broken')
    out = tmp_path / "out"
    assert main(["report", "--notebooks", str(books), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "01_broken.ipynb cannot be read" in err[0] and "--only" in err[0], err
    assert not list(out.glob("*.html"))  # nothing ran
    assert main(["report", "--notebooks", str(books), "--out", str(out), "--only", "00"]) == 0


def test_tracked_notebooks_are_tidy_so_jupyterlab_leaves_no_diff():
    """Every tracked notebook has the metadata JupyterLab writes for the venv kernel, no outputs and no
    execution counts (`python -m fiseclip_lib.notebook.tidy notebooks/*.ipynb` puts them in that form)."""
    from pathlib import Path

    from fiseclip_lib.notebook.tidy import untidy

    books = sorted(Path(__file__).resolve().parent.parent.joinpath("notebooks").glob("*.ipynb"))
    assert books
    found = {b.name: untidy(nbformat.read(str(b), as_version=4)) for b in books}
    untidy_books = {k: v[0] for k, v in found.items() if v}
    assert not untidy_books, f"run: python -m fiseclip_lib.notebook.tidy notebooks/*.ipynb ({untidy_books})"


def test_tidy_pins_metadata_strips_outputs_and_keeps_tags(tmp_path, capsys):
    from fiseclip_lib.notebook.tidy import LAB_KERNELSPEC, main, untidy

    path = tmp_path / "07_x.ipynb"
    write_nb(path, "a = 1", "print(a)")
    nb = nbformat.read(str(path), as_version=4)
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", text="1\n")]
    nb.cells[2].execution_count = 3
    nb.cells[2].metadata["scrolled"] = True  # what JupyterLab's UI adds
    nb.metadata["language_info"] = {"name": "python", "version": "3.11.7"}
    nbformat.write(nb, str(path))
    assert main(["--check", str(path)]) == 1 and "not tidy" in capsys.readouterr().out
    assert main([str(path)]) == 0
    tidy = nbformat.read(str(path), as_version=4)
    assert untidy(tidy) == [] and tidy.metadata["kernelspec"] == LAB_KERNELSPEC
    assert tidy.cells[1].metadata["tags"] == ["parameters"] and tidy.cells[2].outputs == []
    assert [c.source for c in tidy.cells] == [c.source for c in nb.cells]  # the lesson itself is untouched
    before = path.stat().st_mtime_ns
    assert main([str(path)]) == 0 and path.stat().st_mtime_ns == before  # tidy: not rewritten
    bad = tmp_path / "bad.ipynb"
    bad.write_text("{not json")
    with pytest.raises(Exception, match="bad.ipynb: not a readable notebook"):
        main([str(bad)])
