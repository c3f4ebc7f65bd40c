"""What a careful reader of a report would catch, as plain functions over the executed notebook and its HTML.

`fiseclip report` runs `check_notebook` and `check_html` on every notebook it writes (a finding fails that
notebook, so the command exits 1), and `tests/test_browser.py` runs them again on the pages a browser opened,
together with `network_requests` over the browser's own log of what the page fetched. Each returns a list of
one-line findings (empty: nothing found), so each check is unit-tested on small broken fixtures.

- `missing_figures`: a code cell that shows a figure (`plt.show()`, a `plots.*` figure function, `plt.subplots`)
  has at least as many images in its outputs (a library call that switches the backend drops them silently);
- `tex_leaks`: no figure text shows raw TeX. Every figure shown inside `fiseclip report` carries the texts drawn
  on it (`workbench.FIGURE_TEXT_MIME`, from `plots.figure_texts`: the strings matplotlib renders and whether it
  typesets them), so the check reads what is on the PNG without OCR: a text drawn as plain text that holds TeX
  markup (`\\mathdefault`, `\\frac`, `^{...}`) is raw TeX on the picture; text/plain and SVG outputs are searched
  for `\\mathdefault` too;
- `claim_failures`: every claim (`claims.CLAIM_MIME`) says what its recorded numbers say (`claims.check_claim`);
- `duplicated_blocks`: at most one random-weights banner and one provenance block per page;
- `external_references`: the HTML names nothing to fetch from the network (scripts, styles, images, frames);
- `network_requests`: the requests a page made, from a Chromium net log (`--log-net-log`), outside file:/data:.
"""
from __future__ import annotations

import ast
import html
import json
import re
from pathlib import Path

from fiseclip_lib.notebook.claims import CLAIM_MIME, check_claim
from fiseclip_lib.notebook.workbench import FIGURE_TEXT_MIME, PROVENANCE_CLASS
from fiseclip_lib.plumbing.provenance import RANDOM_WEIGHTS_NOTE

IMAGE_TYPES = ("image/png", "image/svg+xml", "image/jpeg")
# plots.* functions that return a figure (the inline backend shows it at the end of the cell)
FIGURE_FUNCTIONS = {"show_maps", "show_patch_maps", "show_attention", "show_keep", "bar_metrics", "line_metrics",
                    "show_reference_distances"}
FIGURE_MAKERS = {"subplots", "figure", "subplot_mosaic"}  # plt.* calls that open a figure
# TeX markup that mathtext would typeset: seen in a text drawn as plain text, it is raw TeX on the picture
_TEX = re.compile(r"\\(mathdefault|math[a-z]+|frac|sqrt|times|cdot|[A-Za-z]+\{)|[\^_]\{")
_LOCAL_SCHEMES = ("file", "data", "blob", "about", "javascript")


def _outputs(cell) -> list[dict]:
    return [o for o in cell.get("outputs", []) if o.get("output_type") in ("display_data", "execute_result")]


def mime_records(nb, mime: str):
    """Every record of one MIME type the notebook displayed, decoded: (cell index, cell, dict) in order.

    Args:
        nb: an executed notebook; mime: e.g. `claims.CLAIM_MIME`.
    Returns:
        A generator of (i, cell, record); a record stored as JSON text is parsed.
    """
    for i, cell in enumerate(nb["cells"]):
        for o in _outputs(cell):
            rec = o.get("data", {}).get(mime)
            if rec is not None:
                yield i, cell, json.loads(rec) if isinstance(rec, str) else dict(rec)


def _source(cell) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _cell_label(i: int, cell) -> str:
    first = next((line.strip() for line in _source(cell).splitlines() if line.strip()), "")
    return f"cell {i + 1} ({first[:50]})"


def figures_drawn(source: str) -> int:
    """How many figures a code cell shows at least, read from its code: each `plt.show()` (one, also in a loop)
    outside function definitions, else 1 when it calls a `plots.*` figure function or opens a figure with
    `plt.subplots` / `plt.figure` (the inline backend shows open figures at the end of the cell); 0 for code
    that is not plain Python (magics).

    Args:
        source: the cell's code.
    Returns:
        The lower bound on the images its output must hold.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return 0
    shows, makes = 0, False
    stack = [(tree, False)]
    while stack:  # a call in a loop is one node: it counts once
        node, in_def = stack.pop()
        in_def = in_def or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef))
        if not in_def and isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            if owner == "plt" and node.func.attr == "show":
                shows += 1
            elif (owner == "plots" and node.func.attr in FIGURE_FUNCTIONS) or \
                    (owner == "plt" and node.func.attr in FIGURE_MAKERS):
                makes = True
        stack.extend((child, in_def) for child in ast.iter_child_nodes(node))
    return shows or int(makes)


def missing_figures(nb) -> list[str]:
    """Code cells that show fewer images than their code draws (`figures_drawn`); cells that raised are left to
    the error checks.

    Args:
        nb: an executed notebook (nbformat node or its JSON dict).
    Returns:
        One line per short cell.
    """
    found = []
    for i, cell in enumerate(nb["cells"]):
        if cell.get("cell_type") != "code" or any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
            continue
        want = figures_drawn(_source(cell))
        have = sum(any(t in o.get("data", {}) for t in IMAGE_TYPES) for o in _outputs(cell))
        if have < want:
            found.append(f"{_cell_label(i, cell)} draws {want} figure(s) but its output holds {have} image(s)")
    return found


def tex_leaks(nb) -> list[str]:
    """Figure texts drawn as plain text that hold TeX markup (raw TeX a reader sees), from the figure texts the
    report records beside each image; `\\mathdefault` in text/plain or SVG outputs too.

    Args:
        nb: an executed notebook.
    Returns:
        One line per leaking text.
    """
    found = [f"{_cell_label(i, cell)}: figure text shows raw TeX {t['text']!r}"
             for i, cell, rec in mime_records(nb, FIGURE_TEXT_MIME) for t in rec.get("texts", [])
             if not t.get("math") and _TEX.search(t.get("text", ""))]
    for i, cell in enumerate(nb["cells"]):
        for o in _outputs(cell):
            data = o.get("data", {})
            for kind in ("text/plain", "image/svg+xml"):
                text = data.get(kind, "")
                text = "".join(text) if isinstance(text, list) else str(text)
                if "\\mathdefault" in text:
                    found.append(f"{_cell_label(i, cell)}: {kind} output shows raw TeX (\\mathdefault)")
    return found


def claim_failures(nb) -> list[str]:
    """Claims whose stated sentence is not what their recorded numbers say (`claims.check_claim`).

    Args:
        nb: an executed notebook.
    Returns:
        One line per failing claim.
    """
    return [f"{_cell_label(i, cell)}: {problem}" for i, cell, rec in mime_records(nb, CLAIM_MIME)
            if (problem := check_claim(rec))]


def check_notebook(nb) -> list[str]:
    """All notebook-level checks: missing figures, raw TeX in figures, claims against their numbers."""
    return missing_figures(nb) + tex_leaks(nb) + claim_failures(nb)


_BANNER_START = RANDOM_WEIGHTS_NOTE.split(";")[0]  # the banner's opening clause (no character HTML escapes)
_PROVENANCE_RE = re.compile(r"""class=["'][^"']*\b%s\b""" % re.escape(PROVENANCE_CLASS))


def duplicated_blocks(page: str) -> list[str]:
    """More than one random-weights banner, or more than one notebook provenance block, on one HTML page.

    Args:
        page: the HTML text.
    Returns:
        One line per duplicated kind.
    """
    found = []
    banners = page.count(_BANNER_START)
    if banners > 1:
        found.append(f"the random-weights banner is shown {banners} times (one per page: the report header)")
    blocks = len(_PROVENANCE_RE.findall(page))
    if blocks > 1:
        found.append(f"the provenance block is shown {blocks} times (a later show_provenance replaces the first)")
    return found


_FETCHING = re.compile(
    r"""<(?:script|img|iframe|audio|video|source|embed)\b[^>]*?\bsrc\s*=\s*["']?([^"'\s>]+)"""
    r"""|<link\b[^>]*?\bhref\s*=\s*["']?([^"'\s>]+)"""
    r"""|@import\s+(?:url\()?["']?([^"')\s;]+)"""
    r"""|url\(\s*["']?([^"')\s]+)"""
    r"""|\bimport\(\s*["']([^"']+)""", re.I)  # what the browser fetches by itself


_SCRIPT = re.compile(r"<script\b([^>]*)>(.*?)</script>", re.I | re.S)
_SCRIPT_URL = re.compile(r"""["'`]((?:https?:)?//[^"'`\s]+)""")


def _is_remote(url: str) -> bool:
    url = html.unescape(url).strip()
    if url.startswith("//"):
        return True
    scheme = url.split(":", 1)[0].lower() if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", url) else ""
    return bool(scheme) and scheme not in _LOCAL_SCHEMES


def external_references(page: str) -> list[str]:
    """URLs the HTML would fetch from the network (script/img/iframe src, stylesheet links, CSS url() and
    @import, dynamic import()); links a reader clicks (`<a href>`) are not fetched and not listed.

    Args:
        page: the HTML text.
    Returns:
        One line per remote URL.
    """
    urls = [next(g for g in m.groups() if g) for m in _FETCHING.finditer(page)]
    for m in _SCRIPT.finditer(page):  # a script that builds a URL to load (nbconvert's widget manager loader)
        kind = re.search(r"""\btype\s*=\s*["']?([^"'\s>]+)""", m.group(1))
        if kind is None or "javascript" in kind.group(1).lower() or kind.group(1).lower() == "module":
            urls += _SCRIPT_URL.findall(m.group(2))
    return [f"the page fetches {u}" for u in dict.fromkeys(urls) if _is_remote(u)]


def check_html(page: str) -> list[str]:
    """All page-level checks on the HTML text: duplicated banner or provenance, remote references."""
    return duplicated_blocks(page) + external_references(page)


def network_requests(netlog: Path) -> list[str]:
    """The network requests a page made, from a Chromium net log (`--log-net-log=FILE`), outside file:/data:.

    The browser's own traffic (update checks, account probes) is told apart by its initiator: requests of the
    page carry the page's origin ("null" for a file:// page), the browser's carry "not an origin".

    Args:
        netlog: the JSON file Chromium wrote (complete or cut off at exit).
    Returns:
        The requested URLs (once each).
    """
    text = Path(netlog).read_text(encoding="utf-8", errors="replace")
    try:
        log = json.loads(text)
    except ValueError:  # a log cut off mid-event: close the events list
        log = json.loads(text.rstrip().rstrip(",") + "]}")
    types = {v: k for k, v in log.get("constants", {}).get("logEventTypes", {}).items()}
    urls = []
    for e in log.get("events", []):
        p = e.get("params") or {}
        if types.get(e.get("type")) != "URL_REQUEST_START_JOB" or "url" not in p:
            continue
        if p.get("initiator") == "not an origin":
            continue
        if p["url"].split(":", 1)[0].lower() not in _LOCAL_SCHEMES:
            urls.append(p["url"])
    return list(dict.fromkeys(urls))
