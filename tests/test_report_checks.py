"""report_checks.py: each check passes a sound notebook/page and fails a deliberately broken one of its kind
(missing figure, raw TeX in a tick label, a claim against its numbers, a duplicated banner or provenance block,
a page that fetches from the network)."""
import html

import nbformat
import pytest

from fiseclip_lib.notebook import report_checks as rc
from fiseclip_lib.notebook.claims import CLAIM_MIME, state
from fiseclip_lib.notebook.workbench import FIGURE_TEXT_MIME, PROVENANCE_CLASS
from fiseclip_lib.plumbing.provenance import RANDOM_WEIGHTS_NOTE, banner_html

PNG = "iVBORw0KGgo="


def figure_output(texts=(("N", False), ("$\\mathdefault{2^{2}}$", True))):
    return nbformat.v4.new_output("display_data", data={
        "image/png": PNG, "text/plain": "<Figure size 640x480 with 1 Axes>",
        FIGURE_TEXT_MIME: {"texts": [{"text": t, "math": m} for t, m in texts]}})


def notebook(*cells):
    nb = nbformat.v4.new_notebook()
    for source, outputs in cells:
        c = nbformat.v4.new_code_cell(source)
        c.outputs = list(outputs)
        nb.cells.append(c)
    return nb


def test_figures_drawn_reads_the_code():
    assert rc.figures_drawn("fig = plots.show_maps(a, b)\nplt.show()\nfig2 = plots.bar_metrics(d)\nplt.show()") == 2
    assert rc.figures_drawn("for c in cats:\n    plots.show_keep(c)\n    plt.show()") == 1  # one call, >= 1 image
    assert rc.figures_drawn("fig, ax = plt.subplots()\nax.plot([1])") == 1  # shown at the end of the cell
    assert rc.figures_drawn("def view(x):\n    plots.show_maps(x)\n    plt.show()") == 0  # only defined here
    assert rc.figures_drawn("%matplotlib inline") == 0 and rc.figures_drawn("x = plots.weights_mark(True)") == 0


def test_missing_figure_is_found():
    good = notebook(("fig = plots.line_metrics(df, 'N', 'y')\nplt.show()", [figure_output()]))
    assert rc.missing_figures(good) == []
    # the fault of issue 21: a library call switched the kernel to Agg, plt.show() displayed nothing
    broken = notebook(("x = 1", []), ("fig = plots.line_metrics(df, 'N', 'y')\nplt.show()\nplt.show()",
                                      [figure_output()]))
    found = rc.missing_figures(broken)
    assert len(found) == 1 and "cell 2" in found[0] and "2 figure(s)" in found[0] and "1 image" in found[0]
    failed = notebook(("plt.show()", [nbformat.v4.new_output("error", ename="E", evalue="", traceback=[])]))
    assert rc.missing_figures(failed) == []  # a cell that raised is reported as an error, not a figure


def test_raw_tex_in_a_tick_label_is_found():
    assert rc.tex_leaks(notebook(("plt.show()", [figure_output()]))) == []
    names = figure_output([("cost $5 and $6", False), ("a$b$c", False)])  # dollars in names are data
    assert rc.tex_leaks(notebook(("plt.show()", [names]))) == []
    raw = figure_output([("$\\mathdefault{2^{2}}$", False)])  # the log axis under a global parse_math=False
    found = rc.tex_leaks(notebook(("plt.show()", [raw])))
    assert len(found) == 1 and "mathdefault" in found[0]
    plain = nbformat.v4.new_output("execute_result", data={"text/plain": "Text(0, 0, '$\\mathdefault{10^{1}}$')"})
    assert rc.tex_leaks(notebook(("ax.get_xticklabels()[0]", [plain])))


def claim_output(record):
    return nbformat.v4.new_output("display_data", data={"text/markdown": record["text"], CLAIM_MIME: record})


def test_a_claim_against_its_numbers_is_found():
    ok = state("growth", x=[1, 2, 4, 8], y=[1.0, 2.0, 4.0, 8.0], what="cost", of="N")
    assert rc.claim_failures(notebook(("wb.claim(...)", [claim_output(ok)]))) == []
    flat = state("growth", x=[1, 2, 4, 8], y=[1.0, 1.0, 1.0, 1.0], what="cost", of="N")
    lie = {**flat, "text": ok["text"]}  # "grows about linearly" on flat numbers
    found = rc.claim_failures(notebook(("wb.claim(...)", [claim_output(lie)])))
    assert len(found) == 1 and "stays flat" in found[0]
    assert rc.check_notebook(notebook(("wb.claim(...)", [claim_output(lie)]))) == found


def page(*blocks):
    return "<!doctype html><html><head></head><body>" + "".join(blocks) + "</body></html>"


def provenance_block():
    return f'<div class="tex2jax_ignore {PROVENANCE_CLASS}"><table><tr><td>seed</td></tr></table></div>'


def test_duplicated_banner_or_provenance_is_found():
    assert rc.duplicated_blocks(page(banner_html(False), provenance_block())) == []
    twice = rc.duplicated_blocks(page(banner_html(False), "<p>x</p>", banner_html(False)))
    assert len(twice) == 1 and "banner is shown 2 times" in twice[0]
    assert "provenance block is shown 2 times" in rc.duplicated_blocks(page(provenance_block(),
                                                                             provenance_block()))[0]
    assert RANDOM_WEIGHTS_NOTE.split(";")[0] in html.unescape(banner_html(False))


@pytest.mark.parametrize("fetching", [
    '<script src="https://unpkg.com/@jupyter-widgets/html-manager@*/dist/embed-amd.js"></script>',
    "<script>var widgetRendererSrc = 'https://unpkg.com/@jupyter-widgets/html-manager@*/dist/embed-amd.js';</script>",
    '<link rel="stylesheet" href="//cdn.example.org/x.css">',
    '<img src="http://example.com/a.png">',
    "<style>@import url('https://fonts.example.com/f.css');</style>",
    "<div style=\"background:url('https://example.com/b.png')\"></div>",
])
def test_a_page_that_fetches_from_the_network_is_found(fetching):
    assert rc.external_references(page(fetching))


def test_local_and_clicked_references_are_not_fetches():
    ok = page('<img src="data:image/png;base64,AAAA">', '<a href="https://github.com/x">a link</a>',
              '<math xmlns="http://www.w3.org/1998/Math/MathML"></math>', '<img src="figs/a.png">',
              '<script type="application/vnd.jupyter.widget-state+json">{"u": "https://x.org"}</script>')
    assert rc.external_references(ok) == []


def test_network_requests_from_a_net_log(tmp_path):
    import json

    types = {"URL_REQUEST_START_JOB": 1, "OTHER": 2}
    events = [
        {"type": 1, "params": {"url": "https://unpkg.com/x.js", "initiator": "null"}},  # the page's
        {"type": 1, "params": {"url": "https://update.googleapis.com/u", "initiator": "not an origin"}},  # browser
        {"type": 1, "params": {"url": "file:///tmp/a.png", "initiator": "null"}},
        {"type": 2, "params": {"url": "https://elsewhere.org/"}},
        {"type": 1, "params": {"net_error": -105}},
    ]
    log = tmp_path / "net.json"
    log.write_text(json.dumps({"constants": {"logEventTypes": types}, "events": events}))
    assert rc.network_requests(log) == ["https://unpkg.com/x.js"]
    cut = tmp_path / "cut.json"  # Chromium killed before closing the log
    cut.write_text(json.dumps({"constants": {"logEventTypes": types}, "events": events})[:-2] + ",\n")
    assert rc.network_requests(cut) == ["https://unpkg.com/x.js"]
