"""Small study helpers of the lesson notebooks (00, 02, 04, 06): no display except the one plotting helper.

* `filter_audit` says why `fiseclip` and `fiseclip-nofilter` can give identical metrics on a category: the
  text filter removed no reference patch, or the patches it removed were never among the K nearest references
  of any patch (the interval minimum did not change), or it did change A_V (then the metrics differ or the
  change was too small to reorder pixels).
* `simulated_benchmark` is the benchmark of notebook 04 that means something offline: the REAL matching map of
  a pretrained CNN, with a SIMULATED text map of known quality (`studies.simulated_text_map`) in place of CLIP's
  text branch, scored as the four methods score (matching only, text only, fusion without and with the filter).
* `dot_ranking` draws configurations as dots on an axis that states its spread (a bar chart cut near the data
  would inflate a 0.006 difference into a wall of bars).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from fiseclip_lib.core.filtering import reference_keep
from fiseclip_lib.core.fusion import fuse
from fiseclip_lib.core.pool import make_batches
from fiseclip_lib.core.postprocess import rscin
from fiseclip_lib.errors import FiseclipError
from fiseclip_lib.evaluation import data as D
from fiseclip_lib.evaluation.run import eval_masks, evaluate_category
from fiseclip_lib.notebook.studies import SIMULATED_LABEL, patch_labels, simulated_text_map

# name in the tables -> the method whose post-processing (RsCIN or not) it follows
SIMULATED_METHODS = {"musc": "musc", "text [SIMULATED]": "text",
                     "fiseclip-nofilter [SIMULATED text]": "fiseclip-nofilter", "fiseclip [SIMULATED text]": "fiseclip"}


def _batches(detector, samples: Sequence[D.Sample]) -> list[list[int]]:
    """Indices of `samples` in the batches the detector's config forms (as `fiseclip run` forms them)."""
    cfg = detector.config
    return make_batches(list(range(len(samples))), cfg.batch_size_for(len(samples)), seed=cfg.seed,
                        shuffle=cfg.shuffle)


def _flat(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x)).reshape(len(x), -1).float()


def why_identical(removed: int, max_change: float, tol: float = 1e-6) -> str:
    """The reason the filtered and unfiltered matching maps agree (or do not), as one phrase.

    Args:
        removed: reference patches the filter removed in the category.
        max_change: the largest |A_V(filtered) - A_V(unfiltered)| over the category's patches.
    Returns:
        "the filter removed no reference patch", "the removed patches were never among the K nearest (A_V
        unchanged)" or "the filter changed A_V by up to ...".
    """
    if removed == 0:
        return "the filter removed no reference patch"
    if max_change <= tol:
        return f"the {removed} removed patches were never among the K nearest references (A_V unchanged)"
    return f"the filter changed A_V by up to {max_change:.3g}"


def filter_audit(detector, samples: Sequence[D.Sample], categories: Sequence[str] | None = None) -> pd.DataFrame:
    """What the text filter of a `fiseclip` detector did, category by category, on the batches `fiseclip run` forms.

    Args:
        detector: a Detector whose method filters references with text (`fiseclip`), ideally with a feature cache.
        samples: the dataset's samples; categories: the ones to audit (default: all).
    Returns:
        A row per category: reference_patches (patches of all batches), removed (dropped by the filter),
        removed_share, defect_share_of_removed (the removed patches that hold a defect pixel; NaN if none
        removed), max_av_change (max |A_V filtered - A_V unfiltered|) and why (`why_identical`).
    """
    if not detector.config.spec.text_filter:
        raise FiseclipError(f"method {detector.config.method!r} has no text filter to audit; use fiseclip")
    rows = []
    for cat in categories or D.categories_of(samples):
        cs = [s for s in samples if s.category == cat]
        total = removed = removed_defect = 0
        change = 0.0
        for idx in _batches(detector, cs):
            batch = [cs[i] for i in idx]
            feats = detector.encode([s.path for s in batch])
            n = len(batch)
            total += n * int(np.prod(feats.grid))
            filtered = detector.score_features(feats, cat)
            if filtered.keep is None:  # a batch of one image: no references, nothing to filter
                continue
            everything = torch.ones(n, int(np.prod(feats.grid)), dtype=torch.bool)
            unfiltered = detector.score_features(feats, cat, keep=everything)
            dropped = ~filtered.keep.reshape(n, -1)
            defect = patch_labels(eval_masks(batch, detector.encoder.image_size), tuple(feats.grid))
            removed += int(dropped.sum())
            removed_defect += int((dropped & defect).sum())
            change = max(change, float(np.abs(filtered.visual_map - unfiltered.visual_map).max()))
        rows.append({"category": cat, "reference_patches": total, "removed": removed,
                     "removed_share": removed / total if total else float("nan"),
                     "defect_share_of_removed": removed_defect / removed if removed else float("nan"),
                     "max_av_change": change, "why": why_identical(removed, change)})
    return pd.DataFrame(rows)


def simulated_benchmark(detector, samples: Sequence[D.Sample], categories: Sequence[str] | None = None,
                        text_auroc: float = 0.85, seed: int = 0) -> pd.DataFrame:
    """The four methods on REAL matching features with a SIMULATED text branch of known patch AUROC.

    For each batch (formed as `fiseclip run` forms them): A_V from the detector's (matching-only) encoder, once
    over all references and once over the references the simulated text keeps (`A_T < filter_theta`, with the
    config's `filter_min_keep`); A_T the simulated map of those images. The methods: `musc` = A_V, `text` = A_T,
    `fiseclip-nofilter` = fuse(A_V, A_T), `fiseclip` = fuse(filtered A_V, A_T), with the config's fusion, then the
    detector's post-processing (RsCIN where the method uses it) and the benchmark's metrics (`evaluate_category`).

    Args:
        detector: a Detector on a pretrained matching encoder (e.g. EfficientNet-Lite0, method musc).
        samples, categories: the data (default: all categories).
        text_auroc: the simulated text map's patch AUROC; seed: its noise seed.
    Returns:
        A row per (method, category) with the metrics of `evaluate_category`, plus removed_share (reference
        patches the simulated filter dropped; NaN for the methods without filter) and the label `text branch`
        (SIMULATED_LABEL, or "none" for musc).
    """
    cfg = detector.config
    rows = []
    for cat in categories or D.categories_of(samples):
        cs = [s for s in samples if s.category == cat]
        size = detector.encoder.image_size
        batches = _batches(detector, cs)
        if min(len(idx) for idx in batches) < 2:
            raise FiseclipError(f"category {cat}: a batch of one image has no references to match; use batch_size >= 2")
        feats_of = {b: detector.encode([cs[i].path for i in idx]) for b, idx in enumerate(batches)}
        grid = tuple(feats_of[0].grid)
        text = torch.as_tensor(simulated_text_map(eval_masks(cs, size), grid, text_auroc, seed=seed))
        maps = {m: [None] * len(cs) for m in SIMULATED_METHODS}
        scores = {m: np.zeros(len(cs)) for m in SIMULATED_METHODS}
        embeddings = []
        total = removed = 0
        for b, idx in enumerate(batches):
            feats, a_t = feats_of[b], text[idx]
            keep, _ = reference_keep(a_t, "threshold", cfg.filter_theta, min_keep=cfg.filter_min_keep)
            total, removed = total + keep.numel(), removed + int((~keep).sum())
            a_v = _flat(detector.score_features(feats, cat).visual_map)
            a_vf = _flat(detector.score_features(feats, cat, keep=keep).visual_map)
            patches = {"musc": a_v, "text [SIMULATED]": a_t,
                       "fiseclip-nofilter [SIMULATED text]": fuse(a_v, a_t, cfg.fusion, cfg.alpha, cfg.gate_tau,
                                                                  cfg.fusion_norm),
                       "fiseclip [SIMULATED text]": fuse(a_vf, a_t, cfg.fusion, cfg.alpha, cfg.gate_tau,
                                                         cfg.fusion_norm)}
            for m, patch in patches.items():
                r = detector.batch_result(feats, patch.float())
                for j, i in enumerate(idx):
                    maps[m][i], scores[m][i] = r.maps[j], r.scores[j]
            embeddings.append(r.embeddings)
        order = [i for idx in batches for i in idx]
        for m, base in SIMULATED_METHODS.items():
            if cfg.replace(method=base).use_rscin:  # the category-level re-scoring `score_pool` applies
                scores[m][order] = rscin(scores[m][order], np.concatenate(embeddings), cfg.rscin_ks_for(None)).numpy()
            metrics = evaluate_category(cs, scores[m], np.stack(maps[m]), pixel=True)
            rows.append({"method": m, "category": cat, **metrics,
                         "removed_share": removed / total if base == "fiseclip" else float("nan"),
                         "text branch": SIMULATED_LABEL if m != "musc" else "none"})
    return pd.DataFrame(rows)


def dot_ranking(labels: Sequence[str], values: Sequence[float], xlabel: str, title: str = ""):
    """Configurations as dots, best on top, on an axis around the data whose span is stated in the title.

    Args:
        labels: one label per configuration; values: its metric (same order, any order of merit).
        xlabel: the axis label (say the unit); title: the figure title (the spread is appended).
    Returns:
        The matplotlib figure (the caller shows it with `plt.show()`).
    """
    import matplotlib.pyplot as plt

    from fiseclip_lib.notebook.plots import literal_text

    values = np.asarray(values, float)
    if len(values) != len(labels) or not len(values):
        raise FiseclipError(f"dot_ranking needs one value per label, got {len(values)} values for {len(labels)} labels")
    order = np.argsort(-values, kind="stable")
    fig, ax = plt.subplots(figsize=(6.5, 0.8 + 0.35 * len(values)), layout="constrained")
    y = np.arange(len(values))[::-1]
    ax.hlines(y, values.min(), values[order], color="0.8", lw=1)
    ax.plot(values[order], y, "o", color="tab:green")
    ax.set_yticks(y, [str(labels[i]) for i in order], fontsize=8)
    ax.set_xlabel(xlabel)
    spread = float(values.max() - values.min())
    ax.set_title(f"{title}{'; ' if title else ''}spread {spread:.3g} (axis spans the data, not 0-1)", fontsize=9)
    return literal_text(fig)  # labels are configuration values: a `$` in them shows as a dollar sign


def real_weights_box(what: str, notebook: str) -> str:
    """The Markdown box that stands in for a section whose offline numbers would be random-weight noise.

    Args:
        what: what the section shows with real weights (one phrase).
        notebook: the notebook's number for the command, e.g. "04".
    Returns:
        A Markdown blockquote naming the classroom command.
    """
    return (f"> **Needs real weights.** {what} With the random-weights CLIP of the offline default these would be "
            f"noise, so only a small example follows. Run the classroom setting: `fiseclip report --params "
            f"params/classroom.yaml --only {notebook}` (ViT-B-16, OpenAI weights; CPU is enough).")
