"""`fiseclip report`: run the numbered notebooks headless with papermill, render HTML, write an index.

Each notebook runs in its own kernel; one that fails still gets its executed notebook and HTML (showing the
error) and the others go on. Every HTML report starts with a provenance header (parameters, encoder and
whether its weights are random, dataset, seed, versions, git commit, wall time). The index links every
report with its one-line result (the notebook's `RESULT:` line).
"""
from __future__ import annotations

import ast
import html
import json
import os
import re
import time
from pathlib import Path

from ._io import atomic_path, output_lock, write_json_atomic, write_text_atomic
from .errors import FiseclipError
from .encoder import is_random_weights
from .provenance import banner_html, provenance
from .workbench import HEADLESS_ENV, RESULT_PREFIX

PATH_PARAMS = ("root", "run_dir")  # parameters that are paths: made absolute before reaching the notebooks


def default_notebooks_dir() -> Path:
    here = Path.cwd() / "notebooks"
    return here if here.is_dir() else Path(__file__).resolve().parent.parent / "notebooks"


def list_notebooks(notebooks_dir: Path, only: str | None = None) -> list[Path]:
    books = sorted(p for p in Path(notebooks_dir).glob("[0-9][0-9]_*.ipynb"))
    if not books:
        raise FiseclipError(f"no numbered notebooks (NN_name.ipynb) in {notebooks_dir}; pass --notebooks DIR")
    if only:
        wanted = [w.strip() for w in only.split(",") if w.strip()]
        chosen = [b for b in books if any(b.stem == w or b.stem.startswith(w) for w in wanted)]
        unknown = [w for w in wanted if not any(b.stem == w or b.stem.startswith(w) for b in books)]
        if unknown:
            raise FiseclipError(f"--only {','.join(unknown)}: no such notebook; available: "
                                f"{', '.join(b.stem for b in books)}")
        books = chosen
    return books


def _result_line(nb) -> str:
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            text = out.get("text", "") if out.get("output_type") == "stream" else ""
            for line in text.splitlines():
                if line.startswith(RESULT_PREFIX):
                    return line[len(RESULT_PREFIX):].strip()
    return ""


def _header(name: str, status: str, error: str, wall: float, params: dict, prov: dict) -> str:
    pretrained = not is_random_weights(params.get("pretrained", ""))
    rows = [("notebook", name), ("status", status + (f" ({error})" if error else "")), ("wall time", f"{wall:.1f} s"),
            ("encoder", f"{params.get('model', '?')} / weights {params.get('pretrained', '?')} / "
                        f"{params.get('image_size', '?')} px"),
            ("pretrained weights", "yes" if pretrained else "NO (random initialisation)"),
            ("dataset", f"{params.get('dataset', '?')} at {params.get('root', '?')}"),
            ("seed", params.get("seed", "?")), ("git commit", prov["git_commit"]),
            ("versions", ", ".join(f"{k} {v}" for k, v in prov["versions"].items())),
            ("parameters", json.dumps(params, sort_keys=True, default=str))]
    banner = banner_html(pretrained)
    body = "".join(f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(str(k))}</th>"
                   f"<td><code>{html.escape(str(v))}</code></td></tr>" for k, v in rows)
    return (f'<div id="fiseclip-provenance" style="font-family:sans-serif;border:1px solid #999;padding:8px;'
            f'margin:8px">{banner}<b>fiseclip report: {html.escape(name)}</b>'
            f'<table style="font-size:12px">{body}</table><a href="index.html">all reports</a></div>')


def _to_html(nb, header: str) -> str:
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    m = re.search(r"<body[^>]*>", body)
    return body[:m.end()] + header + body[m.end():] if m else header + body


def _notebook_params(path: Path) -> dict:
    """The defaults of a notebook's `parameters` cell (as papermill reads them)."""
    import papermill as pm

    out = {}
    for name, spec in pm.inspect_notebook(str(path)).items():
        try:
            out[name] = ast.literal_eval(spec["default"])
        except (ValueError, SyntaxError):
            out[name] = spec["default"]
    return out


def _index(out: Path, results: list[dict], prov: dict) -> None:
    rows = "".join(
        f"<tr><td><a href='{html.escape(r['name'])}.html'>{html.escape(r['name'])}</a></td>"
        f"<td style='color:{'green' if r['status'] == 'ok' else '#b00020'}'>{html.escape(r['status'])}</td>"
        f"<td>{r['wall_s']:.1f} s</td><td>{html.escape(r['result'] or r['error'])}</td></tr>" for r in results)
    banner = banner_html(all(r["pretrained"] for r in results))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>fiseclip reports</title></head>"
            f"<body style='font-family:sans-serif'><h1>fiseclip reports</h1>{banner}"
            f"<p>git commit <code>{html.escape(prov['git_commit'])}</code>, fiseclip "
            f"{html.escape(prov['versions'].get('fiseclip', '?'))}</p>"
            f"<table border='1' cellpadding='4' style='border-collapse:collapse'><tr><th>report</th><th>status</th>"
            f"<th>wall time</th><th>result</th></tr>{rows}</table></body></html>\n")
    write_text_atomic(out / "index.html", page)
    write_json_atomic(out / "index.json", {"reports": results, **prov})


CELL_TIMEOUT_S = 1800  # a cell that runs longer fails its notebook instead of stalling the whole series


def run_reports(out, params: dict | None = None, only: str | None = None, notebooks_dir=None,
                kernel_name: str = "python3", timeout: int | None = None) -> list[dict]:
    """Execute the notebooks into `out` (executed .ipynb + .html each, index.html); returns one record each.

    timeout: seconds allowed per cell (default CELL_TIMEOUT_S)."""
    from .run import ensure_writable

    timeout = timeout or CELL_TIMEOUT_S
    out = ensure_writable(out)
    with output_lock(out, command="fiseclip report"):
        return _run_reports_locked(out, params, only, notebooks_dir, kernel_name, timeout)


def _run_reports_locked(out: Path, params, only, notebooks_dir, kernel_name, timeout) -> list[dict]:
    notebooks_dir = Path(notebooks_dir) if notebooks_dir else default_notebooks_dir()
    params = dict(params or {})
    for key in PATH_PARAMS:
        if params.get(key) not in (None, ""):
            params[key] = str(Path(params[key]).expanduser().resolve())
    params.setdefault("run_dir", str((out / "_runs").resolve()))
    prov = provenance()
    results = []
    # Kernels inherit the environment: a headless MPLBACKEND=Agg there would drop every figure from the report,
    # and widgets have no frontend to talk to, so the notebooks show their static views instead.
    saved = {k: os.environ.get(k) for k in ("MPLBACKEND", HEADLESS_ENV)}
    os.environ.pop("MPLBACKEND", None)
    os.environ[HEADLESS_ENV] = "1"
    try:
        for book in list_notebooks(notebooks_dir, only):
            results.append(_run_one(book, out, params, notebooks_dir, kernel_name, timeout, prov))
            _index(out, results, prov)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return results


def _run_one(book: Path, out: Path, params: dict, notebooks_dir: Path, kernel_name: str, timeout, prov) -> dict:
    """Execute one notebook into `out` (.ipynb and .html, both even when it fails); return its record."""
    import nbformat
    import papermill as pm

    name = book.stem
    effective = {**_notebook_params(book), **params}
    print(f"[report] {name} ...", flush=True)
    t0 = time.time()
    status, error = "ok", ""
    with atomic_path(out / f"{name}.ipynb") as tmp:
        try:
            pm.execute_notebook(str(book), str(tmp), parameters=params, cwd=str(notebooks_dir),
                                kernel_name=kernel_name, progress_bar=False, execution_timeout=timeout)
        except pm.PapermillExecutionError as e:
            status, error = "failed", f"{e.ename}: {str(e.evalue).splitlines()[0] if e.evalue else ''}"
        except Exception as e:  # kernel died, bad notebook, ...
            status, error = "failed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if not tmp.exists() or tmp.stat().st_size == 0:
            nbformat.write(nbformat.read(str(book), as_version=4), str(tmp))
        nb = nbformat.read(str(tmp), as_version=4)
    wall = time.time() - t0
    write_text_atomic(out / f"{name}.html", _to_html(nb, _header(name, status, error, wall, effective, prov)))
    pretrained = not is_random_weights(effective.get("pretrained", ""))
    print(f"[report] {name}: {status} in {wall:.0f} s" + (f" ({error})" if error else ""), flush=True)
    return {"name": name, "status": status, "error": error, "wall_s": round(wall, 2),
            "result": _result_line(nb), "pretrained": pretrained}
