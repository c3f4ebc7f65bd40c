"""From scores to decisions on unlabeled images: `predict`, the reference bank, scoring against references.

`predict(images, class_name, out=...)` scores a folder or glob of unlabeled images of one kind of object,
in batches formed exactly as `fiseclip run` forms them (the same seed, size and merge rule; RsCIN over all
images when the method uses it), decides normal / anomalous with a threshold (a `calibrate.Threshold`, a
number, or the unsupervised rule over this run's scores), and writes:
  predictions.csv  path, score, decision, batch, threshold, threshold_method, state, admitted, references,
                   overlay (one row per image, sorted by path; byte-identical on reruns)
  overlays/        <stem>.png: the anomaly map over the original image at its original size, with a colour
                   bar on which the threshold is marked, and the decision
  maps.npz         with save_maps: float16 maps at the input size and their paths
  config.json      the resolved config, encoder identity, scoring mode, threshold record, provenance
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
from fiseclip_lib.plumbing.files import atomic_path, display_path, ensure_writable, output_lock, write_csv_atomic, write_json_atomic
from fiseclip_lib.core.detector import Detector
from fiseclip_lib.core.pool import score_pool
from fiseclip_lib.core.references import BankEntry, ReferenceBank  # noqa: F401 - the bank is part of predict's API
from fiseclip_lib.errors import FiseclipError

PREDICTION_COLUMNS = ["path", "score", "decision", "batch", "threshold", "threshold_method", "state", "admitted",
                      "references", "overlay"]
DECISIONS = ("normal", "anomalous", "undecided")
MAX_STEM_BYTES = 150  # overlay names stay well below the usual 255-byte file-name limit


# ------------------------------------------------------------------------------------------ inputs

def collect_images(images) -> tuple[list[str], Path | None]:
    """`--images`: a folder (its image files, not recursive), a glob (`**` recursive), or a list of paths.

    Returns:
        (sorted paths, the folder paths are shown relative to, or None for absolute/as-given paths).
    """
    if isinstance(images, (list, tuple)):
        paths = [str(p) for p in images]
        base = None
    else:
        spec = str(images)
        p = Path(spec)
        if p.is_dir():
            paths = [str(x) for x in images_in(p)]
            base = p
            if not paths:
                raise FiseclipError(f"--images {spec}: no image files ({', '.join(sorted(IMAGE_EXTS))}) in this "
                                    f"folder; pass a folder of images or a glob such as 'dir/**/*.png'")
        elif p.is_file():
            paths, base = [spec], p.parent
        elif any(ch in spec for ch in "*?["):
            found = sorted(globlib.glob(spec, recursive=True))
            paths = [f for f in found if Path(f).is_file() and Path(f).suffix.lower() in IMAGE_EXTS]
            base = None
            if not paths:
                raise FiseclipError(f"--images {spec}: the pattern matches no image file "
                                    f"({', '.join(sorted(IMAGE_EXTS))}); quote it so the shell does not expand it")
        else:
            raise FiseclipError(f"--images {spec} does not exist; pass a folder of images or a glob")
    if not paths:
        raise FiseclipError("no images to score")
    return sorted(paths), base


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

def render_overlay(image, amap: np.ndarray, score: float, threshold: float | None, decision: str, path) -> None:
    """Write the anomaly map over the original image, at the image's original size (PNG, atomic).

    The colour scale runs from the map's median (the level of its normal patches; not the minimum, so that
    a normal image is not stretched to full colour) to the larger of the threshold and the map's maximum; the
    threshold is marked on the colour bar, so an image whose hot spot stays below the line is judged normal.
    The decision and score are written in the top-left corner.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib import patheffects
    from PIL import Image

    im = load_image(image) if not hasattr(image, "convert") else image.convert("RGB")
    w, h = im.size
    m = torch.as_tensor(np.asarray(amap, dtype=np.float32))[None, None]
    m = torch.nn.functional.interpolate(m, size=(h, w), mode="bilinear", align_corners=True)[0, 0].numpy()
    lo = float(np.median(m))
    hi = max(float(m.max()), threshold if threshold is not None and np.isfinite(threshold) else -np.inf)
    hi = hi if hi > lo else lo + 1e-6
    dpi = 100
    with plt.rc_context({"text.parse_math": False}):
        fig = plt.figure(figsize=(w / dpi, h / dpi), dpi=dpi)
        try:
            ax = fig.add_axes((0, 0, 1, 1))
            ax.imshow(np.asarray(im), interpolation="nearest")
            hm = ax.imshow(m, cmap="jet", alpha=0.45, vmin=lo, vmax=hi, interpolation="bilinear")
            ax.set_axis_off()
            font = max(4.0, min(w, h) / 22)
            cax = ax.inset_axes((0.93, 0.1, 0.025, 0.8))
            bar = fig.colorbar(hm, cax=cax)
            bar.ax.yaxis.set_ticks_position("left")  # labels inside the image, left of the bar
            bar.ax.tick_params(labelsize=font * 0.7, colors="white", length=2)
            for label in bar.ax.get_yticklabels():
                label.set_path_effects([patheffects.withStroke(linewidth=1.5, foreground="black")])
            if threshold is not None and np.isfinite(threshold):
                bar.ax.axhline(threshold, color="white", lw=1.5)
                bar.ax.axhline(threshold, color="black", lw=0.7, ls="--")
            colour = {"anomalous": "#d00000", "normal": "#007a00"}.get(decision, "#555555")
            thr = "" if threshold is None or not np.isfinite(threshold) else \
                f" {'>' if decision == 'anomalous' else '<='} {threshold:.3g}"
            ax.text(0.02, 0.98, f"{decision}  {score:.3g}{thr}", transform=ax.transAxes, va="top", ha="left",
                    fontsize=font, color="white", bbox={"facecolor": colour, "alpha": 0.85, "pad": 2, "lw": 0})
            with atomic_path(path) as tmp:
                fig.savefig(tmp, dpi=dpi, format="png")
        finally:
            plt.close(fig)
    with Image.open(path) as check:
        if check.size != (w, h):  # matplotlib rounds figure inches to pixels; keep the promise exactly
            fixed = check.convert("RGB").resize((w, h), Image.BILINEAR)
            with atomic_path(path) as tmp:
                fixed.save(tmp, format="PNG")


# ------------------------------------------------------------------------------------------ predict

def config_record(detector: Detector, mode: str, n_references: int, bank_size: int | None = None) -> dict:
    """What a prediction's scores depend on: config, encoder, scoring mode (for threshold checks)."""
    from fiseclip_lib.decisions.calibrate import config_hash

    cfg = detector.config.resolved()
    return {"config": cfg, "encoder": detector.encoder.identity(),
            "scoring": {"mode": mode, "references": n_references, "bank_size": bank_size},
            "config_hash": config_hash(cfg, mode)}


def predict(images, class_name: str, out=None, config=None, detector: Detector | None = None, cache=None,
            reference_dir=None, stream: bool = False, bank_size: int = 16, threshold=None,
            false_alarm_rate: float | None = None, force_threshold: bool = False, save_maps: bool = False,
            overlays: bool = True, progress: bool = True) -> pd.DataFrame:
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
    paths, base = collect_images(images)
    if out is not None:
        out = ensure_writable(out)
    detector = detector or Detector(config or FiseConfig(), cache=cache)
    mode = "stream" if stream else "batch"
    thr = load_threshold(threshold) if threshold is not None else None
    if thr is not None:
        thr.check(detector, mode, force=force_threshold)
        if not stream and detector.config.use_rscin:
            warnings.warn("RsCIN re-scores min-max over the images of each run, so a fixed threshold means "
                          "something else on every run; use --set rscin=false for thresholds that carry over")
    far = DEFAULT_FALSE_ALARM_RATE if false_alarm_rate is None else float(false_alarm_rate)
    ref_paths = collect_images(reference_dir)[0] if reference_dir else []
    if out is None:
        return _predict(paths, base, class_name, None, detector, ref_paths, stream, bank_size, thr, far, save_maps,
                        False, progress)
    with output_lock(out, command=f"fiseclip predict ({mode}, method {detector.config.method})"):
        return _predict(paths, base, class_name, out, detector, ref_paths, stream, bank_size, thr, far, save_maps,
                        overlays, progress)


def _predict(paths, base, class_name, out, detector, ref_paths, stream, bank_size, thr, far, save_maps, overlays,
             progress):
    from fiseclip_lib.decisions.calibrate import robust_threshold
    from fiseclip_lib.plumbing.provenance import RANDOM_WEIGHTS_NOTE, provenance

    t0 = time.time()
    overlap = set(map(os.path.realpath, paths)) & set(map(os.path.realpath, ref_paths))
    if overlap:
        raise FiseclipError(f"reference image {sorted(overlap)[0]} is also an image to score: a reference is never "
                            f"scored; keep --reference-dir apart from --images")
    bank = ReferenceBank.from_images(detector, ref_paths, class_name, filtered=False)
    mode = "stream" if stream else "batch"
    if out is not None:
        for name in ("predictions.csv", "maps.npz"):
            (out / name).unlink(missing_ok=True)
    enc = detector.encoder.identity()
    if not enc["pretrained"] and progress:
        print(f"NOTE: {RANDOM_WEIGHTS_NOTE}", flush=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if stream:
            from fiseclip_lib.decisions.stream import Streamer

            streamer = Streamer(detector, class_name, bank_size=bank_size, references=bank,
                                threshold=thr.value if thr is not None else None, false_alarm_rate=far)
            order = paths  # sorted names: serial numbers and time stamps give the production order
            items = []
            for i, p in enumerate(_progress(order, progress, class_name)):
                items.append(streamer.push(p, keep_map=True))
            rows = [{"path": r.path, "score": r.score, "decision": r.decision, "batch": r.index,
                     "threshold": r.threshold, "state": r.state, "admitted": r.admitted,
                     "references": r.references} for r in items]
            maps = [r.map for r in items]
            thr_method = thr.method if thr is not None else f"robust_z online (false alarms {far:g})"
        else:
            scored, maps_arr = score_pool(detector, paths, class_name, references=bank if len(bank) else None,
                                          progress=progress)
            n_batch = {}
            for _, _, b in scored:
                n_batch[b] = n_batch.get(b, 0) + 1
            scores = np.array([s for _, s, _ in scored])
            if thr is None:
                value = robust_threshold(scores, far)
                thr_method = f"robust_z this run (false alarms {far:g})"
            else:
                value, thr_method = thr.value, thr.method
            rows = [{"path": paths[i], "score": float(v), "batch": b, "threshold": value, "state": "batch",
                     "admitted": "", "references": n_batch[b] - 1 + len(bank),
                     "decision": "anomalous" if v > value else "normal"} for i, v, b in scored]
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
    df = pd.DataFrame(rows, columns=PREDICTION_COLUMNS)
    order = np.argsort(df["path"].to_numpy(), kind="stable")
    df = df.iloc[order].reset_index(drop=True)
    if out is None:
        return df
    record = {**config_record(detector, mode, len(bank), bank_size if stream else None),
              "class_name": class_name, "images": len(paths), "references": [str(p) for p in ref_paths],
              "threshold": thr.to_dict() if thr is not None else {"method": thr_method},
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


def _progress(items, enabled: bool, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return items
    return tqdm(items, desc=desc, unit="img", disable=not enabled)


__all__ = ["ReferenceBank", "BankEntry", "predict", "collect_images",
           "render_overlay", "unique_stems", "safe_stem", "PREDICTION_COLUMNS"]
