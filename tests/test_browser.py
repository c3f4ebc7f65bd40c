"""Every HTML report, opened in a real browser (headless Chromium): math rendered, no raw `$...$`, no error
outputs, every figure loaded, every index link resolving; and what a careful reader would catch: a cell that
draws a figure without an image, raw TeX in figure texts, a claim its numbers contradict, a duplicated banner or
provenance block (counted in the rendered page), and any network request the page makes (Chromium's net log:
every request is recorded, and none can leave, since every host name resolves to nothing). A screenshot of each
report is saved under `<reports>/screenshots/` (CI keeps `reports/` as its artifact). The same checks fail on a
deliberately broken report of each kind (`test_the_checks_fail_on_broken_reports`).

The reports are the ones README command 1 just wrote into `reports/` (CI runs it before the tests; set
FISECLIP_TEST_REPORTS=DIR to check another folder); where there are none, a minimal series (`--only 00`) is
generated into a temporary folder (one category, 112 px, no baseline encoder). Chromium comes from Debian
(`apt-get install chromium`; `.ci/run` installs it). The page is checked by a script added to a copy of it,
whose findings the browser writes into the DOM that `--dump-dom` prints: no WebDriver is needed.
"""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlparse

import nbformat
import pytest

from fiseclip_lib.notebook import report_checks
from fiseclip_lib.notebook.report import markdown_math_to_mathml, run_reports
from fiseclip_lib.notebook.workbench import PROVENANCE_CLASS
from fiseclip_lib.plumbing.provenance import RANDOM_WEIGHTS_NOTE

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # a real browser (and, without reports/, a report series first)

CHECK = r"""
<script>
window.addEventListener("load", () => {
  const text = document.body.innerText;
  const raw = text.match(/\$\$[\s\S]+?\$\$|\$(?=\S)[^$\n]{0,200}?\S\$(?!\d)|\$[A-Za-z]\$/g) || [];
  const maths = Array.from(document.querySelectorAll("math"));
  const errors = Array.from(document.querySelectorAll('[data-mime-type="application/vnd.jupyter.stderr"]'))
    .map(e => e.innerText).filter(t => /Traceback|^\w*Error\b|An Exception was encountered/m.test(t));
  const images = Array.from(document.images);
  const banners = Array.from(document.querySelectorAll("div"))
    .filter(d => Array.from(d.childNodes).some(n => n.nodeType === 3 && n.textContent.startsWith(BANNER)));
  const out = {
    banners: banners.length,
    provenance_blocks: document.querySelectorAll(".PROVENANCE").length,
    raw_math: raw.slice(0, 5),
    math: maths.length,
    math_unrendered: maths.filter(m => m.getBoundingClientRect().width <= 0).length,
    errors: errors.map(t => t.slice(0, 200)),
    images: images.length,
    broken_images: images.filter(i => !i.complete || i.naturalWidth === 0).map(i => (i.src || "").slice(0, 80)),
    links: Array.from(document.querySelectorAll("a[href]")).map(a => a.getAttribute("href")),
  };
  const pre = document.createElement("pre");
  pre.id = "fiseclip-check";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


REQUIRE_BROWSER = "FISECLIP_REQUIRE_BROWSER"  # set by .ci/run: there the browser checks can never skip


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    msg = "no Chromium for the browser checks: install it (Debian: apt-get install -y chromium) to run them"
    if os.environ.get(REQUIRE_BROWSER) == "1":
        pytest.fail(f"{msg} ({REQUIRE_BROWSER}=1 requires them)")
    pytest.skip(msg)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    """README command 1's reports (or the folder FISECLIP_TEST_REPORTS names) when present and complete, else a
    minimal series generated now (not without a browser to look at it)."""
    chromium()
    existing = Path(os.environ.get("FISECLIP_TEST_REPORTS") or REPO / "reports")
    index = existing / "index.json"
    if index.is_file():
        rows = json.loads(index.read_text())["reports"]
        if rows and all((existing / f"{r['name']}.html").is_file() for r in rows):
            return existing
    from fiseclip_lib.evaluation.demo import DEFAULT_CATEGORIES

    out = tmp_path_factory.mktemp("reports")
    # one category at 112 px, no second encoder: the same kinds of content (equations, figures, tables, links)
    # at a fraction of the cost
    results = run_reports(out, {"categories": DEFAULT_CATEGORIES[0], "image_size": 112, "baseline_model": ""},
                          only="00", notebooks_dir=REPO / "notebooks", verbose=False)
    assert [r["status"] for r in results] == ["ok"], results
    return out


def open_in_browser(page: Path, scratch: Path, screenshot: Path | None = None) -> dict:
    """Load a copy of `page` (with the check script) in headless Chromium; return what the script found, plus
    `requests`: the network requests the page made (from Chromium's net log; host names resolve to nothing, so
    none leaves the machine). Optionally save a screenshot of its first 1280 x 4000 pixels."""
    scratch.mkdir(parents=True, exist_ok=True)
    copy = scratch / page.name
    html = page.read_text(encoding="utf-8")
    check = CHECK.replace("BANNER", json.dumps(RANDOM_WEIGHTS_NOTE.split(";")[0])).replace("PROVENANCE",
                                                                                          PROVENANCE_CLASS)
    copy.write_text(html.replace("</body>", check + "</body>", 1) if "</body>" in html else html + check,
                    encoding="utf-8")
    netlog = scratch / f"{page.stem}.netlog.json"
    shot = [f"--screenshot={screenshot}", "--window-size=1280,4000"] if screenshot else []
    if screenshot:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--no-first-run", "--host-resolver-rules=MAP * ~NOTFOUND", f"--log-net-log={netlog}",
                           *shot, "--virtual-time-budget=15000", "--dump-dom", copy.as_uri()],
                          capture_output=True, text=True, timeout=180)
    m = re.search(r'<pre id="fiseclip-check">(.*?)</pre>', proc.stdout, re.S)
    assert m, f"{page.name}: the browser returned no check result (exit {proc.returncode}): {proc.stderr[-500:]}"
    found = json.loads(m.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
    found["requests"] = report_checks.network_requests(netlog)
    return found


def reader_findings(page: Path, ipynb: Path, found: dict) -> list[str]:
    """What a careful reader would catch on one report: the notebook checks (missing figures, raw TeX in figure
    texts, claims against their numbers), the page checks (duplicated blocks and remote references in the
    HTML), and, from the browser, the banners and provenance blocks as rendered and every network request."""
    nb = nbformat.read(str(ipynb), as_version=4)
    findings = report_checks.check_notebook(nb) + report_checks.check_html(page.read_text(encoding="utf-8"))
    if found["banners"] > 1:
        findings.append(f"the browser shows {found['banners']} random-weights banners")
    if found["provenance_blocks"] > 1:
        findings.append(f"the browser shows {found['provenance_blocks']} provenance blocks")
    findings += [f"the page requested {u}" for u in found["requests"]]
    return findings


def test_every_report_reads_in_a_browser(report_dir, tmp_path):
    rows = json.loads((report_dir / "index.json").read_text())["reports"]
    assert rows
    checked = []
    for r in rows:
        page = report_dir / r["links"]["html"]
        nb = nbformat.read(str(report_dir / r["links"]["ipynb"]), as_version=4)
        formulas = any(markdown_math_to_mathml(c.source) != c.source for c in nb.cells if c.cell_type == "markdown")
        figures = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
        found = open_in_browser(page, tmp_path / "pages", report_dir / "screenshots" / f"{r['name'][:2]}.png")
        assert reader_findings(page, report_dir / r["links"]["ipynb"], found) == [], page.name
        assert (report_dir / "screenshots" / f"{r['name'][:2]}.png").stat().st_size > 0
        assert found["raw_math"] == [], f"{page.name}: formulas left as text: {found['raw_math']}"
        assert found["math_unrendered"] == 0, f"{page.name}: math not rendered: {found}"
        assert (found["math"] > 0) == formulas, f"{page.name}: {found['math']} math elements, formulas: {formulas}"
        assert found["errors"] == [], f"{page.name}: error outputs: {found['errors']}"
        assert found["images"] >= figures and found["broken_images"] == [], f"{page.name}: figures: {found}"
        assert not [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
        checked.append((page.name, formulas, figures))
    # the lesson notebooks all have equations and figures
    assert any(f and n for _, f, n in checked), checked


def test_index_links_resolve(report_dir, tmp_path):
    found = open_in_browser(report_dir / "index.html", tmp_path / "index")
    local = [h for h in found["links"] if not urlparse(h).scheme]
    rows = json.loads((report_dir / "index.json").read_text())["reports"]
    assert len(local) >= 2 * len(rows)  # HTML and .ipynb of every row, plus the CSVs
    missing = [h for h in local if not (report_dir / unquote(urlparse(h).path)).is_file()]
    assert missing == [], f"index links to missing files: {missing}"
    assert any(h.endswith(".csv") for h in local), "the index links no CSV of the runs"


def broken_report(folder: Path, kind: str) -> tuple[Path, Path]:
    """A tiny report (HTML page and executed notebook) with one fault of `kind`, built like the real ones: an
    image output beside its figure texts, the provenance block and banner as the workbench and header write
    them."""
    import html as _html

    from fiseclip_lib.notebook.workbench import FIGURE_TEXT_MIME
    from fiseclip_lib.plumbing.provenance import banner_html

    png = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")
    tick = "$\\mathdefault{2^{2}}$"
    texts = [{"text": tick, "math": kind != "tex"}]
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("fig = plots.line_metrics(df, 'N', 'y', logx=True)\nplt.show()")
    if kind != "figure":
        cell.outputs = [nbformat.v4.new_output("display_data", data={"image/png": png, FIGURE_TEXT_MIME: {"texts": texts}})]
    nb.cells = [cell]
    ipynb = folder / f"{kind}.ipynb"
    nbformat.write(nb, str(ipynb))
    block = f'<div class="{PROVENANCE_CLASS}"><table><tr><td>seed</td><td>0</td></tr></table></div>'
    body = [banner_html(False), block, f'<img alt="figure" src="data:image/png;base64,{png}">',
            f"<p>{_html.escape(tick) if kind == 'tex' else 'a figure'}</p>"]
    if kind == "banner":
        body.append(banner_html(False))
    if kind == "network":  # a script the page builds at run time: only the browser's log sees it for sure
        body.append("<script>const s = document.createElement('img'); "
                    "s.src = ['https:', '', 'unpkg.com', 'x.png'].join('/'); document.body.appendChild(s);</script>")
    page = folder / f"{kind}.html"
    page.write_text("<!doctype html><html><head><meta charset='utf-8'></head><body>" + "".join(body)
                    + "</body></html>", encoding="utf-8")
    return page, ipynb


def test_the_checks_fail_on_broken_reports(tmp_path):
    """The same checks as above, on a deliberately broken report of each kind: each is caught, a sound one is
    not."""
    expected = {"sound": None, "figure": "0 image", "tex": "raw TeX", "banner": "banner",
                "network": "requested https://unpkg.com/x.png"}
    for kind, needle in expected.items():
        page, ipynb = broken_report(tmp_path, kind)
        findings = reader_findings(page, ipynb, open_in_browser(page, tmp_path / "pages"))
        if needle is None:
            assert findings == [], findings
        else:
            assert any(needle in f for f in findings), (kind, findings)
    banner_page, _ = broken_report(tmp_path, "banner")
    assert open_in_browser(banner_page, tmp_path / "again")["banners"] == 2  # counted as the reader sees it
