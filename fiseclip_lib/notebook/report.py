"""`fiseclip report`: run the numbered notebooks headless with papermill, render HTML, keep an index.

Each notebook runs in its own kernel (the next notebook's kernel starts, and imports what that notebook
imports, while the current one runs); one that fails still gets its executed notebook and HTML (showing the
error) and the others go on. The terminal shows each notebook's progress (cell k of n, elapsed seconds); the
kernel's own log lines (its TCP notice, shutdown interrupts) go to a scratch file that is shown only when a
notebook fails outside its cells.

What a notebook found reaches the report as data, not as scraped text: `workbench.result` displays a
`application/vnd.fiseclip.result+json` output (the finding, the encoders its numbers come from, the CSVs
behind them). The report copies that record into the executed notebook's metadata (`metadata.fiseclip`) and
into `index.json`, which is a record across runs: `--only 02` replaces row 02 and keeps the others. The index
shows per notebook its run date, parameters (dataset, model, weights, size), wall time, a weights badge built
from the declared encoders (random CLIP / pretrained CNN / simulated), and links to the HTML, the executed
notebook and the CSVs.

Math without a network: the reports must read offline, so formulas are converted to MathML when the report is
written (`latex2mathml`, a small pure-Python package), and the HTML loads no MathJax. MathML Core renders
natively in current Chromium, Firefox and Safari, the HTML stays one self-contained file (no 30 MB MathJax
copy to vendor next to it), and only Markdown cells are converted: a `$` in an output (a category or file name
in a table or result line) is never typeset, because nothing typesets outputs. In JupyterLab the notebooks use
its bundled MathJax, which also works offline; tables the workbench shows are marked for MathJax to ignore.

Labels that tell the truth: each page has one random-weights banner, in its header, decided by what the result
record says the numbers come from (`page_banner`); the notebook's provenance block shows none in reports. No
request leaves a page: besides MathJax, the template drops nbconvert's widget-manager loader (it fetches
@jupyter-widgets/html-manager from unpkg whenever a notebook carries widget state) and the executed notebook
keeps no widget state (headless, widgets are static views). What a careful reader would catch
(`report_checks`: a figure without its image, raw TeX in figure texts, a claim against its numbers, a
duplicated banner or provenance block, a remote reference) fails the notebook, with the findings in its row.

Writing is atomic (temporary name, then rename); at start, under the output folder's lock, temporary files of
our own naming that a killed run left behind (`.NAME.XXXXXXXX.tmp.SUFFIX`) are removed.
"""
from __future__ import annotations

import ast
import contextlib
import datetime as _dt
import html
import json
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

from fiseclip_lib.plumbing.files import atomic_path, output_lock, remove_debris, write_json_atomic, write_text_atomic
from fiseclip_lib.encoder import is_random_weights
from fiseclip_lib.errors import FiseclipError
from fiseclip_lib.plumbing.provenance import banner_html, provenance
from fiseclip_lib.notebook.report_checks import check_html, check_notebook, mime_records
from fiseclip_lib.notebook.workbench import HEADLESS_ENV, IGNORE_MATH_CLASS, RESULT_MIME

PATH_PARAMS = ("root", "run_dir", "sweep_dir")  # parameters that are paths: made absolute before reaching the notebooks
INDEX_PARAMS = ("dataset", "model", "pretrained", "image_size", "batch_size", "seed")  # shown per index row
CELL_TIMEOUT_S = 1800  # a cell that runs longer fails its notebook instead of stalling the whole series


def default_notebooks_dir() -> Path:
    here = Path.cwd() / "notebooks"
    return here if here.is_dir() else Path(__file__).resolve().parent.parent / "notebooks"


def list_notebooks(notebooks_dir: Path, only: str | None = None) -> list[Path]:
    books = sorted(p for p in Path(notebooks_dir).glob("[0-9][0-9]_*.ipynb"))
    if not books:
        raise FiseclipError(f"no numbered notebooks (NN_name.ipynb) in {notebooks_dir}; pass --notebooks DIR")
    if only is not None:
        wanted = [w.strip() for w in only.split(",") if w.strip()]
        if not wanted:
            raise FiseclipError(f"--only {only!r} names no notebook; give comma-separated names or number prefixes, "
                                f"e.g. 00,03")
        chosen = [b for b in books if any(b.stem == w or b.stem.startswith(w) for w in wanted)]
        unknown = [w for w in wanted if not any(b.stem == w or b.stem.startswith(w) for b in books)]
        if unknown:
            raise FiseclipError(f"--only {','.join(unknown)}: no such notebook; available: "
                                f"{', '.join(b.stem for b in books)}")
        books = chosen
    return books


# ------------------------------------------------------------------------------------------ math

_FENCE = re.compile(r"(```.*?```|~~~.*?~~~|`[^`\n]*`)", re.S)
_DISPLAY = re.compile(r"\$\$(.+?)\$\$", re.S)
# Inline math as pandoc reads it: no space after the opening `$`, none before the closing one, no digit after
# it (so "costs $5 and $6" stays text), an escaped `\$` is a dollar sign; it may wrap over lines, not paragraphs.
_INLINE = re.compile(r"(?<![\\$])\$(?![\s$])((?:\\.|[^$\\\n]|\n(?!\s*\n))+?)(?<!\s)\$(?!\d)")


def latex_to_mathml(tex: str, display: bool = False) -> str:
    """One formula -> MathML (inline or block); a formula latex2mathml cannot read is shown as code."""
    from latex2mathml.converter import convert

    try:
        return convert(tex.strip(), display="block" if display else "inline")
    except Exception as e:  # noqa: BLE001 - any parser failure: keep the text readable, say which formula
        warnings.warn(f"formula not converted to MathML ({type(e).__name__}): {tex.strip()[:60]}")
        return f"<code class='math-error'>{html.escape(tex.strip())}</code>"


def markdown_math_to_mathml(source: str) -> str:
    """Markdown with `$...$` / `$$...$$` -> the same Markdown with MathML elements (code spans untouched)."""
    parts = _FENCE.split(source)
    for i in range(0, len(parts), 2):  # even parts are outside code
        # display math stays where it is written (a list item keeps it): MathML's display="block" breaks the line
        text = _DISPLAY.sub(lambda m: latex_to_mathml(m.group(1), True), parts[i])
        parts[i] = _INLINE.sub(lambda m: latex_to_mathml(m.group(1)), text)
    return "".join(parts)


# ------------------------------------------------------------------------------------------ records

def result_record(nb) -> dict:
    """The notebook's result record (the last `RESULT_MIME` output), {} when there is none."""
    records = [rec for _, _, rec in mime_records(nb, RESULT_MIME)]
    return records[-1] if records else {}


def weights_badge(numbers_from: list[dict], pretrained_param: bool) -> dict:
    """{"text", "level"}: which kinds of weights the notebook's numbers come from. level: 'pretrained' (all
    pretrained), 'random' (all random), 'mixed'."""
    if not numbers_from:  # the notebook did not say (or failed first): the `pretrained` parameter, named as such
        state = "pretrained" if pretrained_param else "random"
        return {"text": f"{state} weights (by the `pretrained` parameter; the notebook names no sources)",
                "level": state}
    parts, levels = [], set()
    for src in numbers_from:
        if src.get("kind") == "simulated":
            parts.append(f"simulated: {src.get('model', '')}")
            continue
        state = "pretrained" if src.get("pretrained") else "random"
        levels.add(state)
        parts.append(f"{state} {src.get('kind', '')} ({src.get('model', '?')})")
    level = levels.pop() if len(levels) == 1 else "mixed" if levels else "pretrained"
    return {"text": " + ".join(dict.fromkeys(parts)), "level": level}


BADGE_COLOURS = {"pretrained": "#1b7f3b", "random": "#b00020", "mixed": "#b35c00"}


def page_banner(badge: dict) -> str:
    """The page's one random-weights banner, from what its numbers come from (`weights_badge`): none when all
    are pretrained (or simulated), the red banner when any is random; for a mixed page it says which numbers,
    since its figures and tables from random weights carry a "(random weights)" tag (`plots.weights_mark`).

    Args:
        badge: the `weights_badge` of the page.
    Returns:
        HTML ("" for none).
    """
    if badge["level"] == "pretrained":
        return ""
    banner = banner_html(False)
    if badge["level"] == "mixed":
        random_parts = [p for p in badge["text"].split(" + ") if p.startswith("random")]
        note = (f"Only part of this page: {', '.join(random_parts)}. Figures and tables from it are tagged "
                f"\u201c(random weights)\u201d; the others show real features.")
        banner = banner.replace("</div>", f"<br><span style='font-weight:normal'>{html.escape(note)}</span></div>")
    return banner


def _rel(path: str, out: Path) -> str:
    try:
        return Path(os.path.relpath(Path(path).resolve(), out.resolve())).as_posix()
    except ValueError:
        return Path(path).as_posix()


def _header(name: str, status: str, error: str, wall: float, params: dict, prov: dict, badge: dict) -> str:
    """The report page's header: the page's one random-weights banner (`page_banner`) and the run's provenance."""
    pretrained = not is_random_weights(params.get("pretrained", ""))
    clip = (f"{params.get('model', '?')} / weights {params.get('pretrained', '?')} / {params.get('image_size', '?')} px"
            f" ({'pretrained' if pretrained else 'random initialisation'})")
    # The page's numbers come from the encoders its result record names (a notebook may use only the CNN, or
    # load CLIP only in the classroom setting): those lead; the CLIP parameters are shown as parameters.
    rows = [("notebook", name), ("status", status + (f" ({error})" if error else "")), ("wall time", f"{wall:.1f} s"),
            ("numbers from", badge["text"]),
            ("CLIP parameters (model / weights / size)", clip),
            *([("dataset", f"{params.get('dataset', '?')} at {params.get('root', '?')}")]
              if "dataset" in params or "root" in params else []),  # 07 builds its own data (its parameters say where)
            ("seed", params.get("seed", "?")), ("git commit", prov["git_commit"]),
            ("versions", ", ".join(f"{k} {v}" for k, v in prov["versions"].items())),
            ("parameters", json.dumps(params, sort_keys=True, default=str))]
    body = "".join(f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(str(k))}</th>"
                   f"<td><code>{html.escape(str(v))}</code></td></tr>" for k, v in rows)
    return (f'<div id="fiseclip-provenance" class="{IGNORE_MATH_CLASS}" style="font-family:sans-serif;'
            f'border:1px solid #999;padding:8px;margin:8px">{page_banner(badge)}'
            f'<b>fiseclip report: {html.escape(name)}</b>'
            f'<table style="font-size:12px">{body}</table><a href="index.html">all reports</a></div>')


# nbconvert's lab template with nothing fetched from the network: no MathJax (math is MathML), no require.js,
# no widget manager (its loader fetches @jupyter-widgets/html-manager from unpkg whenever the notebook carries
# widget state; the reports show static views instead of widgets), no mermaid loader.
_TEMPLATE = ("{%- extends 'lab/index.html.j2' -%}\n"
             "{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}\n"
             "{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}\n"
             "{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}\n"
             "{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}\n")


def _to_html(nb, header: str) -> str:
    """The executed notebook as one offline HTML page: Markdown math as MathML, no MathJax, header on top."""
    import copy

    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    nb = copy.deepcopy(nb)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            cell.source = markdown_math_to_mathml(cell.source)
    exporter = HTMLExporter(template_name="lab", extra_loaders=[DictLoader({"fiseclip.html.j2": _TEMPLATE})],
                            template_file="fiseclip.html.j2")
    body, _ = exporter.from_notebook_node(nb)
    body = re.sub(r"<!-- Load mathjax -->.*?<!-- End of mathjax configuration -->", "", body, flags=re.S)
    m = re.search(r"<body[^>]*>", body)
    return body[:m.end()] + header + body[m.end():] if m else header + body


def _notebook_params(path: Path) -> dict:
    """The defaults of a notebook's `parameters` cell (as papermill reads them)."""
    import papermill as pm

    try:
        specs = pm.inspect_notebook(str(path))
    except Exception as e:  # noqa: BLE001 - not JSON, not a notebook, unreadable: nbformat/papermill vary
        detail = str(e).splitlines()[0][:200] if str(e) else ""
        raise FiseclipError(f"notebook {path} cannot be read ({type(e).__name__}: {detail}); "
                            "fix or remove it, or leave it out with --only") from None
    out = {}
    for name, spec in specs.items():
        try:
            out[name] = ast.literal_eval(spec["default"])
        except (ValueError, SyntaxError):
            out[name] = spec["default"]
    return out


def notebook_parameters(params: dict, defaults: dict) -> dict:
    """The parameters to inject into one notebook: a key the notebook has is passed as is; a config field it
    does not have as a parameter (e.g. `precision`, `encode_batch` from a params file) joins its `options`, so
    that it reaches the notebook's config instead of being ignored."""
    import dataclasses

    from fiseclip_lib.config import FiseConfig

    fields = {f.name for f in dataclasses.fields(FiseConfig)}
    out = {k: v for k, v in params.items() if k in defaults or k not in fields}
    extra = {k: v for k, v in params.items() if k not in defaults and k in fields}
    if extra:
        out["options"] = {**extra, **(params.get("options") or defaults.get("options") or {})}
    return out


def _read_index(out: Path) -> list[dict]:
    """The rows of an existing index.json (a damaged or foreign one is ignored with a warning)."""
    path = out / "index.json"
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text(encoding="utf-8")).get("reports", [])
        return [r for r in rows if isinstance(r, dict) and isinstance(r.get("name"), str)]
    except (ValueError, AttributeError, OSError):
        warnings.warn(f"{path} is not a fiseclip index; starting a new one")
        return []


def _links(r: dict) -> str:
    links = [f"<a href='{html.escape(r['links']['html'])}'>HTML</a>",
             f"<a href='{html.escape(r['links']['ipynb'])}'>.ipynb</a>"]
    links += [f"<a href='{html.escape(p)}'>{html.escape(n)}.csv</a>" for n, p in r["links"].get("tables", {}).items()]
    return " · ".join(links)


def _index(out: Path, results: list[dict], prov: dict) -> None:
    def row(r):
        badge = r.get("badge") or weights_badge([], r.get("pretrained", False))
        colour = BADGE_COLOURS.get(badge["level"], "#555")
        p = r.get("params", {})
        params = (f"{p.get('dataset', '?')} · {p.get('model', '?')} / {p.get('pretrained', '?')} · "
                  f"{p.get('image_size', '?')} px · N={p.get('batch_size', '?')} · seed {p.get('seed', '?')}")
        return (f"<tr><td><a href='{html.escape(r['links']['html'])}'>{html.escape(r['name'])}</a></td>"
                f"<td style='color:{'green' if r['status'] == 'ok' else '#b00020'}'>{html.escape(r['status'])}</td>"
                f"<td style='white-space:nowrap'>{html.escape(r.get('run_date', '')[:16].replace('T', ' '))}</td>"
                f"<td style='white-space:nowrap'>{r['wall_s']:.1f} s</td>"
                f"<td>{html.escape(params)}</td>"
                f"<td><span class='badge' style='background:{colour}'>{html.escape(badge['text'])}</span></td>"
                f"<td>{html.escape(r['result'] or r['error'])}</td><td>{_links(r)}</td></tr>")

    rows = "".join(row(r) for r in results)
    commits = sorted({r.get("git_commit", prov["git_commit"]) for r in results})
    banner = banner_html(all(r.get("badge", {}).get("level") == "pretrained" for r in results))
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>fiseclip reports</title>"
            "<style>body{font-family:sans-serif;margin:1em} td,th{vertical-align:top;font-size:13px}"
            ".badge{color:white;padding:1px 6px;border-radius:4px;display:inline-block}"
            "td:nth-child(6){max-width:16em} td:nth-child(7){min-width:24em}</style></head>"
            f"<body class='{IGNORE_MATH_CLASS}'><h1>fiseclip reports</h1>{banner}"
            f"<p>git commit{'s' if len(commits) > 1 else ''} <code>{html.escape(', '.join(commits))}</code>, "
            f"fiseclip {html.escape(prov['versions'].get('fiseclip', '?'))}. Each row is the latest run of its "
            f"notebook; the badge says which weights its numbers come from.</p>"
            "<table border='1' cellpadding='4' style='border-collapse:collapse'><tr><th>report</th><th>status</th>"
            "<th>run date</th><th>wall time</th><th>parameters</th><th>numbers from</th><th>result</th>"
            f"<th>files</th></tr>{rows}</table></body></html>\n")
    write_text_atomic(out / "index.html", page)
    write_json_atomic(out / "index.json", {"reports": results, **prov})


# ------------------------------------------------------------------------------------------ running

def clean_debris(out: Path) -> list[Path]:
    """Remove temporary files of our own naming left in `out` (and its `_runs/`) by a killed run."""
    runs = out / "_runs"
    return remove_debris(out, *(sorted({p.parent for p in runs.rglob(".*")}) if runs.is_dir() else []))


@contextlib.contextmanager
def _kernel_log():
    """Send this process's file descriptor 2, which kernels inherit, to a scratch file; yield the file."""
    sys.stderr.flush()
    saved = os.dup(2)
    log = tempfile.TemporaryFile(mode="w+b")
    os.dup2(log.fileno(), 2)
    try:
        yield log
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _kernel_log_tail(log, lines: int = 8) -> str:
    log.seek(0)
    text = log.read().decode("utf-8", "replace").splitlines()
    return "\n".join(l for l in text if "running over TCP without encryption" not in l)[-2000:] if text else ""


def _progress_engine(name: str, say, warm: "_WarmKernel | None" = None):
    """A papermill engine that reports each code cell as it starts (cell k of n, elapsed seconds) and runs the
    notebook in `warm`'s kernel when given (else in a new one); the kernel is shut down when the notebook ends."""
    from papermill.clientwrap import PapermillNotebookClient
    from papermill.engines import NBClientEngine

    class Progress(NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, log_output=False, stdout_file=None,
                                     stderr_file=None, start_timeout=60, execution_timeout=None, **kwargs):
            code = [i for i, c in enumerate(nb_man.nb.cells) if c.cell_type == "code"]
            t0 = time.time()
            start = nb_man.cell_start

            def cell_start(cell, cell_index=None, **kw):
                if cell_index in code:
                    say(f"[report] {name}: cell {code.index(cell_index) + 1} of {len(code)}, "
                        f"{time.time() - t0:.0f} s")
                return start(cell, cell_index, **kw)

            nb_man.cell_start = cell_start
            kwargs.pop("input_path", None)
            client = PapermillNotebookClient(
                nb_man, km=warm.km if warm is not None else None, timeout=execution_timeout,
                startup_timeout=start_timeout, kernel_name=kernel_name, log=logging.getLogger("papermill"),
                log_output=log_output, stdout_file=stdout_file, stderr_file=stderr_file, **kwargs)
            return client.execute(cleanup_kc=True)  # shut the kernel down also when it was handed in

    return Progress


class _WarmKernel:
    """The kernel of the next notebook, started while the current one runs, already importing the modules the
    notebook imports (and open_clip for a CLIP model): the notebooks run one after the other, and each would
    otherwise spend its first seconds importing torch and the library while a core waits idle. The imports
    bind no name in the notebook's namespace (a notebook that forgets an import still fails), and run silently
    (no execution count). Its stderr goes to its own log."""

    def __init__(self, book: Path, kernel_name: str, cwd: Path, params: dict):
        from jupyter_client.manager import AsyncKernelManager
        from jupyter_core.utils import run_sync

        self.log = tempfile.TemporaryFile(mode="w+b")
        self.km = AsyncKernelManager(kernel_name=kernel_name)
        self.kc = None
        run_sync(self.km.start_kernel)(cwd=str(cwd), stderr=self.log,
                                       extra_arguments=["--HistoryManager.hist_file=:memory:"])
        try:
            self.kc = self.km.blocking_client()
            self.kc.start_channels()
            modules = _imports_of(book) + (["open_clip"] if _uses_clip(params) else [])
            self.msg_id = self.kc.execute(
                "def _fiseclip_warm(names):\n"
                "    import importlib\n"
                "    for name in names:\n"
                "        try:\n"
                "            importlib.import_module(name)\n"
                "        except Exception:\n"
                "            pass\n"
                f"_fiseclip_warm({modules!r})\n"
                "del _fiseclip_warm\n", silent=True, store_history=False, allow_stdin=False)
        except BaseException:
            self.close()
            raise

    def ready(self, timeout: float) -> bool:
        """Wait for the imports (True); False when the kernel died or took longer than `timeout` (then it is
        closed and the notebook gets a new kernel)."""
        import queue

        deadline = time.time() + timeout
        try:
            while time.time() < deadline:
                try:
                    msg = self.kc.get_shell_msg(timeout=1)
                except queue.Empty:
                    if self._process().poll() is not None:
                        break
                    continue
                if msg.get("parent_header", {}).get("msg_id") == self.msg_id:
                    return True
        finally:
            self.kc.stop_channels()
        self.close()
        return False

    def _process(self):
        return self.km.provisioner.process  # the local kernel's Popen

    def close(self) -> None:
        """Kill the kernel (its process group) if it still runs. Done without the event loop that the notebook
        client shares: after an interrupt, running that loop would resume the client's pending tasks."""
        import signal

        with contextlib.suppress(Exception):
            proc = self._process()
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # kernels lead their own process group
                except OSError:
                    proc.kill()
                proc.wait(timeout=10)
        with contextlib.suppress(Exception):
            self.km.cleanup_connection_file()
        if self.kc is not None:
            with contextlib.suppress(Exception):
                self.kc.stop_channels()
        self.log.close()


def _imports_of(book: Path) -> list[str]:
    """The absolute modules a notebook's code cells import (`from a import b` gives a and a.b: b may be a
    module); cells that are not plain Python (magics) are skipped."""
    import nbformat

    names = []
    for cell in nbformat.read(str(book), as_version=4).cells:
        if cell.cell_type != "code":
            continue
        try:
            tree = ast.parse(cell.source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names += [node.module] + [f"{node.module}.{a.name}" for a in node.names if a.name != "*"]
    return list(dict.fromkeys(names))


def _uses_clip(params: dict) -> bool:
    """Whether the notebook's `model` parameter names a CLIP (open_clip) model."""
    from fiseclip_lib.encoder import EFFICIENTNET_MODEL

    model = params.get("model")
    return isinstance(model, str) and bool(model) and model != EFFICIENTNET_MODEL


def run_reports(out, params: dict | None = None, only: str | None = None, notebooks_dir=None,
                kernel_name: str = "python3", timeout: int | None = None, verbose: bool = True) -> list[dict]:
    """Execute the notebooks into `out` (executed .ipynb + .html each, index.html/json); returns the records of
    the notebooks run now (the index also keeps earlier rows of notebooks not run now).

    Args:
        out: the report folder (locked while we write).
        params: notebook parameters overriding each notebook's defaults.
        only: comma-separated names or number prefixes.
        timeout: seconds allowed per cell (default CELL_TIMEOUT_S).
        verbose: print per-notebook progress (cell k of n, elapsed).
    """
    from fiseclip_lib.plumbing.files import ensure_writable

    if timeout is not None and not (isinstance(timeout, (int, float)) and 0 < timeout < float("inf")):
        raise FiseclipError(f"--timeout {timeout}: give a positive number of seconds allowed per cell (default "
                            f"{CELL_TIMEOUT_S})")
    timeout = timeout or CELL_TIMEOUT_S
    out = ensure_writable(out)
    with output_lock(out, command="fiseclip report"), _terminate_cleanly():
        clean_debris(out)
        return _run_reports_locked(out, params, only, notebooks_dir, kernel_name, timeout, verbose)


@contextlib.contextmanager
def _terminate_cleanly():
    """Turn SIGTERM (a `kill`) into SystemExit, so that temporary files are removed and the kernel is shut down
    on the way out (SIGKILL cannot be caught: its debris is removed at the next start)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_reports_locked(out: Path, params, only, notebooks_dir, kernel_name, timeout, verbose) -> list[dict]:
    notebooks_dir = Path(notebooks_dir) if notebooks_dir else default_notebooks_dir()
    params = dict(params or {})
    for key in PATH_PARAMS:
        if params.get(key) not in (None, ""):
            params[key] = str(Path(params[key]).expanduser().resolve())
    params.setdefault("run_dir", str((out / "_runs").resolve()))
    prov = provenance()
    books = list_notebooks(notebooks_dir, only)
    # every notebook's parameters before any runs: one papermill cannot read stops the series at once
    parameters = {book: _parameters_of(book, params) for book in books}
    rows = {r["name"]: r for r in _read_index(out)}
    results = []
    # Kernels inherit the environment: a headless MPLBACKEND=Agg there would drop every figure from the report,
    # and widgets have no frontend to talk to, so the notebooks show their static views instead.
    saved = {k: os.environ.get(k) for k in ("MPLBACKEND", HEADLESS_ENV)}
    os.environ.pop("MPLBACKEND", None)
    os.environ[HEADLESS_ENV] = "1"
    say = (lambda s: print(s, flush=True)) if verbose else (lambda s: None)
    warm = mine = None
    try:
        for k, book in enumerate(books, start=1):
            say(f"[report] {book.stem} ({k} of {len(books)}) ...")
            mine, warm = warm, None
            if k < len(books):  # the next notebook's kernel imports while this one runs
                nxt = books[k]
                with contextlib.suppress(Exception):  # no warm kernel (the notebook starts its own and says why)
                    warm = _WarmKernel(nxt, kernel_name, notebooks_dir, parameters[nxt][1])
            rec = _run_one(book, out, parameters[book], notebooks_dir, kernel_name, timeout, prov, say, mine)
            results.append(rec)
            rows[rec["name"]] = rec
            _index(out, [rows[n] for n in sorted(rows)], prov)
    finally:
        for kernel in (mine, warm):  # also when interrupted before the notebook took its kernel over
            if kernel is not None:
                kernel.close()
        for key, v in saved.items():
            if v is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = v
    return results


def _parameters_of(book: Path, params: dict) -> tuple[dict, dict]:
    """(the entries of `params` that notebook `book` declares, all its parameters with those applied)."""
    defaults = _notebook_params(book)
    overrides = notebook_parameters(params, defaults)
    return overrides, {**defaults, **overrides}


def _run_one(book: Path, out: Path, parameters: tuple[dict, dict], notebooks_dir: Path, kernel_name: str,
             timeout, prov, say, warm: _WarmKernel | None = None) -> dict:
    """Execute one notebook into `out` (.ipynb and .html, both even when it fails), with `parameters` (from
    `_parameters_of`), in `warm`'s kernel when given; return its record."""
    import nbformat
    import papermill as pm

    name = book.stem
    params, effective = parameters
    run_date = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    t0 = time.time()
    status, error, tail = "ok", "", ""
    from papermill.engines import papermill_engines

    if warm is not None and not warm.ready(timeout):
        warm = None
    papermill_engines.register("fiseclip-progress", _progress_engine(name, say, warm))
    with atomic_path(out / f"{name}.ipynb") as tmp:
        with _kernel_log() as log:
            try:
                # The kernel is stopped at once (its process group killed) when the cells are done: a graceful
                # shutdown waits ~2 s per notebook for IPython's exit routine, and nothing of a finished notebook
                # lives in its kernel (results are in the executed notebook, tables are written atomically).
                pm.execute_notebook(str(book), str(tmp), parameters=params, cwd=str(notebooks_dir),
                                    kernel_name=kernel_name, progress_bar=False, execution_timeout=timeout,
                                    engine_name="fiseclip-progress", shutdown_kernel="immediate")
            except pm.PapermillExecutionError as e:
                status, error = "failed", f"{e.ename}: {str(e.evalue).splitlines()[0] if e.evalue else ''}"
            except Exception as e:  # kernel died, bad notebook, ...
                status, error = "failed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                tail = "\n".join(t for t in (_kernel_log_tail(warm.log) if warm else "", _kernel_log_tail(log)) if t)
            finally:
                if warm is not None:
                    warm.close()  # normally shut down with the notebook already
        if tail:
            say(f"[report] {name}: kernel log:\n{tail}")
        if not tmp.exists() or tmp.stat().st_size == 0:
            nbformat.write(nbformat.read(str(book), as_version=4), str(tmp))
        nb = nbformat.read(str(tmp), as_version=4)
        # Widgets created in headless mode were never displayed (static views stand in): their saved state would
        # only make a viewer fetch a widget manager.
        nb.metadata.pop("widgets", None)
        wall = time.time() - t0
        found = result_record(nb)
        pretrained = not is_random_weights(effective.get("pretrained", ""))
        badge = weights_badge(found.get("numbers_from", []), pretrained)
        # What a careful reader would catch (report_checks): a finding fails the notebook; its page is still
        # written, to be looked at, with the finding in its header.
        page = _to_html(nb, _header(name, status, error, wall, effective, prov, badge))
        checks = check_notebook(nb) + check_html(page)
        if checks and status == "ok":
            status = "failed"
            error = f"report check: {checks[0]}" + (f" (+{len(checks) - 1} more)" if len(checks) > 1 else "")
            page = _to_html(nb, _header(name, status, error, wall, effective, prov, badge))
        record = {"name": name, "status": status, "error": error, "wall_s": round(wall, 2), "run_date": run_date,
                  "result": found.get("text", ""), "pretrained": badge["level"] == "pretrained", "badge": badge,
                  "numbers_from": found.get("numbers_from", []),
                  "params": {k: effective.get(k) for k in INDEX_PARAMS},
                  "links": {"html": f"{name}.html", "ipynb": f"{name}.ipynb",
                            "tables": {k: _rel(v, out) for k, v in found.get("tables", {}).items()}},
                  "git_commit": prov["git_commit"], "checks": checks}
        nb.metadata["fiseclip"] = {**record, "parameters": effective, "result_record": found}
        nbformat.write(nb, str(tmp))
    write_text_atomic(out / f"{name}.html", page)
    say(f"[report] {name}: {status} in {wall:.0f} s" + (f" ({error})" if error else ""))
    return record
