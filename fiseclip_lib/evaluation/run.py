"""The benchmark harness behind `fiseclip run`: every method under one loop, results with provenance.

Outputs in `out/`:
  metrics.csv   a row per category plus a `mean` row (unweighted mean over categories)
  scores.csv    a row per image: path (relative to the root), category, label, defect, score, batch (and, with
                `align`, shift_y and shift_x: the translation in px that registered the image, core/align.py)
  config.json   the resolved config, dataset, versions, git commit, wall time
  categories/   one JSON per finished category (written atomically as each category ends; `--resume` reuses them)
  maps/         `<category>.npz` with float16 maps when `save_maps`
The CSVs depend only on inputs, config and seed (no times, no absolute output paths): byte-identical reruns.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from fiseclip_lib.evaluation import data as D
from fiseclip_lib.plumbing.files import (atomic_path, display_path, ensure_writable, output_lock, remove_debris,
                                        write_csv_atomic, write_json_atomic)
from fiseclip_lib.plumbing.cache import FeatureCache
from fiseclip_lib.config import FiseConfig, scoring_fields
from fiseclip_lib.errors import FiseclipError
from fiseclip_lib.evaluation.metrics import image_metrics, pixel_metrics
from fiseclip_lib.core.detector import Detector
from fiseclip_lib.core.pool import SHIFT_COLUMNS, score_pool
from fiseclip_lib.plumbing.provenance import RANDOM_WEIGHTS_NOTE, provenance
from fiseclip_lib.plumbing.resources import memory_increase_mb, memory_mark

METRIC_NAMES = ["image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro"]
METRIC_COLUMNS = ["category"] + METRIC_NAMES + ["method", "encoder", "weights", "pretrained", "images"]
SCORE_COLUMNS = ["path", "category", "label", "defect", "score", "batch"]


def prepare_dataset(dataset: str, root, categories=None) -> list[D.Sample]:
    """Load samples; `demo` builds the demo set into `root` first when it is not there, and the procedural
    categories asked for by name (board, wafer: `demo.add_categories`) into it; without names a demo run scores
    the categories the set was built with, never the added ones."""
    if dataset == "demo":
        from fiseclip_lib.evaluation.demo import MANIFEST, add_categories, build_demo, read_manifest

        root = Path(root)
        if not (root / MANIFEST).is_file():
            print(f"building the demo dataset into {root} ...", flush=True)
            build_demo(root)
        info = read_manifest(root)
        if categories:
            for cat in add_categories(root, list(categories)):
                print(f"added the demo category {cat} to {root}", flush=True)
        else:
            categories = info["params"].get("categories") or None
    return D.load_dataset(dataset, root, categories)


def eval_masks(samples: list[D.Sample], size: int) -> np.ndarray:
    """Ground-truth masks at the evaluation resolution (input size, nearest; non-zero = defect); normal -> zeros.

    An anomalous image whose mask is empty gets a warning naming the file; when every mask of the category
    is empty the category's pixel metrics are undefined, and a note says so.
    """
    masks = np.zeros((len(samples), size, size), dtype=bool)
    empty = []
    with_mask = 0
    for i, s in enumerate(samples):
        if s.label == 1 and s.mask:
            with_mask += 1
            img_size = D.image_size_of(s.path)
            m = D.load_mask(s.mask)
            if m.shape[::-1] != tuple(img_size):
                warnings.warn(f"mask {s.mask} is {m.shape[1]}x{m.shape[0]} but its image is "
                              f"{img_size[0]}x{img_size[1]}; resized with nearest")
            if not m.any():
                empty.append(s.mask)
                warnings.warn(f"mask {s.mask} of anomalous image {Path(s.path).name} is empty (no non-zero pixel)")
            masks[i] = D.resize_mask(m, (size, size))
    if with_mask and len(empty) == with_mask:
        cat = samples[0].category
        warnings.warn(f"category {cat}: all {with_mask} masks are empty; pixel metrics are undefined (NaN)")
    return masks


def score_category(detector: Detector, samples: list[D.Sample], category: str, progress: bool = True,
                   dataset: str | None = None, shifts: dict | None = None):
    """Score one category the method's way (`core.pool.score_pool`: batches, RsCIN over the category);
    returns (rows [(sample, score, batch)] sorted by path, maps `[N, S, S]` in that order). shifts: as
    `score_pool`, keyed by the sample."""
    found = None if shifts is None else {}
    rows, maps = score_pool(detector, [s.path for s in samples], category, dataset=dataset, progress=progress,
                            shifts=found)
    if found:
        shifts.update({samples[i]: s for i, s in found.items()})
    return [(samples[i], score, b) for i, score, b in rows], maps


def evaluate_category(samples: list[D.Sample], scores: np.ndarray, maps: np.ndarray, pixel: bool) -> dict:
    labels = np.array([s.label for s in samples])
    with warnings.catch_warnings():
        # one-class notes are reported once, by validate_category
        warnings.filterwarnings("ignore", message=".*only one class present.*")
        warnings.filterwarnings("ignore", message="AU-PRO: needs both.*")
        im = image_metrics(labels, scores)
        px = pixel_metrics(eval_masks(samples, maps.shape[-1]), maps) if pixel else {}
    out = {f"image_{k}": v for k, v in im.items()}
    for k in ("auroc", "ap", "f1_max", "aupro"):
        out[f"pixel_{k}"] = px.get(k, float("nan"))
    return out


def score_and_evaluate(detector: Detector, samples: list[D.Sample], category: str, progress: bool = True,
                       dataset: str | None = None, shifts: dict | None = None):
    """Validate, score and evaluate one category: (rows sorted by path, maps in that order, metrics).

    dataset: picks dataset-specific defaults (RsCIN's k list: MuSc's per dataset); shifts: `score_category`."""
    check = D.validate_category(samples)
    rows, maps = score_category(detector, samples, category, progress=progress, dataset=dataset, shifts=shifts)
    scores = np.array([r[1] for r in rows])
    return rows, maps, evaluate_category([r[0] for r in rows], scores, maps, check["pixel"])


def category_key(cfg: FiseConfig, dataset: str, samples: list[D.Sample], root, encoder: dict | None = None) -> str:
    """What a finished category's results depend on; --resume reuses a result only if this matches.

    It covers the config (less knobs that change no number), the dataset kind, the encoder identity (weights
    content, preprocessing, precision), and the *content* of every image and mask, not only their names.
    """
    from fiseclip_lib.plumbing.cache import image_hash

    relevant = scoring_fields(cfg.to_dict())
    if cfg.use_rscin and cfg.rscin_ks is None and cfg.rscin_ks_for(dataset) != cfg.rscin_ks_for(None):
        relevant["rscin_ks_resolved"] = list(cfg.rscin_ks_for(dataset))  # VisA: MuSc's own k list
    files = [(display_path(s.path, root), s.label, image_hash(s.path), image_hash(s.mask) if s.mask else None)
             for s in samples]
    payload = json.dumps({"config": relevant, "dataset": dataset, "encoder": encoder, "samples": files},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


MEAN_ROW = "mean"


def metrics_frame(results: list[dict], encoder_info: dict, method: str) -> pd.DataFrame:
    """A row per category plus the unweighted mean row. The mean row is labelled `mean`, or `mean (all
    categories)` when a category is itself called `mean`, so that the label always names one row."""
    df = pd.DataFrame([{"category": r["category"], **r["metrics"]} for r in results], columns=["category"] + METRIC_NAMES)
    if len(df):
        label = MEAN_ROW if MEAN_ROW not in set(df["category"]) else f"{MEAN_ROW} (all categories)"
        mean = {"category": label, **df[METRIC_NAMES].astype(float).mean(skipna=True).to_dict()}
        df = pd.concat([df, pd.DataFrame([mean])], ignore_index=True)
    df["method"] = method
    df["encoder"] = encoder_info["model"]
    df["weights"] = encoder_info["weights"]
    df["pretrained"] = encoder_info["pretrained"]
    df["images"] = [r["images"] for r in results] + ([sum(r["images"] for r in results)] if results else [])
    return df


def write_outputs(out: Path, results: list[dict], encoder_info: dict, config_record: dict) -> pd.DataFrame:
    """metrics.csv, scores.csv and the config.json that describes them, from the finished categories.

    Order: the old CSVs go first, then config.json, then the new CSVs, so that a metrics.csv on disk is always
    described by the config.json beside it (each file is replaced atomically)."""
    df = metrics_frame(results, encoder_info, config_record["config"]["method"])
    rows = [row for r in results for row in r["rows"]]
    aligned = bool(rows) and len(rows[0]) > len(SCORE_COLUMNS)
    scores = pd.DataFrame(rows, columns=SCORE_COLUMNS + (SHIFT_COLUMNS if aligned else []))
    for name in ("metrics.csv", "scores.csv"):
        (out / name).unlink(missing_ok=True)
    write_json_atomic(out / "config.json", {**config_record, "categories_done": [r["category"] for r in results]})
    write_csv_atomic(out / "scores.csv", scores)
    write_csv_atomic(out / "metrics.csv", df)
    return df


def load_finished(done: Path, key: str, maps_path: Path | None) -> dict | None:
    """A finished category's saved result if it can be reused (same key, intact, maps present if asked for)."""
    if not done.is_file():
        return None
    try:
        saved = json.loads(done.read_text(encoding="utf-8"))
        if not isinstance(saved, dict) or not {"category", "key", "metrics", "images", "rows"} <= set(saved):
            raise ValueError("fields missing")
    except (OSError, ValueError) as e:
        warnings.warn(f"finished result {done} is damaged ({type(e).__name__}); the category is recomputed")
        return None
    if saved.get("key") != key:
        return None
    if maps_path is not None:
        try:
            with np.load(maps_path) as z:
                if z["maps"].shape[0] != len(saved["rows"]):
                    return None
        except Exception:
            return None  # asked for maps that are missing or damaged: recompute them
    return saved


def run_category(detector: Detector, dataset: str, root, category: str, samples: list[D.Sample], folder,
                 resume: bool = False, save_maps: bool = False, progress: bool = True, extra: dict | None = None,
                 before_scoring=None) -> tuple[dict, bool]:
    """One category of a benchmark, the task `run` and `sweep` share: reuse its finished result (with --resume,
    when its content key still matches) or score and evaluate it, and save the result atomically.

    Args:
        detector: the Detector.
        dataset, root: the dataset kind and root (paths in the rows are relative to root).
        category, samples: the category and its samples.
        folder: the output folder; the result goes to `folder/categories/<category>.json`, maps (save_maps) to
            `folder/maps/<category>.npz`.
        resume: reuse a saved result whose key matches.
        extra: more fields to save with the result (e.g. the sweep's encoder record).
        before_scoring: called before a category is scored (test hook of the sweep).
    Returns:
        (the result: category, key, metrics, images, notes, rows, and extra; whether it was reused).
    """
    folder = Path(folder)
    key = category_key(detector.config, dataset, samples, root, detector.encoder.identity())
    done = folder / "categories" / f"{category}.json"
    maps_path = folder / "maps" / f"{category}.npz"
    saved = load_finished(done, key, maps_path if save_maps else None) if resume else None
    if saved is not None:
        return saved, True
    if before_scoring is not None:
        before_scoring()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shifts = {} if detector.config.align != "none" else None
        rows, maps, metrics = score_and_evaluate(detector, samples, category, progress=progress, dataset=dataset,
                                                 shifts=shifts)
    result = {
        "category": category, "key": key, "metrics": metrics, "images": len(samples),
        "notes": summarize_warnings([w.message for w in caught], category),
        "rows": [[display_path(s.path, root), s.category, s.label, s.defect, float(score), b]
                 + ([] if shifts is None else list(shifts.get(s, (math.nan, math.nan)))) for s, score, b in rows],
        **(extra or {}),
    }
    if save_maps:
        with atomic_path(maps_path) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, maps=maps.astype(np.float16),
                                    paths=np.array([display_path(r[0].path, root) for r in rows]))
    else:
        maps_path.unlink(missing_ok=True)  # maps of an earlier run would not match these results
    write_json_atomic(done, result)
    return result, False


def run_benchmark(dataset: str, root, config: FiseConfig, out, categories=None, save_maps: bool = False,
                  resume: bool = False, progress: bool = True, detector: Detector | None = None,
                  cache: FeatureCache | None = None) -> pd.DataFrame:
    """Score every category, write metrics.csv, scores.csv, config.json (see module doc); return the metrics.

    One writer per output folder: a second run into the same `out` stops at once naming the first.
    cache: a FeatureCache makes reruns with other matching/filtering/fusion options skip the encoder.
    """
    out = ensure_writable(out)
    with output_lock(out, command=f"fiseclip run (dataset {dataset}, method {config.method})"):
        return _run_locked(dataset, root, config, out, categories, save_maps, resume, progress, detector, cache)


def _run_locked(dataset, root, config, out, categories, save_maps, resume, progress, detector, cache):
    t0 = time.time()
    remove_debris(out, out / "categories", out / "maps")  # temporary files of a killed run (we hold the lock)
    samples = prepare_dataset(dataset, root, categories)
    cats = D.categories_of(samples) if not categories else list(categories)
    detector = detector or Detector(config, cache=cache)
    enc = detector.encoder.identity()
    if not enc["pretrained"] and progress:  # quiet callers (notebooks) show the weights on their own page
        print(f"NOTE: {RANDOM_WEIGHTS_NOTE}", flush=True)
    record = {
        "config": config.resolved(dataset), "dataset": dataset, "root": str(root), "categories": cats,
        "encoder": enc, "weights_note": None if enc["pretrained"] else RANDOM_WEIGHTS_NOTE,
        "layers": detector.layers, "save_maps": save_maps, **provenance(),
    }
    costs0, memory0 = dict(detector.costs), memory_mark(detector.encoder.device)
    results, notes = [], []
    # Outputs of an earlier run into this folder are replaced, never mixed with this run's.
    write_outputs(out, results, enc, {**record, "status": "running"})
    for cat in cats:
        cs = [s for s in samples if s.category == cat]
        if not cs:
            raise FiseclipError(f"category {cat} has no test images under {root}")
        result, reused = run_category(detector, dataset, root, cat, cs, out, resume=resume, save_maps=save_maps,
                                      progress=progress)
        if reused:
            print(f"{cat}: reused finished result ({out / 'categories' / f'{cat}.json'})", flush=True)
        else:
            for n in result["notes"]:
                print("warning: " + n.replace("\r", "\\r").replace("\n", "\\n"), flush=True)
        results.append(result)
        notes.extend(result.get("notes", []))
        write_outputs(out, results, enc, {**record, "status": "running", "notes": notes})
    feature_cache = None if detector.cache is None else {
        "root": str(detector.cache.root), "hits": detector.cache.hits, "misses": detector.cache.misses,
        "damaged": detector.cache.damaged}
    cost = run_costs(detector, costs0, memory0)
    if cost["images_scored"]:
        print(f"cost ({config.method}, {config.model}): {cost['summary']}", flush=True)
    return write_outputs(out, results, enc, {**record, "status": "finished", "notes": notes,
                                              "feature_cache": feature_cache, "cost": cost,
                                              "wall_time_s": round(time.time() - t0, 3)})


def run_costs(detector: Detector, before: dict, memory_mark_mb: float) -> dict:
    """Encoder, matching and scoring seconds per image, measured separately, with the cache state beside them.

    Encoder seconds are per image actually encoded (cache misses; with `tiles`, per tile: every count is of
    encoder inputs); images read from the feature cache cost
    no encoder time and are counted as such. Matching is `visual_map` (LNAMD + MSM); scoring is everything
    after the encoder (text branch, filter, matching, fusion, post-processing). Memory is the increase during this work (CUDA: peak allocated
    since the mark; CPU: growth of the process's peak resident memory)."""
    c = {k: detector.costs[k] - before.get(k, 0) for k in detector.costs}
    enc_per = c["encode_s"] / c["images_encoded"] if c["images_encoded"] else None
    score_per = c["score_s"] / c["images_scored"] if c["images_scored"] else None
    match_per = (c.get("match_s", 0.0) / c["images_scored"] if c["images_scored"] and detector.config.spec.visual
                 else None)  # the text method does no matching
    from_cache = max(0, c["images_scored"] - c["images_encoded"])
    cache_state = ("no feature cache" if detector.cache is None else "miss" if from_cache == 0
                   else "hit" if c["images_encoded"] == 0 else "partial hit")
    mem = memory_increase_mb(detector.encoder.device, memory_mark_mb)
    unit = "tile" if detector.config.tiles is not None else "image"  # with tiles, costs count encoder inputs
    summary = (f"encoder {enc_per:.3f} s/{unit} over {c['images_encoded']} encoded" if enc_per is not None
               else "encoder 0 s (all features from the cache)")
    summary += (f", matching {match_per:.3f} s/{unit}" if match_per is not None else "")
    summary += (f", all scoring after the encoder {score_per:.3f} s/{unit}" if score_per is not None else "")
    summary += f", {from_cache} {unit}s from the feature cache ({cache_state}), memory +{mem:.0f} MB"
    return {"encoder_s_per_image": enc_per, "matching_s_per_image": match_per, "scoring_s_per_image": score_per,
            "images_encoded": c["images_encoded"], "images_scored": c["images_scored"],
            "images_from_cache": from_cache, "feature_cache": cache_state, "memory_increase_mb": round(mem, 1),
            "memory_measure": ("CUDA peak allocated since the start of the run"
                               if getattr(detector.encoder.device, "type", str(detector.encoder.device)) == "cuda"
                               else "growth of the process's peak resident memory"),
            "device": str(detector.encoder.device), "summary": summary}


def summarize_warnings(messages, category: str) -> list[str]:
    """Warnings of one category as sorted unique lines; image conversions are counted per mode (one line
    per mode and category instead of one per image)."""
    lines, conversions = set(), {}
    for m in messages:
        if isinstance(m, D.ConversionWarning):
            conversions.setdefault(m.mode, []).append(m.path)
        else:
            lines.add(str(m))
    for mode, paths in conversions.items():
        unique = sorted(set(paths))
        lines.add(f"category {category}: {len(unique)} {D.describe_mode(mode)} image(s) converted to 8-bit RGB "
                  f"(e.g. {unique[0]})")
    return sorted(lines)


def format_table(df: pd.DataFrame) -> str:
    """Metrics in percent, one decimal, for the terminal."""
    view = df[["category"] + METRIC_NAMES].copy()
    for c in METRIC_NAMES:
        view[c] = (view[c].astype(float) * 100).round(1)
    return view.to_string(index=False, na_rep="nan")
