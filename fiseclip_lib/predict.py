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
separate reference set without referencing each other (`score_against`, streaming), each query image is its
own group: its score depends only on itself and the references, never on which other images are scored with
it. So a streamed score equals `score_against([image], references)` exactly, and equals the in-batch score of
the image in the batch [image] + references whenever the scale does not depend on the batch (method `musc`
without RsCIN, `text`, or `fusion_norm=none`), which the tests check.
"""
from __future__ import annotations

import glob as globlib
import io
import os
import time
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from . import data as D
from ._io import atomic_path, output_lock, write_json_atomic, write_text_atomic
from .errors import FiseclipError
from .filtering import reference_keep
from .fusion import fuse, fuse_text_only
from .matching import lnamd, visual_map_against
from .pipeline import BatchResult, Detector, split_features
from .text import text_embeddings, text_map

PREDICTION_COLUMNS = ["path", "score", "decision", "batch", "threshold", "threshold_method", "state", "admitted",
                      "references", "overlay"]
DECISIONS = ("normal", "anomalous", "undecided")
FLOAT_FORMAT = "%.6f"
MAX_STEM_BYTES = 150  # overlay names stay well below the usual 255-byte file-name limit


# ------------------------------------------------------------------------------------------ reference bank

@dataclass
class BankEntry:
    """One reference image: its aggregated features per (layer, degree), filter and provenance.

    features: {(layer, r): `[1, P, C]`}; keep: bool `[1, P]` or None (all patches); penalty: `[1, P]` or None.
    """

    features: dict
    keep: torch.Tensor | None = None
    penalty: torch.Tensor | None = None
    path: str | None = None
    score: float | None = None
    feats: object = None  # the image's Features (kept for known-good references: their leave-one-out scores)


class ReferenceBank:
    """A set of reference images for `score_against` and streaming (module doc).

    Build it with `ReferenceBank.from_images(detector, images, class_name)`; `len(bank)` is the number of images.
    """

    def __init__(self, entries: Sequence[BankEntry] = (), grid: tuple[int, int] | None = None,
                 identity: dict | None = None):
        self.entries = list(entries)
        self.grid = grid if grid is not None or not self.entries else _grid_of(self.entries[0])
        self.identity = identity
        self._stacked = None

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def paths(self) -> list[str | None]:
        return [e.path for e in self.entries]

    @classmethod
    def from_images(cls, detector: Detector, images: Sequence, class_name: str = "object",
                    filtered: bool = False) -> "ReferenceBank":
        """Encode reference images once (the feature cache is used) and aggregate them.

        Args:
            detector: the detector whose encoder and config score the queries.
            images: paths, PIL images or arrays.
            class_name: the text prompt's class (used only when filtered).
            filtered: apply the text filter to these references (False for known-good images).
        Returns:
            The bank (empty when `images` is empty).
        """
        bank = cls(identity=detector.encoder.identity())
        if len(images) == 0:
            return bank
        feats = detector.encode(list(images))
        for i, one in enumerate(split_features(feats)):
            path = str(images[i]) if isinstance(images[i], (str, os.PathLike)) else None
            entry = make_entry(detector, one, class_name, filtered, path)
            entry.feats = one
            bank.add(entry)
        return bank

    def add(self, entry: BankEntry) -> None:
        grid = _grid_of(entry)
        if self.grid is not None and grid != self.grid:
            raise FiseclipError(f"reference image {entry.path or ''} has a {grid} patch grid, the bank {self.grid}: "
                                f"encode references with the same encoder and image size")
        self.grid = grid
        self.entries.append(entry)
        self._stacked = None

    def leave_one_out_scores(self, detector: Detector, class_name: str) -> list[float]:
        """Each reference's score against the other references (per-image normalisation, as streaming scores):
        the scores of known-good images, from which the unsupervised threshold rule can start."""
        out = []
        if len(self) < 2 or any(e.feats is None for e in self.entries):
            return out
        for i, e in enumerate(self.entries):
            others = ReferenceBank([x for j, x in enumerate(self.entries) if j != i])
            out.append(float(score_features_against(detector, e.feats, class_name, others, mutual=False).scores[0]))
        return out

    def stacked(self):
        """(features {(layer, r): `[R, P, C]`}, keep `[R, P]` or None, penalty `[R, P]` or None)."""
        if self._stacked is None:
            self._stacked = stack_entries(self.entries)
        return self._stacked


def _grid_of(entry: BankEntry) -> tuple[int, int] | None:
    return entry.__dict__.get("grid")


def make_entry(detector: Detector, feats, class_name: str, filtered: bool, path: str | None = None,
               score: float | None = None) -> BankEntry:
    """A bank entry from the Features of one image: LNAMD per (layer, degree); the text filter when asked."""
    cfg = detector.config
    keep = penalty = None
    if filtered and cfg.method == "fiseclip" and feats.dense is not None:
        t = text_embeddings(detector.encoder, class_name, cfg.class_names)
        a_t = text_map(feats.dense, t, cfg.text_temperature).cpu()
        keep, penalty = reference_keep(a_t, cfg.filter, cfg.filter_theta, cfg.filter_ratio, cfg.filter_min_keep)
    z = {(l, r): lnamd(feats.layers[l], feats.grid, r).cpu() for l in feats.layers for r in cfg.degrees}
    entry = BankEntry(features=z, keep=keep, penalty=penalty, path=path, score=score)
    entry.__dict__["grid"] = tuple(feats.grid)
    return entry


def stack_entries(entries: Sequence[BankEntry]):
    """Entries -> (features {(l, r): `[R, P, C]`}, keep or None, penalty or None); entries without a filter
    keep all of their patches (and have no penalty)."""
    if not entries:
        return {}, None, None
    feats = {k: torch.cat([e.features[k] for e in entries]) for k in entries[0].features}
    p = next(iter(feats.values())).shape[1]
    keep = None
    if any(e.keep is not None for e in entries):
        keep = torch.cat([e.keep if e.keep is not None else torch.ones(1, p, dtype=torch.bool) for e in entries])
    penalty = None
    if any(e.penalty is not None for e in entries):
        penalty = torch.cat([e.penalty if e.penalty is not None else torch.zeros(1, p) for e in entries])
    return feats, keep, penalty


# ------------------------------------------------------------------------------------------ scoring

def score_features_against(detector: Detector, feats, class_name: str, bank: ReferenceBank | None = None,
                           mutual: bool = True) -> BatchResult:
    """Score encoded query images against a reference bank (and, when mutual, against each other).

    Args:
        detector: supplies the config and the encoder (for text embeddings).
        feats: Features of the queries.
        class_name: the category's name for the prompts.
        bank: the external references (None or empty: none).
        mutual: the queries reference each other (a batch plus a bank; normalised over the batch as in
            `run`) or not (each query against the bank only, normalised per image: module doc).
    Returns:
        A BatchResult; `keep` is the queries' own filter (mutual only).
    """
    cfg = detector.config
    n = next(iter(feats.layers.values())).shape[0]
    grid = tuple(feats.grid)
    bank = bank if bank is not None else ReferenceBank()
    if len(bank) and bank.grid != grid:
        raise FiseclipError(f"references have a {bank.grid} patch grid, the images {grid}: use one encoder and "
                            f"image size for both")
    notes: list[str] = []
    a_v = q_keep = None
    a_t, s_t = detector.text_branch(feats, class_name)
    n_refs = len(bank) + (n - 1 if mutual else 0)
    groups = [slice(0, n)] if mutual else [slice(i, i + 1) for i in range(n)]  # images normalised together

    def fused(fn, *xs):
        return torch.cat([fn(*(x[g] for x in xs)) for g in groups])

    if cfg.method == "text":
        patch = a_t
    elif n_refs == 0:
        msg = "no reference image: " + ("the text map is used alone" if a_t is not None else "the map is zero")
        warnings.warn(msg)
        notes.append(msg)
        patch = (fused(lambda t_: fuse_text_only(t_, cfg.fusion, cfg.alpha, cfg.gate_tau, cfg.fusion_norm), a_t)
                 if a_t is not None else torch.zeros(n, grid[0] * grid[1]))
    else:
        q_pen = None
        if mutual and n > 1 and cfg.method == "fiseclip":
            q_keep, q_pen = reference_keep(a_t, cfg.filter, cfg.filter_theta, cfg.filter_ratio, cfg.filter_min_keep)
        refs, r_keep, r_pen = bank.stacked()
        dtype = torch.bfloat16 if cfg.match_dtype == "bf16" else torch.float32
        layers = {l: t.cpu() for l, t in feats.layers.items()}
        a_v = visual_map_against(layers, grid, refs, cfg.degrees, r_keep, r_pen, mutual=mutual, query_keep=q_keep,
                                 query_penalty=q_pen, topmin_max=cfg.topmin_max, dtype=dtype).cpu()
        patch = a_v if cfg.method == "musc" else fused(
            lambda v, t_: fuse(v, t_, cfg.fusion, cfg.alpha, cfg.gate_tau, cfg.fusion_norm), a_v, a_t)
    return detector.batch_result(feats, patch, a_v=a_v, a_t=a_t, s_t=s_t, keep=q_keep, notes=notes)


def score_against(detector: Detector, images: Sequence, class_name: str, bank: ReferenceBank | None = None,
                  mutual: bool = False) -> BatchResult:
    """Encode and score images against a reference bank (see `score_features_against`; by default each image
    against the bank only, which is what streaming computes)."""
    feats = detector.encode(images)
    t0 = time.perf_counter()
    res = score_features_against(detector, feats, class_name, bank, mutual=mutual)
    detector.costs["score_s"] += time.perf_counter() - t0
    detector.costs["images_scored"] += len(images)
    return res


class _BankedDetector:
    """What `run.score_category` needs of a detector (config, score_batch), scoring each batch with a bank."""

    def __init__(self, detector: Detector, bank: ReferenceBank):
        self.detector, self.bank, self.config = detector, bank, detector.config

    def score_batch(self, images, class_name):
        return score_against(self.detector, images, class_name, self.bank, mutual=True)


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
            paths = [str(x) for x in D._images_in(p)]
            base = p
            if not paths:
                raise FiseclipError(f"--images {spec}: no image files ({', '.join(sorted(D.IMAGE_EXTS))}) in this "
                                    f"folder; pass a folder of images or a glob such as 'dir/**/*.png'")
        elif p.is_file():
            paths, base = [spec], p.parent
        elif any(ch in spec for ch in "*?["):
            found = sorted(globlib.glob(spec, recursive=True))
            paths = [f for f in found if Path(f).is_file() and Path(f).suffix.lower() in D.IMAGE_EXTS]
            base = None
            if not paths:
                raise FiseclipError(f"--images {spec}: the pattern matches no image file "
                                    f"({', '.join(sorted(D.IMAGE_EXTS))}); quote it so the shell does not expand it")
        else:
            raise FiseclipError(f"--images {spec} does not exist; pass a folder of images or a glob")
    if not paths:
        raise FiseclipError("no images to score")
    return sorted(paths), base


def _display_path(path: str, base: Path | None) -> str:
    if base is None:
        return Path(path).as_posix()
    try:
        return Path(os.path.relpath(path, base)).as_posix()
    except ValueError:
        return Path(path).as_posix()


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

    im = D.load_image(image) if not hasattr(image, "convert") else image.convert("RGB")
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
    from .calibrate import config_hash

    cfg = detector.config.to_dict()
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
    from .calibrate import DEFAULT_FALSE_ALARM_RATE, load_threshold
    from .config import FiseConfig

    if not class_name or not str(class_name).strip():
        raise FiseclipError("--class-name is required: the object's name for the text prompts, e.g. bottle")
    paths, base = collect_images(images)
    if out is not None:
        from .run import ensure_writable

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
    from .calibrate import robust_threshold
    from .provenance import RANDOM_WEIGHTS_NOTE, provenance

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
            from .stream import Streamer

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
            from .run import score_category

            samples = [D.Sample(p, class_name, 0, "") for p in paths]
            det = _BankedDetector(detector, bank) if len(bank) else detector
            scored, maps_arr = score_category(det, samples, class_name, progress=progress)
            n_batch = {}
            for _, _, b in scored:
                n_batch[b] = n_batch.get(b, 0) + 1
            scores = np.array([s for _, s, _ in scored])
            if thr is None:
                value = robust_threshold(scores, far)
                thr_method = f"robust_z this run (false alarms {far:g})"
            else:
                value, thr_method = thr.value, thr.method
            rows = [{"path": s.path, "score": float(v), "batch": b, "threshold": value, "state": "batch",
                     "admitted": "", "references": n_batch[b] - 1 + len(bank),
                     "decision": "anomalous" if v > value else "normal"} for s, v, b in scored]
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
        r["path"] = _display_path(r["path"], base)
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
    text = io.StringIO()
    df.to_csv(text, index=False, float_format=FLOAT_FORMAT, na_rep="nan")
    write_text_atomic(out / "predictions.csv", text.getvalue())
    return df


def _progress(items, enabled: bool, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return items
    return tqdm(items, desc=desc, unit="img", disable=not enabled)


__all__ = ["ReferenceBank", "BankEntry", "score_against", "score_features_against", "predict", "collect_images",
           "render_overlay", "unique_stems", "safe_stem", "PREDICTION_COLUMNS"]
