"""Notebook helpers: provenance headers, result lines, sweeps over configs, widgets that degrade headless.

Notebooks narrate and plot; everything they compute goes through the library (this module only orchestrates
`Detector`, `run.score_category` and the metrics).
"""
from __future__ import annotations

import html
import json
import os
import resource
import sys
import time
import warnings
from typing import Callable, Sequence

import pandas as pd

from . import data as D
from .config import FiseConfig
from .pipeline import Detector
from .provenance import banner_html, provenance
from .run import score_and_evaluate

RESULT_PREFIX = "RESULT: "
HEADLESS_ENV = "FISECLIP_HEADLESS"  # set by `fiseclip report`: widgets are replaced by their static view


def _display(obj):
    try:
        from IPython.display import display

        display(obj)
    except ImportError:  # pragma: no cover - plain Python
        print(obj)


def _display_markdown(text: str):
    try:
        from IPython.display import Markdown
    except ImportError:  # pragma: no cover
        print(text)
        return
    _display(Markdown(text))


def show_provenance(dataset: str, root, seed: int, encoders: Sequence, config: FiseConfig | None = None,
                    **extra) -> dict:
    """Display (and return) what this notebook's numbers depend on; a red banner for random weights."""
    from IPython.display import HTML

    info = {
        "dataset": dataset, "root": str(root), "seed": seed,
        "encoders": [e.identity() for e in encoders],
        "config": config.to_dict() if config is not None else None, **extra, **provenance(),
    }
    rows = "".join(
        f"<tr><td><b>{html.escape(str(k))}</b></td><td><code>{html.escape(json.dumps(v, default=str))}</code></td></tr>"
        for k, v in info.items() if k != "config")
    cfg = (f"<details><summary>resolved config</summary><pre>{html.escape(json.dumps(info['config'], indent=1))}"
           f"</pre></details>") if config is not None else ""
    _display(HTML(f"{banner_html(all(e.pretrained for e in encoders))}<table>{rows}</table>{cfg}"))
    return info


_MARKDOWN_SPECIAL = set("\\`*_{}[]()<>#+-.!|$~&")


def markdown_escape(text: str) -> str:
    """Plain text -> Markdown that shows exactly that text: names are data (a `$` in a category name must not
    start math, a `<` must not start HTML, a `*` must not start emphasis)."""
    return "".join("\\" + ch if ch in _MARKDOWN_SPECIAL else ch for ch in str(text)).replace("\n", " ")


def result(text: str) -> str:
    """The notebook's one-line finding: shown as Markdown (escaped: it quotes names) and printed for the
    report index (one line)."""
    from IPython.display import Markdown

    text = " ".join(str(text).split())
    print(RESULT_PREFIX + text)
    _display(Markdown(f"**What we saw.** {markdown_escape(text)}"))
    return text


def explore(fn: Callable, **controls):
    """Render `fn` once with the controls' default values (a static figure for headless reports), then offer
    the same function as an interactive widget (JupyterLab). Without ipywidgets only the static view remains."""
    defaults = {k: getattr(c, "value", c) for k, c in controls.items()}
    fn(**defaults)
    if os.environ.get(HEADLESS_ENV):
        # No frontend will ever render a widget here; creating one only adds comm traffic to the kernel.
        _display_markdown("*Open this notebook in JupyterLab for the interactive version of this view.*")
        return None
    try:
        import ipywidgets as W
        from IPython.display import Markdown
    except ImportError:  # pragma: no cover
        return None
    _display(Markdown("*Interactive version below (needs a live kernel in JupyterLab):*"))
    widget = W.interactive(fn, {"manual": False}, **controls)
    _display(widget)
    return widget


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 1e6


def evaluate(detector: Detector, samples: Sequence[D.Sample], categories: Sequence[str] | None = None,
             progress: bool = False, **labels) -> pd.DataFrame:
    """Score and evaluate each category with one detector; a row per category (metrics, s/img, labels)."""
    rows = []
    cats = categories or D.categories_of(samples)
    for cat in cats:
        cs = [s for s in samples if s.category == cat]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            _, _, metrics = score_and_evaluate(detector, cs, cat, progress=progress)
            seconds = time.perf_counter() - t0
        rows.append({**labels, "category": cat, **metrics, "s_per_image": seconds / len(cs)})
    return pd.DataFrame(rows)


def sweep(configs: dict[str, FiseConfig], encoder, samples: Sequence[D.Sample], cache=None,
          categories: Sequence[str] | None = None, label: str = "setting") -> pd.DataFrame:
    """Evaluate several configs on the same encoder (and feature cache); a row per (setting, category)."""
    frames = [evaluate(Detector(cfg, encoder=encoder, cache=cache), samples, categories, **{label: name})
              for name, cfg in configs.items()]
    return pd.concat(frames, ignore_index=True)


def mean_row(df: pd.DataFrame, by: str) -> pd.DataFrame:
    """Unweighted mean over categories per setting."""
    num = [c for c in df.select_dtypes("number").columns if c != by]
    return df.groupby(by, sort=False)[num].mean().reset_index()
