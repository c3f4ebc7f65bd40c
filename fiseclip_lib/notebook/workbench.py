"""Notebook helpers: one-call setup, provenance, the result record, sweeps with progress, widgets, studies.

Notebooks narrate and plot; everything they compute goes through the library. `setup` replaces the setup
block every notebook used to repeat (parameters -> config, encoders, samples, feature cache, provenance shown);
`Session.result` hands the notebook's finding to `fiseclip report` as a machine-readable output
(`RESULT_MIME`), never through printed text. Study loops the notebooks run (`contamination_study`) live here,
with unit tests, so that a notebook holds no algorithm.
"""
from __future__ import annotations

import html
import json
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from fiseclip_lib.evaluation import data as D
from fiseclip_lib.config import FiseConfig
from fiseclip_lib.encoder import load_encoder  # noqa: F401 - notebooks load extra encoders through the workbench
from fiseclip_lib.core.detector import Detector
from fiseclip_lib.plumbing.provenance import banner_html, provenance
from fiseclip_lib.plumbing.resources import peak_rss_mb, usable_cpus  # noqa: F401 - notebooks read peak_rss_mb
from fiseclip_lib.evaluation.run import eval_masks, prepare_dataset, score_and_evaluate

HEADLESS_ENV = "FISECLIP_HEADLESS"  # set by `fiseclip report`: widgets become static views, no progress bars
RESULT_MIME = "application/vnd.fiseclip.result+json"  # the notebook's result record, read by `fiseclip report`
IGNORE_MATH_CLASS = "tex2jax_ignore"  # JupyterLab's MathJax skips elements of this class: names are data
# Inside `fiseclip report` every figure shown also carries the texts a reader sees on it (titles, labels, tick
# labels, legends: `plots.figure_texts`) under this type, beside its PNG: the report checks look for raw TeX
# there (a PNG's pixels cannot be searched). Nothing renders this type; JupyterLab never gets it.
FIGURE_TEXT_MIME = "application/vnd.fiseclip.figure-texts+json"
PROVENANCE_CLASS = "fiseclip-provenance"  # the notebook's provenance block: one per page (a later call replaces it)
PROVENANCE_DISPLAY_ID = "fiseclip-provenance"


def headless() -> bool:
    """True inside `fiseclip report` (no frontend: no widgets, no progress bars)."""
    return bool(os.environ.get(HEADLESS_ENV))


def record_figure_texts() -> bool:
    """Inside `fiseclip report` (and an IPython kernel), add `FIGURE_TEXT_MIME` to every displayed figure: the
    texts drawn on it. Changes no plotting state (no backend, no rcParams); idempotent. Returns whether it is on.
    """
    if not headless():
        return False
    try:
        from IPython import get_ipython
        from IPython.core.formatters import JSONFormatter
        from traitlets import Unicode
    except ImportError:  # pragma: no cover - plain Python
        return False
    ip = get_ipython()
    if ip is None or not hasattr(ip, "display_formatter"):
        return False
    from matplotlib.figure import FigureBase  # a class only: importing it changes no plotting state

    formatters = ip.display_formatter.formatters
    if FIGURE_TEXT_MIME in formatters:
        return True

    class FigureTexts(JSONFormatter):
        format_type = Unicode(FIGURE_TEXT_MIME)

    def texts(fig):
        from fiseclip_lib.notebook.plots import figure_texts

        return {"texts": figure_texts(fig)}

    f = FigureTexts(parent=ip.display_formatter)
    # Registered for FigureBase, not Figure: the inline backend removes every formatter's Figure printer when
    # it is set up (at the first `import matplotlib.pyplot`, which may come after this).
    f.for_type(FigureBase, texts)
    formatters[FIGURE_TEXT_MIME] = f  # after image/png: the figure is already drawn when this runs
    return True


def _display(obj, **kw):
    try:
        from IPython.display import display

        display(obj, **kw)
    except ImportError:  # pragma: no cover - plain Python
        print(obj)


def _display_markdown(text: str):
    try:
        from IPython.display import Markdown
    except ImportError:  # pragma: no cover
        print(text)
        return
    _display(Markdown(text))


_MARKDOWN_SPECIAL = set("\\`*_{}[]()<>#+-.!|$~&")


def markdown_escape(text: str) -> str:
    """Plain text -> Markdown that shows exactly that text: names are data (a `$` in a category name must not
    start math, a `<` must not start HTML, a `*` must not start emphasis)."""
    return "".join("\\" + ch if ch in _MARKDOWN_SPECIAL else ch for ch in str(text)).replace("\n", " ")


def note(text: str) -> None:
    """Show one line of plain text as Markdown, escaped (it may quote names)."""
    _display_markdown(markdown_escape(text))


def table(df: pd.DataFrame, digits: int = 3, caption: str = "", numbers_from: Sequence = ()) -> None:
    """Display a DataFrame rounded to `digits`, inside an element MathJax ignores (a `$` in a category name
    stays a dollar sign in JupyterLab too). Returns None, so the table shows once.

    Args:
        df: the table. digits: rounding (None: as is). caption: a line above it.
        numbers_from: what its numbers come from (encoders, `pretrained` flags, labels: `plots.weights_mark`);
            the caption gets the " (random weights)" tag when any is a randomly initialised encoder.
    """
    from IPython.display import HTML

    from fiseclip_lib.notebook.plots import weights_mark

    shown = df.round(digits) if digits is not None else df
    caption = (caption + weights_mark(*numbers_from)).strip()
    cap = f"<p><i>{html.escape(caption)}</i></p>" if caption else ""
    plain_index = isinstance(shown.index, pd.RangeIndex)  # row numbers say nothing: leave them out
    _display(HTML(f'<div class="{IGNORE_MATH_CLASS}">{cap}{shown.to_html(index=not plain_index, na_rep="–")}</div>'))


def progress(iterable: Iterable, desc: str = "", total: int | None = None):
    """`tqdm.auto` progress bar (a widget in JupyterLab, text in a terminal); silent inside `fiseclip report`,
    whose own per-cell progress goes to the terminal instead."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=headless(), leave=False)


def set_threads(threads: int | None = None) -> int:
    """Torch intra-op threads: `threads`, else the CPUs this process may use (not the machine's cores: a
    container or `taskset` limit is respected, which torch's default ignores). Returns the number set."""
    if threads is None:
        threads = usable_cpus()
        threads = min(threads, torch.get_num_threads() or threads)
    threads = max(1, int(threads))
    torch.set_num_threads(threads)
    return threads


def encoder_record(encoder, role: str = "") -> dict:
    """What a number's encoder is, for the result record and the report's weights badge."""
    return {"model": encoder.model_name, "weights": str(encoder.weights), "pretrained": bool(encoder.pretrained),
            "kind": "CLIP" if encoder.has_text else "CNN", "role": role}


def show_provenance(dataset: str, root, seed: int, encoders: Sequence, config: FiseConfig | None = None,
                    **extra) -> dict:
    """Display (and return) what this notebook's numbers depend on.

    One block per page: a second call (a notebook that loads more encoders after `setup`) replaces the first
    block where it stands (same display id) instead of printing another. The red random-weights banner is shown
    here only in JupyterLab; in `fiseclip report` the page header carries the page's one banner, decided by what
    the result record says the numbers come from (`report.weights_badge`), so it is never printed twice.

    Args:
        dataset, root, seed: the data. encoders: the encoders loaded. config: the resolved config.
        extra: any other JSON-able facts to list.
    Returns:
        The facts shown (with versions and git commit).
    """
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
    banner = "" if headless() else banner_html(all(e.pretrained for e in encoders))
    block = HTML(f'<div class="{IGNORE_MATH_CLASS} {PROVENANCE_CLASS}">{banner}<table>{rows}</table>{cfg}</div>')
    global _PROVENANCE_SHOWN
    if _PROVENANCE_SHOWN and headless():  # a report page: replace; in JupyterLab a rerun cell shows its own
        try:
            from IPython.display import update_display

            update_display(block, display_id=PROVENANCE_DISPLAY_ID)
            return info
        except ImportError:  # pragma: no cover
            pass
    _display(block, display_id=PROVENANCE_DISPLAY_ID)
    _PROVENANCE_SHOWN = True
    return info


_PROVENANCE_SHOWN = False  # this kernel showed a provenance block (a later one replaces it)


def result(text: str, numbers_from: Sequence = (), tables: dict | None = None, notebook: str = "",
           extra: dict | None = None) -> None:
    """Show the notebook's one-line finding once, and hand it to `fiseclip report` as a result record.

    The output is one display with two representations: Markdown for people (escaped: it quotes names) and
    `RESULT_MIME` JSON for the report (text, the encoders its numbers come from, the CSVs written).
    Returns None, so nothing is shown a second time as the cell's value.

    Args:
        text: the finding, one line.
        numbers_from: encoders (or `encoder_record` dicts, or plain labels such as "SIMULATED text map") whose
            outputs the numbers in `text` come from; the report's weights badge is built from them.
        tables: name -> path of CSVs behind the numbers.
        notebook: the notebook's name.
        extra: any other JSON-able fields.
    """
    text = " ".join(str(text).split())
    sources = []
    for item in numbers_from:
        if isinstance(item, dict):
            sources.append(item)
        elif isinstance(item, str):
            sources.append({"model": item, "weights": "", "pretrained": None, "kind": "simulated", "role": ""})
        else:
            sources.append(encoder_record(item))
    record = {"notebook": notebook, "text": text, "numbers_from": sources,
              "tables": {k: str(v) for k, v in (tables or {}).items()}, **(extra or {})}
    _display({"text/markdown": f"**What we saw.** {markdown_escape(text)}", RESULT_MIME: record}, raw=True)


def claim(kind: str, **numbers) -> str:
    """Show a sentence computed from this run's numbers (`claims.py`) and record it for the report's checks.

    Args:
        kind: one of `claims.CLAIMS` (growth, plateau, near, compare).
        numbers: the arguments of that function (the run's numbers and the names to use).
    Returns:
        The sentence (so a notebook can reuse it in its result line).

    Example:
        >>> claim("near", values=[0.49, 0.52], target=0.5, tol=0.1, what="RANDOM rows")  # doctest: +SKIP
    """
    from fiseclip_lib.notebook.claims import CLAIM_MIME, state

    record = state(kind, **numbers)
    _display({"text/markdown": f"**From the numbers above:** {markdown_escape(record['text'])}.",
              CLAIM_MIME: record}, raw=True)
    return record["text"]


def explore(fn: Callable, **controls) -> None:
    """Render `fn` once with the controls' default values (a static figure for headless reports), then offer
    the same function as an interactive widget (JupyterLab). Without ipywidgets only the static view remains.
    Returns None: the widget is displayed here, once (a returned widget would show again as the cell value)."""
    defaults = {k: getattr(c, "value", c) for k, c in controls.items()}
    fn(**defaults)
    if headless():
        # No frontend will ever render a widget here; creating one only adds comm traffic to the kernel.
        _display_markdown("*Open this notebook in JupyterLab for the interactive version of this view.*")
        return None
    try:
        import ipywidgets as W
    except ImportError:  # pragma: no cover
        return None
    _display_markdown("*Interactive version below (needs a live kernel in JupyterLab):*")
    _display(W.interactive(fn, {"manual": False}, **controls))
    return None


def evaluate(detector: Detector, samples: Sequence[D.Sample], categories: Sequence[str] | None = None,
             progress_bar: bool = True, **labels) -> pd.DataFrame:
    """Score and evaluate each category with one detector; a row per category (metrics, s/img, labels)."""
    rows = []
    cats = list(categories or D.categories_of(samples))
    it = progress(cats, desc=" ".join(str(v) for v in labels.values()) or "categories") if progress_bar else cats
    for cat in it:
        cs = [s for s in samples if s.category == cat]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            _, _, metrics = score_and_evaluate(detector, cs, cat, progress=False)
            seconds = time.perf_counter() - t0
        rows.append({**labels, "category": cat, **metrics, "s_per_image": seconds / len(cs)})
    return pd.DataFrame(rows)


def sweep(configs: dict, encoder, samples: Sequence[D.Sample], cache=None,
          categories: Sequence[str] | None = None, label: str = "setting") -> pd.DataFrame:
    """Evaluate several configs on the same encoder (and feature cache); a row per (setting, category).
    A progress bar counts the settings (JupyterLab, terminal; silent in headless reports)."""
    frames = [evaluate(Detector(cfg, encoder=encoder, cache=cache), samples, categories, progress_bar=False,
                       **{label: name})
              for name, cfg in progress(list(configs.items()), desc=f"sweep over {label}")]
    return pd.concat(frames, ignore_index=True)


def mean_row(df: pd.DataFrame, by: str) -> pd.DataFrame:
    """Unweighted mean over categories per setting."""
    num = [c for c in df.select_dtypes("number").columns if c != by]
    return df.groupby(by, sort=False)[num].mean().reset_index()


# ------------------------------------------------------------------------------------------ the session

def _categories(categories) -> list[str] | None:
    if categories in (None, "", []):
        return None
    if isinstance(categories, str):
        return [c.strip() for c in categories.split(",") if c.strip()]
    return [str(c) for c in categories]


@dataclass
class Session:
    """What a notebook works with after `setup`: data, config, encoders, feature cache, where to write.

    `encoder` is the CLIP of the config; `baseline` the optional second encoder (real ImageNet CNN features for
    the matching branch offline), None when not asked for.
    """

    notebook: str
    dataset: str
    root: str
    categories: list[str]
    samples: list[D.Sample]
    cfg: FiseConfig
    encoder: object
    baseline: object | None
    cache: object
    run_dir: Path
    provenance: dict = field(default_factory=dict)
    tables: dict = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        """The evaluation size in pixels (maps and masks)."""
        return self.cfg.input_size

    @property
    def seed(self) -> int:
        return self.cfg.seed

    @property
    def mark(self) -> str:
        """' (random weights)' for figure titles of the CLIP encoder, '' when pretrained."""
        return "" if self.encoder.pretrained else " (random weights)"

    @property
    def encoders(self) -> list:
        return [self.encoder] + ([self.baseline] if self.baseline is not None else [])

    def category_samples(self, category: str | None = None) -> list[D.Sample]:
        """The samples of one category (default: the first)."""
        category = category or self.categories[0]
        return [s for s in self.samples if s.category == category]

    def config_for(self, encoder=None, **overrides) -> FiseConfig:
        """The session config for `encoder` (default: the CLIP) with `overrides` (method, filter_theta, ...)."""
        enc = encoder or self.encoder
        cfg = self.cfg
        if enc is not self.encoder:
            # a second encoder (the CNN) scores with its own size and a method without text
            cfg = cfg.replace(model=enc.model_name, pretrained=enc.weights, image_size=enc.image_size,
                              method="musc")
        return cfg.replace(**overrides)

    def detector(self, encoder=None, **overrides) -> Detector:
        """A Detector on `encoder` (default: the CLIP) sharing the session's feature cache."""
        enc = encoder or self.encoder
        return Detector(self.config_for(enc, **overrides), encoder=enc, cache=self.cache)

    def masks(self, samples: Sequence[D.Sample]) -> np.ndarray:
        """Ground-truth masks `[N, S, S]` at the evaluation size."""
        return eval_masks(list(samples), self.image_size)

    def save_table(self, df: pd.DataFrame, name: str) -> Path:
        """Write a table behind this notebook's numbers as `run_dir/<notebook>/<name>.csv` (atomic);
        `result` lists it and the report index links it."""
        from fiseclip_lib.plumbing.files import write_text_atomic

        path = self.run_dir / self.notebook / f"{name}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, df.to_csv(index=False))
        self.tables[name] = str(path.resolve())
        return path

    def result(self, text: str, numbers_from: Sequence = (), **extra) -> None:
        """`result` with this notebook's name and saved tables (see the module-level `result`)."""
        result(text, numbers_from=numbers_from or self.encoders, tables=self.tables, notebook=self.notebook,
               extra=extra or None)


def setup(notebook: str, dataset: str = "demo", root="../demo_data", categories=None, model: str = "fiseclip-tiny",
          pretrained: str = "none", image_size: int | None = 168, batch_size: int = 16, seed: int = 0,
          device: str = "auto", options: dict | None = None, baseline_model: str = "",
          baseline_pretrained: str = "imagenet", baseline_image_size: int | None = None,
          run_dir="../runs/notebooks", threads: int | None = None, show: bool = True) -> Session:
    """Everything a notebook needs before its lesson, in one call.

    Args:
        notebook: this notebook's name (tables go to `run_dir/<notebook>/`).
        dataset, root, categories: the data (`categories`: "a,b", a list, or None for all); the demo set is
            built on first use.
        model, pretrained, image_size, batch_size, seed, device: the CLIP and the batches.
        options: any other FiseConfig field.
        baseline_model, baseline_pretrained: a second encoder ("" for none), e.g. real ImageNet
            EfficientNet-Lite0 features for the matching branch.
        baseline_image_size: its input size (default: the CLIP's); a study that runs the CNN at another size
            loads it here, so that the provenance names the encoder its numbers come from.
        run_dir: where tables are written.
        threads: torch threads (default: the CPUs this process may use).
        show: display the provenance (encoders, weights banner, data, versions).
    Returns:
        a Session.
    """
    from fiseclip_lib.plumbing.cache import FeatureCache

    set_threads(threads)
    warnings.filterwarnings("ignore", message=".*QuickGELU.*")
    cats = _categories(categories)
    samples = prepare_dataset(dataset, root, cats)
    cats = cats or D.categories_of(samples)
    options = dict(options or {})
    # The lessons compare methods on the same batches, so `musc` matches within batches unless asked otherwise
    # (the library's default pools the whole category, as MuSc does; notebook 02 shows both).
    options.setdefault("musc_pool", "batch")
    cfg = FiseConfig(model=model, pretrained=pretrained, image_size=image_size, batch_size=batch_size, seed=seed,
                     device=device).replace(**options)
    encoder = load_encoder(**cfg.encoder_args())
    baseline_size = cfg.input_size if baseline_image_size is None else baseline_image_size
    baseline = (load_encoder(baseline_model, baseline_pretrained, baseline_size, cfg.device, seed=seed)
                if baseline_model else None)
    session = Session(notebook=notebook, dataset=dataset, root=str(root), categories=cats, samples=samples, cfg=cfg,
                      encoder=encoder, baseline=baseline, cache=FeatureCache(), run_dir=Path(run_dir))
    if show:
        session.provenance = show_provenance(dataset, root, seed, session.encoders, cfg, categories=cats,
                                             notebook=notebook)
    return session


# ------------------------------------------------------------------------------------------ studies

def defect_patch(mask: np.ndarray, grid: tuple[int, int]) -> tuple[int, int]:
    """The (row, col) of the patch a defect covers most (ties: the first in row-major order).

    Args:
        mask: `[H, W]` bool ground truth with at least one defect pixel.
        grid: the patch grid `(rows, cols)`.
    """
    m = torch.as_tensor(np.asarray(mask), dtype=torch.float32)[None, None]
    cover = torch.nn.functional.adaptive_avg_pool2d(m, grid)[0, 0]
    if float(cover.max()) <= 0:
        raise ValueError("defect_patch: the mask has no defect pixel")
    return divmod(int(cover.flatten().argmax()), grid[1])


def window_oracle_keep(masks, grid: tuple[int, int], degrees=(1, 3, 5)) -> torch.Tensor:
    """The best reference filter: ground truth, widened to the aggregation windows. A patch is dropped when
    any patch of its largest r x r window holds a defect pixel (a window is kept by its centre patch, so the
    plain `filtering.oracle_keep` would leave windows that reach into a defect). `[N, H, W]` -> `[N, h * w]`."""
    from fiseclip_lib.core.filtering import oracle_keep

    half = max(degrees) // 2
    drop = (~oracle_keep(masks, grid)).reshape(-1, 1, *grid).float()
    if half:
        drop = torch.nn.functional.max_pool2d(drop, 2 * half + 1, stride=1, padding=half)
    return (drop[:, 0] <= 0).flatten(1)


def contamination_study(detector: Detector, samples: Sequence[D.Sample], counts: Sequence[int] = (0, 1, 2, 3), n_references: int = 8, same_kind: bool = True,
                        text_qualities: Sequence[float] = (), theta: float = 0.5, n_probes: int = 2,
                        seed: int = 0, max_kinds: int | None = None, max_probes: int | None = None) -> pd.DataFrame:
    """How anomalous references hide a defect, and what a reference filter gives back.

    For each defect kind of the category and each probe (a defective image of that kind), a batch is the probe,
    `n_probes` normal probes and `n_references` references of which `count` are defective, either of the
    probe's own kind (`same_kind`: the case where matching fails, since a repeated defect finds its twin) or of
    other kinds. Batches are scored without filter, with an oracle filter (ground truth widened to the aggregation
    windows, `window_oracle_keep`: what any filter could at best do) and with text filters from SIMULATED text maps of the given patch AUROCs
    (`studies.simulated_text_map`, one map per image as CLIP's would be; keep = map < theta, at least 10 % kept).

    Cost: the images of one kind's batches are encoded once and their filtered distances computed once per
    filter (LNAMD and the keep masks are per image, so every batch drawn from them has the same distances);
    each batch then only selects and averages, which gives the same maps as `detector.score_features` on it.

    Args:
        detector: the matching detector (its layers, degrees, interval, smoothing and encoder are used).
        samples: one category (masks are read at the detector's image size).
        counts: numbers of defective references.
        text_qualities: patch AUROCs of simulated text filters (empty: none).
        max_kinds, max_probes: use at most this many defect kinds, and probes per kind (cost knobs).
    Returns:
        a row per (kind, probe, count, variant): columns kind, probe, count, variant, defect_score (max of the
        defective probe's map), normal_score (max over the normal probes), margin (their difference, > 0 when
        the defect stands out), pixel_auroc (over the probes' pixels), batch (its image paths, probes first,
        joined by "|").
    """
    from fiseclip_lib.core.filtering import apply_min_keep
    from fiseclip_lib.core.matching import lnamd, reference_distances
    from fiseclip_lib.evaluation.metrics import pixel_metrics
    from fiseclip_lib.core.postprocess import gaussian_smooth, upsample
    from fiseclip_lib.notebook.studies import batch_visual_map, simulated_text_map

    cfg = detector.config
    size = detector.encoder.image_size
    rng = random.Random(seed)
    good = [s for s in samples if s.label == 0]
    kinds = sorted({s.defect for s in samples if s.label == 1})[:max_kinds]
    rows = []
    for kind in kinds:
        own = [s for s in samples if s.label == 1 and s.defect == kind]
        other = [s for s in samples if s.label == 1 and s.defect != kind]
        probes_bad = own[:max_probes]
        if n_probes + n_references > len(good):
            continue
        normal = rng.sample(good, n_probes + n_references)
        # one pool per kind: the normal images, the defective probes and the defective references they use
        picks = {}
        for probe in probes_bad:
            refs_bad = [s for s in own if s is not probe] if same_kind else other
            if max(counts) <= len(refs_bad):
                picks[probe.path] = rng.sample(refs_bad, max(counts))
        if not picks:
            continue
        pool = list({s.path: s for s in normal + probes_bad + [r for v in picks.values() for r in v]}.values())
        where = {s.path: i for i, s in enumerate(pool)}
        masks = eval_masks(pool, size)
        feats = detector.encode([s.path for s in pool])
        grid = feats.grid
        keeps = {"no filter": None, "oracle filter": window_oracle_keep(masks, grid, cfg.degrees)}
        for q in text_qualities:
            sim = torch.as_tensor(simulated_text_map(masks, grid, q, seed=seed))
            keeps[f"text filter (simulated, AUROC {q:.2f})"] = apply_min_keep(sim < theta, sim, 0.1)
        dists = {name: torch.stack([reference_distances(lnamd(t, grid, r), keep=keep)
                                    for t in feats.layers.values() for r in cfg.degrees])
                 for name, keep in keeps.items()}
        for p_i, probe in enumerate(probes_bad):
            if probe.path not in picks:
                continue
            probes = [probe] + normal[:n_probes]
            for count in counts:
                batch = probes + picks[probe.path][:count] + normal[n_probes:n_probes + n_references - count]
                idx = [where[s.path] for s in batch]
                k = len(probes)
                for name, dist in dists.items():
                    a_v = batch_visual_map(dist, idx, cfg.topmin_max)
                    maps = gaussian_smooth(upsample(a_v, grid, size), cfg.smoothing_sigma).numpy()
                    px = pixel_metrics(masks[idx[:k]], maps[:k])
                    defect, normal_max = float(maps[0].max()), float(maps[1:k].max())
                    rows.append({"kind": kind, "probe": p_i, "count": count, "variant": name,
                                 "defect_score": defect, "normal_score": normal_max, "margin": defect - normal_max,
                                 "pixel_auroc": px["auroc"], "batch": "|".join(s.path for s in batch)})
    return pd.DataFrame(rows)


def patch_attention(encoder, image, operators: Sequence[str], patches: dict[str, tuple[int, int]]) -> dict:
    """Head-averaged attention of chosen patches in the restored last block, per operator.

    Args:
        encoder: a CLIP encoder. image: one image (path or PIL).
        patches: label -> (row, col) in the patch grid.
    Returns:
        {label: {operator: `[h, w]` attention weights over the patches (class token dropped)}}; identity
        attention (`maskclip`) is the one-hot map of the patch itself.
    """
    grid = encoder.grid
    px = encoder.preprocess([image])
    out = {name: {} for name in patches}
    for op in operators:
        att = encoder(px, layers=[encoder.num_layers], restore=op, return_attention=True).attention
        for name, (r, c) in patches.items():
            p = r * grid[1] + c
            if att is None:
                m = np.zeros(grid[0] * grid[1])
                m[p] = 1.0
            else:
                m = att[0].float().mean(0)[1 + p, 1:].cpu().numpy()
            out[name][op] = m.reshape(grid)
    return out


def operator_text_maps(encoder, images: Sequence, class_name: str, operators: Sequence[str],
                       class_names: dict | None = None) -> dict:
    """Patch-to-text maps A_T `[N, h, w]` of `images` per restoration operator (one encoder pass each)."""
    from fiseclip_lib.core.text import text_embeddings, text_map

    t = text_embeddings(encoder, class_name, class_names)
    px = encoder.preprocess(list(images))
    return {op: text_map(encoder(px, layers=[encoder.num_layers], restore=op).dense, t)
            .reshape(len(images), *encoder.grid).cpu().numpy() for op in operators}


def locality_table(encoder, images: Sequence, operators: Sequence[str]) -> pd.DataFrame:
    """Mean attention distance (patches) of each operator's restored last block over `images`."""
    from fiseclip_lib.encoder.restore import mean_attention_distance

    px = encoder.preprocess(list(images))
    rows = [{"operator": op, "mean_attention_distance": mean_attention_distance(
        encoder(px, layers=[encoder.num_layers], restore=op, return_attention=True).attention, encoder.grid)}
        for op in operators]
    return pd.DataFrame(rows)


def distance_panels(detector: Detector, batch: Sequence[D.Sample], masks: np.ndarray, degree: int = 3,
                    layer: int | None = None) -> tuple[dict, int, int]:
    """Per-reference nearest-patch distances of a defect patch and of the same patch in a normal image.

    Args:
        detector: the matching detector; batch: samples with at least one defective and one normal image;
        masks: their `[N, S, S]` ground truth; degree: LNAMD degree r; layer: default the middle matching layer.
    Returns:
        (panels, K, layer): panels maps a title to (distances to each other image, is it anomalous) as
        `plots.show_reference_distances` takes them; K the interval count for this batch.
    """
    from fiseclip_lib.core.matching import interval_count, lnamd, reference_distances

    feats = detector.encode([s.path for s in batch])
    layer = layer if layer is not None else detector.layers[len(detector.layers) // 2]
    d = reference_distances(lnamd(feats.layers[layer], feats.grid, degree))  # [j, i, p]
    i_bad = next(i for i, s in enumerate(batch) if s.label == 1)
    i_good = next(i for i, s in enumerate(batch) if s.label == 0)
    r, c = defect_patch(masks[i_bad], feats.grid)
    p = r * feats.grid[1] + c
    panels = {}
    for name, i in ((f"defect patch (row {r}, col {c})", i_bad), ("same patch, normal image", i_good)):
        others = [j for j in range(len(batch)) if j != i]
        panels[name] = (d[others, i, p].cpu().numpy(), np.array([batch[j].label == 1 for j in others]))
    return panels, interval_count(len(batch) - 1, detector.config.topmin_max), layer


record_figure_texts()  # inside `fiseclip report` only (see FIGURE_TEXT_MIME)
