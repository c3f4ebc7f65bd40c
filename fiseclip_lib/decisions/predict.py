"""From scores to decisions on unlabeled images: `predict`, the reference bank, scoring against references.

`predict(images, class_name, out=...)` scores a folder or glob of unlabeled images of one kind of object,
in batches formed exactly as `fiseclip run` forms them (the same seed, size and merge rule; RsCIN over all
images when the method uses it), decides normal / anomalous with a threshold (a `calibrate.Threshold`, a
number, or the default rule `default_threshold`: robust_z over the known-good bank's images scored as queries
when a bank is given and the scale allows it, else robust_z over this run's scores), and writes:
  predictions.csv  path, score, decision, batch, threshold, threshold_method, state, admitted, references,
                   overlay (one row per image, sorted by path; byte-identical on reruns)
  overlays/        <stem>.png: the original image at its original size, pixel for pixel, with the heat map
                   only where it exceeds the threshold (outlined), framed and bannered in the decision's
                   colour, and the colour bar (threshold marked) in a strip to its right: the PNG is wider and
                   taller than the image by that frame (`overlay_geometry`)
  maps.npz         with save_maps: float16 maps at the input size and their paths
  config.json      the resolved config, encoder identity, scoring mode, threshold record (with the default
                   rule: its name, target false-alarm rate, number of scores), provenance
Each run writes into a hidden staging folder and swaps its outputs in only once complete
(`files.staged_output`): `out` then holds exactly one run's outputs (a rerun leaves no stale overlay; a failed
or killed run leaves the previous one intact); other files in `out` are kept. The input walk never takes
files under `out`, and a path that exists is read literally (brackets in folder names are not a glob).
With `stream=True` the images are scored one at a time against a rolling bank (`stream.py`).

Reference bank (few-shot without training): known-good images added as references of every batch (or of
every streamed image). They are encoded once and aggregated once (LNAMD per image), never scored, and never
filtered by the text (a known-good image has no defect to filter away).

Scoring against references, the normalisation rule. Fusion normalises each branch over "the images scored
together" (`fusion.normalise`, option `fusion_norm`). In a batch (with or without a bank) these are the batch's
images, as in `run`, so `predict` without a bank gives `run`'s scores. When queries are scored against a
separate reference set without referencing each other (`Detector.score_against`, streaming), each query image is its
own group: its score depends only on itself and the references, never on which other images are scored with
it. So a streamed score equals `Detector.score_against([image], references)` exactly, and equals the in-batch score of
the image in the batch [image] + references whenever the scale does not depend on the batch (method `musc`
without RsCIN, `text`, or `fusion_norm=none`), which the tests check.
"""
from __future__ import annotations

import glob as globlib
import math
import os
import time
import unicodedata
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from fiseclip_lib.plumbing.images import IMAGE_EXTS, images_in, load_image
from fiseclip_lib.plumbing.files import (atomic_path, display_path, ensure_writable, output_lock, staged_output,
                                          write_csv_atomic, write_json_atomic)
from fiseclip_lib.core.detector import Detector
from fiseclip_lib.core.pool import SHIFT_COLUMNS, score_pool
from fiseclip_lib.core.references import BankEntry, ReferenceBank  # noqa: F401 - the bank is part of predict's API
from fiseclip_lib.errors import FiseclipError

PREDICTION_COLUMNS = ["path", "score", "decision", "batch", "threshold", "threshold_method", "state", "admitted",
                      "references", "overlay"]
DECISIONS = ("normal", "anomalous", "undecided")
MAX_STEM_BYTES = 150  # overlay names stay well below the usual 255-byte file-name limit
# What `predict` writes in --out: replaced as a whole by each run (`staged_output`), other files are kept.
PREDICT_OUTPUTS = ("predictions.csv", "overlays", "maps.npz", "config.json")


# ------------------------------------------------------------------------------------------ inputs

def collect_images(images, flag: str = "--images", exclude=None) -> tuple[list[str], Path | None]:
    """`--images` (or `--reference-dir`): a folder (its image files, not recursive), a glob (`**` recursive), or
    a list of paths.

    A path that exists is taken literally, brackets and all (`lot[3]/` is a folder, not a character class);
    in a glob, the leading folders that exist are taken literally too. Hidden files (names starting with '.')
    are skipped with a one-line warning saying how many. Nothing under `exclude` (the command's output folder)
    is ever taken: a recursive glob does not pick up the previous run's overlays.

    Args:
        images: a folder, a glob, or a list of paths.
        flag: the option the value came from, named in messages ("--images", "--reference-dir").
        exclude: a folder whose files are never inputs (the output folder), or None.
    Returns:
        (sorted paths, the folder paths are shown relative to, or None for absolute/as-given paths).
    """
    kinds = ", ".join(sorted(IMAGE_EXTS))
    hidden: list[str] = []
    if isinstance(images, (list, tuple)):
        paths = [str(p) for p in images]
        base = None
        if not paths:
            raise FiseclipError(f"{flag}: the list of images is empty; pass at least one image")
    else:
        spec = str(images)
        p = Path(spec)
        if not spec.strip():
            raise FiseclipError(f"{flag} is empty; pass a folder of images or a glob such as 'dir/**/*.png'")
        if p.is_dir():
            _inside_output(p, exclude, flag)
            paths = [str(x) for x in images_in(p)]
            hidden = [x.name for x in sorted(p.iterdir()) if x.name.startswith(".") and x.is_file()
                      and x.suffix.lower() in IMAGE_EXTS]
            base = p
            if not paths:
                more = f" ({len(hidden)} hidden file(s) such as {hidden[0]} are skipped)" if hidden else ""
                raise FiseclipError(f"{flag} {spec}: no image files ({kinds}) in this folder{more}; pass a folder "
                                    f"of images or a glob such as 'dir/**/*.png'")
        elif p.is_file():
            paths, base = [spec], p.parent
        elif any(ch in spec for ch in "*?["):
            pattern = _literal_prefix(spec)
            found = sorted(globlib.glob(pattern, recursive=True))
            every = globlib.glob(pattern, recursive=True, include_hidden=True)
            paths = [f for f in found if Path(f).is_file() and Path(f).suffix.lower() in IMAGE_EXTS]
            hidden = sorted(set(f for f in every if Path(f).is_file() and Path(f).suffix.lower() in IMAGE_EXTS)
                            - set(found))
            base = None
            if exclude is not None:
                skipped = [f for f in paths if _is_under(f, exclude)]
                if skipped:  # the previous run's overlays are outputs, never inputs
                    paths = [f for f in paths if f not in set(skipped)]
                    warnings.warn(f"{flag} {spec}: left out {len(skipped)} file(s) under the output folder "
                                  f"{exclude} (outputs are never inputs)")
                hidden = [f for f in hidden if not _is_under(f, exclude)]
            if not paths:
                more = f" ({len(hidden)} hidden file(s) such as {hidden[0]} are skipped)" if hidden else ""
                raise FiseclipError(f"{flag} {spec}: the pattern matches no image file ({kinds}){more}; quote it "
                                    f"so the shell does not expand it")
        else:
            raise FiseclipError(f"{flag} {spec} does not exist; pass a folder of images or a glob")
    if hidden:
        warnings.warn(f"{flag}: skipped {len(hidden)} hidden file(s) (names starting with '.', e.g. "
                      f"{Path(hidden[0]).name}); rename them to score them")
    return sorted(paths), base


def _literal_prefix(spec: str) -> str:
    """The glob `spec` with its longest leading run of existing folders escaped: `lot[3]/*.png` reads the
    folder `lot[3]` when it exists (a real character class still works where no such folder exists)."""
    parts = Path(spec).parts
    for k in range(len(parts) - 1, 0, -1):
        head = Path(*parts[:k])
        if head.is_dir():
            return os.path.join(globlib.escape(str(head)), *parts[k:])
    return spec


def _is_under(path, folder) -> bool:
    """Whether `path` is `folder` or inside it (both resolved: links and `..` cannot hide it)."""
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
        return True
    except ValueError:
        return False


def _inside_output(folder: Path, exclude, flag: str) -> None:
    """Refuse an input folder inside the output folder (its overlays/, say); the output folder itself is fine:
    it is read without recursion, and predict's outputs there are not images."""
    if (exclude is not None and Path(exclude).exists() and _is_under(folder, exclude)
            and Path(folder).resolve() != Path(exclude).resolve()):
        raise FiseclipError(f"{flag} {folder} is inside the output folder {exclude}: outputs are never inputs; "
                            f"choose another --out or move the images")


def safe_stem(name: str) -> str:
    """A file stem that is safe to create: control characters, path separators and undecodable bytes become
    `_`, a leading dot (a hidden file) becomes `_`, and long names are cut (keeping UTF-8 whole)."""
    out = []
    for ch in name:
        cat = unicodedata.category(ch)
        bad = cat in ("Cc", "Cs", "Zl", "Zp") or ch in "/\\\x00" or 0xDC80 <= ord(ch) <= 0xDCFF
        out.append("_" if bad else ch)
    s = "".join(out).strip() or "image"
    if s.startswith("."):
        s = "_" + s[1:]
    while len(s.encode("utf-8")) > MAX_STEM_BYTES:
        s = s[:-1]
    return s


def unique_stems(paths: Sequence[str]) -> list[str]:
    """One overlay stem per image: `safe_stem` of its stem, with `-2`, `-3`, ... when two images would share one
    (same stem in two folders, `a.png` and `a.jpg`, or names equal but for case, for case-insensitive disks)."""
    used, out = set(), []
    for p in paths:
        base = safe_stem(Path(p).stem)
        stem, k = base, 1
        while stem.casefold() in used:
            k += 1
            stem = f"{base}-{k}"
        used.add(stem.casefold())
        out.append(stem)
    return out


# ------------------------------------------------------------------------------------------ overlays

def overlay_geometry(width: int, height: int) -> dict:
    """Where `render_overlay` puts things, in pixels of the PNG (origin top-left).

    The image keeps its original size, pixel for pixel, at (x0, y0); around it a frame of `border` pixels and a
    banner of `banner` pixels on top (across the whole width), both in the decision's colour; the colour bar sits
    in a strip of `strip` pixels to the right, outside the image. So the PNG is (width + 2 border + strip) x
    (height + banner + border).

    Returns:
        {"x0", "y0", "border", "banner", "strip", "size": (png width, png height)}.
    """
    border = int(np.clip(round(min(width, height) / 64), 2, 6))
    banner = int(np.clip(round(height * 0.08), 16, 40))
    strip = int(np.clip(round(width * 0.16), 52, 110))
    return {"x0": border, "y0": banner, "border": border, "banner": banner, "strip": strip,
            "size": (width + 2 * border + strip, height + banner + border)}


OVERLAY_COLOURS = {"anomalous": "#d00000", "normal": "#007a00", "undecided": "#6b6b6b"}


def render_overlay(image, amap: np.ndarray, score: float, threshold: float | None, decision: str, path) -> None:
    """Write an overlay an operator can act on (PNG, atomic); leaves matplotlib's global state alone.

    Layout (`overlay_geometry`): the original image at its original size, untouched except where the map is
    above the threshold; a banner on top and a frame around the image in the decision's colour (red anomalous,
    green normal, grey undecided) with the decision, score and threshold; the colour bar in a strip to the right,
    outside the image, with the threshold marked. The heat map is drawn only where the map exceeds the threshold
    (semi-transparent, outlined by the threshold contour; the threshold is placed on the map's scale (score -
    threshold) below the map's peak, i.e. the threshold itself when the score is the map's maximum), so the image
    is never washed out and the hot region is what drove the decision: a normal image shows no heat. Without a
    threshold (a stream still calibrating) the region above the midpoint between the map's median and maximum is
    shown instead. The colour scale runs from the lower of the map's median (its normal patches' level) and the
    threshold to the higher of the threshold and the map's maximum (both in map units).

    Rendering uses an explicit `Figure` and Agg canvas (no pyplot, no backend switch, no rcParams), so calling
    it from a notebook leaves the notebook's figures and backend as they were.

    Args:
        image: a path or PIL image.
        amap: the anomaly map (any size; resized to the image, bilinear).
        score, threshold, decision: the image's score, the threshold (None: none yet) and the decision.
        path: the PNG to write.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from PIL import Image

    im = load_image(image) if not hasattr(image, "convert") else image.convert("RGB")
    w, h = im.size
    m = torch.as_tensor(np.asarray(amap, dtype=np.float32))[None, None]
    m = torch.nn.functional.interpolate(m, size=(h, w), mode="bilinear", align_corners=True)[0, 0].numpy()
    has_thr = threshold is not None and np.isfinite(threshold) and np.isfinite(score)
    # The threshold in map units: the image score is the map's maximum (plus beta * text score, or RsCIN's
    # re-scoring), so the level sits (score - threshold) below the map's peak; equal to the threshold itself
    # when the score is the map's maximum.
    peak = float(np.max(amap))
    level = peak - (float(score) - float(threshold)) if has_thr else None
    lo = min(float(np.median(m)), level if has_thr else np.inf)
    hi = max(float(m.max()), level if has_thr else -np.inf)
    hi = hi if hi > lo else lo + 1e-6
    level = level if has_thr else (lo + hi) / 2
    # the image area, composed in pixels: original colours except above the level, where the heat shows
    cmap = colormaps["jet"]
    norm = Normalize(vmin=lo, vmax=hi)
    base = np.asarray(im, dtype=np.float32) / 255.0
    hot = m > level
    heat = cmap(norm(m))[..., :3]
    area = base.copy()
    area[hot] = 0.45 * base[hot] + 0.55 * heat[hot]
    inside = np.zeros_like(hot)  # the contour: hot pixels with a 4-neighbour that is not hot
    inside[1:-1, 1:-1] = hot[1:-1, 1:-1] & hot[:-2, 1:-1] & hot[2:, 1:-1] & hot[1:-1, :-2] & hot[1:-1, 2:]
    area[hot & ~inside] = 1.0
    g = overlay_geometry(w, h)
    width, height = g["size"]
    colour = OVERLAY_COLOURS.get(decision, OVERLAY_COLOURS["undecided"])
    # dpi 1: the canvas is exactly width x height pixels; sizes in points are then pixels * 72
    pt = 72.0
    fig = Figure(figsize=(width, height), dpi=1, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    frame_w = (w + 2 * g["border"]) / width
    banner_h = g["banner"] / height  # the banner spans the whole width: the text has room
    for box in ((0, 0, frame_w, 1), (0, 1 - banner_h, 1, banner_h)):
        fig.patches.append(Rectangle(box[:2], *box[2:], transform=fig.transFigure, facecolor=colour,
                                     edgecolor="none", zorder=0))
    fig.figimage((area * 255).round().astype(np.uint8), xo=g["x0"], yo=height - g["y0"] - h, origin="upper",
                 zorder=1)
    font = max(7.0, g["banner"] * 0.55)
    thr_text = f"{'>' if score > threshold else '<='} {threshold:.3g}" if has_thr else "(no threshold yet)"
    # the longest banner text that fits the PNG's width (about 0.68 font sizes per character, bold)
    texts = [f"{decision.upper()}  {score:.3g} {thr_text}", f"{decision.upper()}  {score:.3g}", decision.upper()]
    label = next((t for t in texts if len(t) * 0.68 * font <= width - 2 * g["border"]), texts[-1])
    fig.text(g["border"] / width, 1 - g["banner"] / 2 / height, label,
             ha="left", va="center", color="white", fontsize=font * pt, fontweight="bold", parse_math=False)
    # the colour bar in the strip right of the frame
    bar_h = 0.8 * h
    cax = fig.add_axes(((w + 2 * g["border"] + 6) / width, (g["border"] + 0.1 * h) / height,
                        max(6, g["strip"] * 0.18) / width, bar_h / height))
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax)
    bar.outline.set_linewidth(0.5 * pt)
    tick_font = max(6.0, min(11.0, g["strip"] * 0.16))
    cax.tick_params(labelsize=tick_font * pt, length=2 * pt, width=0.5 * pt, pad=1.5 * pt)
    ticks = {lo: f"{lo:.3g}", hi: f"{hi:.3g}"}
    if has_thr:  # the threshold is a labelled tick; an end tick too close to it gives way
        ticks = {v: t for v, t in ticks.items() if abs(v - level) > 0.15 * (hi - lo)}
        ticks[level] = "thr"
        cax.axhline(level, color="black", lw=2 * pt)
        cax.axhline(level, color="white", lw=0.8 * pt)
    bar.set_ticks(list(ticks))
    bar.ax.set_yticklabels(list(ticks.values()))
    canvas.draw()
    png = Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())
    with atomic_path(path) as tmp:
        png.save(tmp, format="PNG")


# ------------------------------------------------------------------------------------------ default threshold

def bank_scale_mismatch(cfg) -> str | None:
    """Why bank images scored as queries would not be on the run's scale (None: they are, exactly).

    A bank query is scored against the batch without being part of it, so it is normalised on its own. That equals
    the run's scale only when no step normalises over the images scored together: RsCIN (min-max over the run) and
    fusion's branch normalisation (`fusion_norm` over the batch) both do. On the demo (textile, fiseclip, tiny random
    CLIP) per-image normalised bank scores sat below the run's normal scores and flagged 11 of 44 normal images.
    """
    if cfg.use_rscin:
        return "RsCIN re-scores min-max over this run's images (--set rscin=false gives a scale that stays put)"
    if cfg.spec.visual and cfg.spec.text and cfg.fusion_norm != "none":
        return (f"fusion normalises each branch over the images scored together (fusion_norm={cfg.fusion_norm}; "
                f"--set fusion_norm=none gives a scale that stays put)")
    if cfg.tiles is not None or cfg.align != "none":  # bank queries are scored whole and unregistered
        return (f"the run's images are cut into tiles or registered (tiles={cfg.tiles}, align={cfg.align}), the bank "
                f"images would be scored whole")
    return None


def bank_query_scores(detector: Detector, paths: Sequence, bank: ReferenceBank, class_name: str) -> np.ndarray:
    """Scores of the known-good images scored as the run's images are: each bank image as a query against the
    images of each batch (filtered as in-batch references are) plus the other bank images, so that it sees as
    many references, of the same kinds, as a scored image. A clean sample of normal scores on the run's scale,
    whatever share of the run is defective (one score per bank image and batch).

    Exact for scores that do not depend on which images are scored together (musc without RsCIN, `text`,
    `fusion_norm=none`). Empty when the bank has fewer than 2 images, or when the run's scale depends on the
    images scored together (`bank_scale_mismatch`: RsCIN, fusion normalisation over the batch). Cost: the run's images
    are encoded again (feature-cache hits with a cache) and each bank image is matched once per batch.

    Args:
        detector: the run's Detector; paths: the images scored, in the run's order; bank: the known-good bank.
        class_name: the object's name.
    Returns:
        float64 array of scores.
    """
    from fiseclip_lib.core.pool import make_batches

    cfg = detector.config
    if len(bank) < 2 or bank_scale_mismatch(cfg) or any(e.feats is None for e in bank.entries):
        return np.zeros(0)
    out = []
    for batch in make_batches(list(paths), cfg.batch_size_for(len(paths)), seed=cfg.seed, shuffle=cfg.shuffle):
        others = ReferenceBank.from_images(detector, batch, class_name, filtered=True)
        for i, entry in enumerate(bank.entries):
            refs = ReferenceBank(others.entries + bank.without(i).entries, identity=bank.identity)
            out.append(float(detector.score_features(entry.feats, class_name, references=refs,
                                                     mutual=False).scores[0]))
    return np.asarray(out, dtype=np.float64)


def default_threshold(scores, far: float, normal_scores=None) -> tuple[float, dict]:
    """The unsupervised threshold of `predict` when none is given, and its record.

    With a known-good bank (`normal_scores` from `bank_query_scores`, at least 5): robust_z over those scores,
    median + z * 1.4826 * MAD of known-normal images only, so that a run with many defects (which shifts the
    run's median and inflates its MAD: 1 of 5 visible defects caught in an outside trial) keeps the threshold
    of a clean line; never below the highest of those scores (few scores give a noisy MAD; above the highest of
    n exchangeable normal scores the false-alarm rate is at most 1/(n + 1) on average). Without a bank: robust_z
    over this run's scores, valid while fewer than half of them are anomalous. Either way z = Phi^-1(1 - far); the expected false-alarm rate is `far` if normal scores were
    Gaussian, usually somewhat higher (image scores are maxima, skewed right; a bank of a few images gives a
    noisy MAD).

    Args:
        scores: this run's scores; far: the target false-alarm rate; normal_scores: known-normal scores or None.
    Returns:
        (threshold, record {"rule", "method", "false_alarm_rate", "n_scores", "summary"}).
    """
    from fiseclip_lib.decisions.calibrate import robust_threshold

    normal = np.asarray([] if normal_scores is None else normal_scores, dtype=np.float64)
    normal = normal[np.isfinite(normal)]
    if normal.size >= 5:
        value, rule = robust_threshold(normal, far), "robust_z over the known-good bank scored as queries"
        n = int(normal.size)
        summary = f"robust_z over {n} known-good bank scores (target false alarms {far:g})"
        if value < normal.max():
            # a few bank scores give a noisy MAD (near 0 when some agree): never flag a score a known-good image
            # reached. Above the highest of n exchangeable normal scores, the false-alarm rate is at most
            # 1/(n + 1) on average, whatever their distribution.
            value = float(normal.max())
            summary = (f"robust_z over {n} known-good bank scores, raised to their maximum (target false alarms "
                       f"{far:g}; at most 1/{n + 1} on average)")
    else:
        value, rule = robust_threshold(scores, far), "robust_z over this run's scores"
        n = int(np.isfinite(np.asarray(scores, dtype=np.float64)).sum())
        summary = f"robust_z this run (false alarms {far:g})"
    return float(value), {"method": summary, "rule": rule, "false_alarm_rate": far, "n_scores": n,
                          "note": "the target holds if normal scores are Gaussian; expect a somewhat higher rate "
                                  "(image scores are right-skewed maxima; few normal scores give a noisy MAD)"}


# ------------------------------------------------------------------------------------------ predict

def config_record(detector: Detector, mode: str, n_references: int, bank_size: int | None = None) -> dict:
    """What a prediction's scores depend on: config, encoder, decision mode (for threshold checks).

    Args:
        detector: the Detector that scored.
        mode: batch or stream (a batch with references is recorded as bank: its scores have another scale).
        n_references: the reference bank's size.
        bank_size: a stream's rolling bank size (None for a batch).
    Returns:
        {config, encoder, scoring: {mode, references, bank_size}, config_hash}.
    """
    from fiseclip_lib.decisions.calibrate import config_hash

    if mode == "batch" and n_references:
        mode = "bank"
    cfg = detector.config.resolved()
    return {"config": cfg, "encoder": detector.encoder.identity(),
            "scoring": {"mode": mode, "references": n_references, "bank_size": bank_size},
            "config_hash": config_hash(cfg, mode)}


def predict(images, class_name: str, out=None, config=None, detector: Detector | None = None, cache=None,
            reference_dir=None, stream: bool = False, bank_size: int = 16, threshold=None,
            false_alarm_rate: float | None = None, force_threshold: bool = False, save_maps: bool = False,
            overlays: bool = True, progress: bool = True, confirm=None) -> pd.DataFrame:
    """Score unlabeled images of one object class and decide normal / anomalous (module doc).

    Args:
        images: a folder, a glob, or a list of paths.
        class_name: the object's name for the prompts (e.g. "bottle").
        out: output folder (None: nothing is written, the table is returned).
        config: a FiseConfig (default FiseConfig()); ignored when detector is given.
        detector: an existing Detector (reuses its encoder and cache).
        cache: a FeatureCache for a new detector.
        reference_dir: a folder or glob of known-good images added as references of every batch / image.
        stream: score one image at a time against a rolling bank of `bank_size` accepted images (`stream.py`).
        confirm: (stream) paths of images that are the new normal after a change: when the first of them
            arrives, the rolling bank and score history are reset to them (`Streamer.confirm_normal`).
        threshold: a `calibrate.Threshold`, a path to threshold.json, a number, or None (the unsupervised rule
            over this run's scores; when streaming, over the scores of images judged normal so far).
        false_alarm_rate: target rate of the unsupervised rule (default calibrate.DEFAULT_FALSE_ALARM_RATE).
        force_threshold: a threshold calibrated for another config only warns instead of stopping.
        save_maps: also write maps.npz.
        overlays: write overlays/<stem>.png.
        progress: show a progress bar.
    Returns:
        The predictions table (PREDICTION_COLUMNS), sorted by path.
    """
    from fiseclip_lib.decisions.calibrate import DEFAULT_FALSE_ALARM_RATE, load_threshold
    from fiseclip_lib.config import FiseConfig

    if not class_name or not str(class_name).strip():
        raise FiseclipError("--class-name is required: the object's name for the text prompts, e.g. bottle")
    paths, base = collect_images(images, "--images", exclude=out)
    if out is not None:
        out = ensure_writable(out)
    detector = detector or Detector(config or FiseConfig(), cache=cache)
    # an empty text is a mistake to name; an empty list means no bank
    ref_paths = (collect_images(reference_dir, "--reference-dir", exclude=out)[0]
                 if reference_dir or isinstance(reference_dir, str) else [])
    cfg = detector.config
    if ref_paths and not stream and cfg.rscin is None and cfg.use_rscin:
        # RsCIN's automatic default is for benchmarks: its min-max over each run's images would keep the known-good
        # bank from anchoring the threshold (bank_scale_mismatch); an explicit rscin=true keeps it
        detector = Detector(cfg.replace(rscin=False), encoder=detector.encoder, cache=detector.cache)
        warnings.warn("with a known-good bank, RsCIN is off unless asked for (--set rscin=true): decisions need a "
                      "scale that does not move with each run")
    mode = "stream" if stream else "batch"
    thr = load_threshold(threshold) if threshold is not None else None
    if thr is not None:  # decided in the mode the scores will have: a reference bank moves batch scores
        thr.check(detector, "bank" if reference_dir and not stream else mode, force=force_threshold,
                  class_name=class_name)
        moving = None if stream else bank_scale_mismatch(detector.config)
        if moving:  # e.g. an all-good batch is spread over the same range as a batch with defects
            warnings.warn(f"{moving}, so a fixed threshold means something else in every batch")
    far = DEFAULT_FALSE_ALARM_RATE if false_alarm_rate is None else float(false_alarm_rate)
    if out is None:
        return _predict(paths, base, class_name, None, detector, ref_paths, stream, bank_size, thr, far, save_maps,
                        False, progress, confirm)
    # staged: a rerun replaces the previous outputs only once complete (no stale overlays, nothing lost on failure)
    with output_lock(out, command=f"fiseclip predict ({mode}, method {detector.config.method})"), \
            staged_output(out, "predict", owns=PREDICT_OUTPUTS) as stage:
        return _predict(paths, base, class_name, stage, detector, ref_paths, stream, bank_size, thr, far, save_maps,
                        overlays, progress, confirm)


def _predict(paths, base, class_name, out, detector, ref_paths, stream, bank_size, thr, far, save_maps, overlays,
             progress, confirm=None):
    from fiseclip_lib.plumbing.provenance import RANDOM_WEIGHTS_NOTE, provenance

    t0 = time.time()
    if ref_paths:  # by content: a copy, a link or another name of an image to score is that image
        from fiseclip_lib.plumbing.cache import image_hash

        digests = {image_hash(p): p for p in paths}
        for r in ref_paths:
            twin = digests.get(image_hash(r))
            if twin is not None:
                raise FiseclipError(f"reference image {r} is also an image to score ({twin}: same content): a "
                                    f"reference is never the image it judges; keep --reference-dir apart from --images")
    bank = ReferenceBank.from_images(detector, ref_paths, class_name, filtered=False)
    suspects = [a for a in bank.audit(detector, class_name) if a["suspect"]]
    if suspects:  # a defective "known-good" image would hide its defect in the images (docs/decisions.md)
        from fiseclip_lib.core.references import AUDIT_Z

        named = ", ".join(f"{a['path']} (robust z {a['z']:.1f})" for a in suspects)
        warnings.warn(f"reference(s) {named} score far above the other references (z > {AUDIT_Z:g}): check that "
                      f"they are free of defects, or leave them out of --reference-dir")
    mode = "stream" if stream else "batch"
    enc = detector.encoder.identity()
    if not enc["pretrained"] and progress:
        print(f"NOTE: {RANDOM_WEIGHTS_NOTE}", flush=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if stream:
            from fiseclip_lib.decisions.stream import Streamer

            streamer = Streamer(detector, class_name, bank_size=bank_size, references=bank,
                                threshold=thr.value if thr is not None else None, false_alarm_rate=far,
                                confirm=confirm)
            order = paths  # sorted names: serial numbers and time stamps give the production order
            items = []
            for i, p in enumerate(_progress(order, progress, class_name)):
                items.append(streamer.push(p, keep_map=True))
            rows = [{"path": r.path, "score": r.score, "decision": r.decision, "batch": r.index,
                     "threshold": r.threshold, "state": r.state, "admitted": r.admitted,
                     "references": r.references, **({} if r.shift is None else dict(zip(SHIFT_COLUMNS, r.shift)))}
                    for r in items]
            maps = [r.map for r in items]
            thr_method = thr.method if thr is not None else f"robust_z online (false alarms {far:g})"
            thr_record = {"method": thr_method, "false_alarm_rate": far}
        else:
            shifts = {} if detector.config.align != "none" else None
            scored, maps_arr = score_pool(detector, paths, class_name, references=bank if len(bank) else None,
                                          progress=progress, shifts=shifts)
            n_batch = {}
            for _, _, b in scored:
                n_batch[b] = n_batch.get(b, 0) + 1
            scores = np.array([s for _, s, _ in scored])
            batch_free = bool(detector.config.spec.windows)  # WinCLIP: the bank alone, never the batch
            if thr is None:
                why_not = bank_scale_mismatch(detector.config) if len(bank) else None
                if why_not:
                    warnings.warn(f"{why_not}, so the known-good bank cannot anchor the threshold: it comes from "
                                  f"this run's scores")
                normal = bank_query_scores(detector, paths, bank, class_name) if len(bank) and not why_not else None
                value, thr_record = default_threshold(scores, far, normal)
                thr_method = thr_record["method"]
            else:
                value, thr_method = thr.value, thr.method
            rows = [{"path": paths[i], "score": float(v), "batch": b, "threshold": value, "state": "batch",
                     "admitted": "", "references": len(bank) + (0 if batch_free else n_batch[b] - 1),
                     "decision": "anomalous" if v > value else "normal",
                     **({} if shifts is None else dict(zip(SHIFT_COLUMNS, shifts.get(i, (math.nan, math.nan)))))}
                    for i, v, b in scored]
            maps = list(maps_arr)
    notes = sorted({str(w.message) for w in caught})
    for n in notes:
        warnings.warn(n)
    stems = unique_stems([r["path"] for r in rows])
    for r, stem in zip(rows, stems):
        r["threshold_method"] = thr_method
        r["overlay"] = f"overlays/{stem}.png" if (out is not None and overlays) else ""
    if out is not None and overlays:
        for r, m in zip(rows, maps):
            render_overlay(r["path"], m, r["score"], r["threshold"], r["decision"], out / r["overlay"])
    for r in rows:
        r["path"] = display_path(r["path"], base)
    shift_columns = SHIFT_COLUMNS if rows and SHIFT_COLUMNS[0] in rows[0] else []
    df = pd.DataFrame(rows, columns=PREDICTION_COLUMNS + shift_columns)
    order = np.argsort(df["path"].to_numpy(), kind="stable")
    df = df.iloc[order].reset_index(drop=True)
    if out is None:
        return df
    record = {**config_record(detector, mode, len(bank), bank_size if stream else None),
              "class_name": class_name, "images": len(paths), "references": [str(p) for p in ref_paths],
              "threshold": thr.to_dict() if thr is not None else thr_record,
              "weights_note": None if enc["pretrained"] else RANDOM_WEIGHTS_NOTE, "notes": notes,
              **provenance(), "wall_time_s": round(time.time() - t0, 3)}
    write_json_atomic(out / "config.json", record)
    if save_maps:
        with atomic_path(out / "maps.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, maps=np.stack([maps[i] for i in order]).astype(np.float16),
                                    paths=np.array(df["path"].tolist()))
    write_csv_atomic(out / "predictions.csv", df)
    return df


def default_rule_study(detector: Detector, images, class_name: str, reference_dir, label_of: dict,
                       false_alarm_rate: float = 0.01) -> pd.DataFrame:
    """Both default rules on the same scores (a run with a known-good bank): robust_z over this run's scores
    versus over the bank scored as queries (`default_threshold`), with what each catches and flags.

    Args:
        detector: the Detector (its config decides whether the bank can anchor the threshold: no RsCIN).
        images: the images of the run (folder, glob or list); reference_dir: the known-good images.
        class_name: the object's name; label_of: path as given -> 1 (defective) or 0, to count the outcomes.
        false_alarm_rate: the rules' target.
    Returns:
        One row per rule: rule, threshold, n_scores, defects_caught, defects, normals_flagged, normals,
        recall, false_alarm_rate (measured on this run's normal images).
    """
    paths = collect_images(images)[0]
    refs = collect_images(reference_dir)[0]
    df = predict(paths, class_name, detector=detector, reference_dir=refs, progress=False,
                 false_alarm_rate=false_alarm_rate)
    scores = df.score.to_numpy()  # sorted by path, as `paths`
    labels = np.array([int(label_of[p]) for p in paths])
    bank = ReferenceBank.from_images(detector, refs, class_name, filtered=False)
    normal = bank_query_scores(detector, paths, bank, class_name)
    rows = []
    for name, normal_scores in (("robust_z over this run", None), ("robust_z over the known-good bank", normal)):
        value, rec = default_threshold(scores, false_alarm_rate, normal_scores)
        flag = scores > value
        rows.append({"rule": name, "threshold": value, "n_scores": rec["n_scores"],
                     "defects_caught": int((flag & (labels == 1)).sum()), "defects": int((labels == 1).sum()),
                     "normals_flagged": int((flag & (labels == 0)).sum()), "normals": int((labels == 0).sum()),
                     "recall": float(flag[labels == 1].mean()) if (labels == 1).any() else float("nan"),
                     "false_alarm_rate": float(flag[labels == 0].mean()) if (labels == 0).any() else float("nan")})
    return pd.DataFrame(rows)


def _progress(items, enabled: bool, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return items
    return tqdm(items, desc=desc, unit="img", disable=not enabled)


__all__ = ["ReferenceBank", "BankEntry", "predict", "collect_images", "bank_query_scores", "bank_scale_mismatch",
           "default_threshold", "default_rule_study", "render_overlay", "overlay_geometry", "unique_stems", "safe_stem",
           "PREDICTION_COLUMNS"]
