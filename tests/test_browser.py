"""Every HTML report, opened in a real browser (headless Chromium): math rendered, no raw `$...$`, no error
outputs, every figure loaded, every index link resolving.

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

from fiseclip_lib.notebook.report import markdown_math_to_mathml, run_reports

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
  const out = {
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


def open_in_browser(page: Path, scratch: Path) -> dict:
    """Load a copy of `page` (with the check script) in headless Chromium; return what the script found."""
    scratch.mkdir(parents=True, exist_ok=True)
    copy = scratch / page.name
    html = page.read_text(encoding="utf-8")
    copy.write_text(html.replace("</body>", CHECK + "</body>", 1) if "</body>" in html else html + CHECK,
                    encoding="utf-8")
    proc = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--no-first-run", "--virtual-time-budget=15000", "--dump-dom", copy.as_uri()],
                          capture_output=True, text=True, timeout=180)
    m = re.search(r'<pre id="fiseclip-check">(.*?)</pre>', proc.stdout, re.S)
    assert m, f"{page.name}: the browser returned no check result (exit {proc.returncode}): {proc.stderr[-500:]}"
    return json.loads(m.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))


def test_every_report_reads_in_a_browser(report_dir, tmp_path):
    rows = json.loads((report_dir / "index.json").read_text())["reports"]
    assert rows
    checked = []
    for r in rows:
        page = report_dir / r["links"]["html"]
        nb = nbformat.read(str(report_dir / r["links"]["ipynb"]), as_version=4)
        formulas = any(markdown_math_to_mathml(c.source) != c.source for c in nb.cells if c.cell_type == "markdown")
        figures = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
        found = open_in_browser(page, tmp_path / "pages")
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
