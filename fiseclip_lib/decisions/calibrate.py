"""Thresholds: from image scores to a decision rule, with the provenance needed to apply it safely.

A score means something only for the config and encoder that produced it (a robust-z fused map, a raw
distance, an RsCIN-normalised score are different scales), so a threshold records the method, the encoder
(model, weights content, input size, precision), a hash of the scoring config and the scoring mode (`batch`:
`run` / `predict`, `stream`: `predict --stream`), read from the `config.json` beside the scores. Applying it
to other scores is an error naming what differs (`force` turns it into a warning).

Methods (`calibrate(scores, labels, method=...)`):
  f1        labelled scores (label 1 = anomalous): the threshold that maximises F1 of "anomalous" over the
            scores (decision: anomalous when score > threshold); placed midway between the two scores it
            separates, so that it does not sit on a calibration image.
  robust_z  unlabeled scores: median + z * 1.4826 * MAD, z = Phi^-1(1 - false_alarm_rate), with lower medians
            (fusion's definition: core/robust.py). Median and MAD are those of the normal images as long as fewer
            than half are anomalous (they ignore the tail). If normal scores were Gaussian the false-alarm rate
            would be the target; image scores are maxima of maps and skewed to the right, so the realised rate
            is usually somewhat higher: `calibration_flag_rate` (the share of the calibration images above the
            threshold, defects included) is recorded to compare with.
  quantile  scores of images known to be normal (labels all 0, or the normal rows of a labelled file): the
            conformal quantile, the ceil((n + 1)(1 - a))-th smallest score. For new normal images exchangeable
            with these (same line, same config), the false-alarm rate is at most a on average (and at least
            a - 1/(n + 1)); needs n >= 1/a - 1 scores.
  auto      f1 when the file has both labels, else robust_z.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd

from fiseclip_lib.plumbing.files import write_json_atomic
from fiseclip_lib.config import FiseConfig, scoring_fields
from fiseclip_lib.core.robust import MAD_TO_SIGMA, median_mad
from fiseclip_lib.errors import FiseclipError

METHODS = ("auto", "f1", "robust_z", "quantile")
DEFAULT_FALSE_ALARM_RATE = 0.01
ENCODER_FIELDS = ("model", "weights_id", "input_size", "precision", "quick_gelu", "restore_depth")
FORMAT = "fiseclip-threshold/1"


def config_hash(config: dict, mode: str = "batch") -> str:
    """sha256 (16 hex) of the config fields that change scores (automatic values resolved, so that `sigma: null`
    and the 4 px it means hash alike) and the scoring mode (streaming ignores batch formation: config.py)."""
    try:
        config = FiseConfig.from_dict(config).resolved()
    except FiseclipError:
        pass  # a config of another version: hashed as written (it will not match, and the check says so)
    relevant = scoring_fields(config, stream=mode == "stream")
    if relevant.get("rscin") is False:
        relevant.pop("rscin_ks", None)  # no RsCIN: its k list (resolved per dataset) changes no score
    return hashlib.sha256(json.dumps({"config": relevant, "mode": mode}, sort_keys=True,
                                     default=str).encode()).hexdigest()[:16]


# The config fields of version 0.1 (commit 74c01e7) and what its threshold hash left out.
FIELDS_0_1 = ("method", "model", "pretrained", "image_size", "layers", "device", "precision", "cache_dir", "quick_gelu",
              "encode_batch", "restore", "restore_depth", "text_temperature", "class_names", "filter", "filter_theta",
              "filter_ratio", "filter_min_keep", "batch_size", "shuffle", "seed", "degrees", "topmin_max",
              "match_dtype", "musc_pool", "fusion", "alpha", "gate_tau", "fusion_norm", "sigma", "beta", "rscin",
              "rscin_ks")
NEUTRAL_0_1 = {"encode_batch", "device", "cache_dir"}
STREAM_NEUTRAL_0_1 = {"batch_size", "shuffle", "musc_pool", "rscin", "rscin_ks"}


def legacy_config_hashes(config: FiseConfig, mode: str = "batch") -> set[str]:
    """The hashes that threshold files of version 0.1 carry for this config (the config as written, automatic
    values null or concrete), so that those files still apply to the same scores. Empty when a field added
    since then is set to something that changes scores."""
    d = config.to_dict()
    default = FiseConfig().to_dict()
    if any(d[k] != default[k] for k in scoring_fields(d) if k not in FIELDS_0_1):
        return set()
    d = {k: d[k] for k in FIELDS_0_1}
    resolved, auto = config.resolved(), config.replace(sigma=None, rscin=None, rscin_ks=None).resolved()
    drop = NEUTRAL_0_1 | (STREAM_NEUTRAL_0_1 if mode == "stream" else set())
    out = set()
    for nulls in itertools.product(*[(False, True) if resolved[k] == auto[k] else (False,)
                                     for k in ("sigma", "rscin", "rscin_ks")]):
        variant = {**d, **{k: None for k, null in zip(("sigma", "rscin", "rscin_ks"), nulls) if null}}
        relevant = {k: v for k, v in variant.items() if k not in drop}
        out.add(hashlib.sha256(json.dumps({"config": relevant, "mode": mode}, sort_keys=True,
                                          default=str).encode()).hexdigest()[:16])
    return out


def robust_threshold(scores, false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE) -> float:
    """median + z * 1.4826 * MAD of the finite scores, z = Phi^-1(1 - false_alarm_rate); lower medians, as in
    fusion (core/robust.py)."""
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        raise FiseclipError("no finite score to calibrate a threshold on")
    _check_rate(false_alarm_rate)
    med, mad = median_mad(s)
    z = NormalDist().inv_cdf(1.0 - false_alarm_rate)
    return med + z * MAD_TO_SIGMA * mad


def f1_threshold(scores, labels) -> tuple[float, dict]:
    """The F1-optimal threshold (anomalous when score > t) and its precision, recall, F1, false-alarm rate.

    Candidates are midpoints between consecutive distinct scores (and one below the lowest), so every possible
    split of the sorted scores is tried; ties in F1 go to the highest threshold (fewest false alarms).
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(int)
    ok = np.isfinite(s)
    s, y = s[ok], y[ok]
    if not (y == 1).any() or not (y == 0).any():
        raise FiseclipError("F1 calibration needs both normal (label 0) and anomalous (label 1) images; "
                            "use --method robust_z or quantile for unlabeled or normal-only scores")
    u = np.unique(s)
    cands = np.concatenate([[u[0] - max(1e-6, abs(u[0]) * 1e-6)], (u[:-1] + u[1:]) / 2])
    pred = s[None, :] > cands[:, None]  # [T, N]
    tp = (pred & (y == 1)).sum(1)
    fp = (pred & (y == 0)).sum(1)
    fn = ((~pred) & (y == 1)).sum(1)
    f1 = np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    best = np.flatnonzero(f1 == f1.max())[-1]
    stats = {"f1": float(f1[best]), "precision": float(tp[best] / max(tp[best] + fp[best], 1)),
             "recall": float(tp[best] / max(tp[best] + fn[best], 1)),
             "false_alarm_rate": float(fp[best] / max((y == 0).sum(), 1))}
    return float(cands[best]), stats


def conformal_threshold(normal_scores, false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE) -> float:
    """The ceil((n + 1)(1 - a))-th smallest of n normal scores (module doc)."""
    s = np.sort(np.asarray(normal_scores, dtype=np.float64))
    s = s[np.isfinite(s)]
    _check_rate(false_alarm_rate)
    n = s.size
    k = math.ceil((n + 1) * (1 - false_alarm_rate))
    if k > n:
        raise FiseclipError(f"a false-alarm rate of {false_alarm_rate:g} needs at least "
                            f"{math.ceil(1 / false_alarm_rate - 1)} normal scores, got {n}; raise "
                            f"--false-alarm-rate or score more normal images")
    return float(s[k - 1])


def _check_rate(a: float) -> None:
    if not (isinstance(a, (int, float)) and 0 < a < 0.5):
        raise FiseclipError(f"false-alarm rate {a!r} must be in (0, 0.5), e.g. 0.01")


@dataclass
class Threshold:
    """A calibrated decision rule: anomalous when score > value. Written to / read from threshold.json."""

    value: float
    method: str
    false_alarm_rate: float | None = None  # the target (robust_z, quantile)
    stats: dict = dataclasses.field(default_factory=dict)
    n_scores: int = 0
    category: str | None = None
    encoder: dict | None = None
    config_method: str | None = None
    config_hash: str | None = None
    mode: str | None = None
    source: str | None = None

    def to_dict(self) -> dict:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    def save(self, path) -> None:
        write_json_atomic(path, self.to_dict())

    def decide(self, scores) -> np.ndarray:
        """"anomalous" / "normal" per score."""
        return np.where(np.asarray(scores, dtype=np.float64) > self.value, "anomalous", "normal")

    def check(self, detector, mode: str, force: bool = False) -> None:
        """Stop (or warn, with force) when the scores to threshold come from another encoder, method,
        config or scoring mode than the calibration scores."""
        if self.method == "given":
            return  # a number the user chose: nothing to check it against
        if self.encoder is None or self.config_hash is None:
            warnings.warn(f"threshold {self.source or ''} records no config (calibrated from scores without a "
                          f"config.json beside them): it cannot be checked against this config")
            return
        enc = detector.encoder.identity()
        diffs = [f"encoder {k} {self.encoder.get(k)!r} vs {enc.get(k)!r}" for k in ENCODER_FIELDS
                 if k in self.encoder and self.encoder.get(k) != enc.get(k)]
        if self.config_method and self.config_method != detector.config.method:
            diffs.append(f"method {self.config_method} vs {detector.config.method}")
        h = config_hash(detector.config.to_dict(), mode)
        if not diffs and self.config_hash not in {h} | legacy_config_hashes(detector.config, mode):
            diffs.append(f"config/scoring mode ({self.mode} config {self.config_hash} vs {mode} config {h})")
        if diffs:
            msg = (f"threshold {self.source or ''} was calibrated on other scores: {'; '.join(diffs)}; recalibrate "
                   f"with fiseclip calibrate on scores of this config (or --force-threshold)")
            if not force:
                raise FiseclipError(msg)
            warnings.warn(msg)


def load_threshold(spec) -> Threshold:
    """A Threshold from a Threshold, a number, or a threshold.json path (one-line errors for bad files)."""
    if isinstance(spec, Threshold):
        return spec
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        if not math.isfinite(spec):
            raise FiseclipError(f"threshold {spec} must be a finite number")
        return Threshold(value=float(spec), method="given")
    text = str(spec)
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is not None and not Path(text).exists():
        return load_threshold(value)
    p = Path(text)
    if not p.is_file():
        raise FiseclipError(f"threshold file {p} does not exist; create it with fiseclip calibrate")
    try:
        d = json.loads(p.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise FiseclipError(f"threshold file {p} is not valid JSON; recreate it with fiseclip calibrate") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise FiseclipError(f"threshold file {p} is not a fiseclip threshold ({FORMAT}); recreate it with "
                            f"fiseclip calibrate")
    v = d.get("value")
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise FiseclipError(f"threshold file {p}: value {v!r} is not a finite number")
    fields = {f.name for f in dataclasses.fields(Threshold)}
    t = Threshold(**{k: d[k] for k in fields if k in d})
    t.source = str(p)
    return t


def calibrate(scores, labels=None, method: str = "auto",
              false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE, provenance: dict | None = None,
              category: str | None = None) -> Threshold:
    """A threshold from image scores (module doc).

    Args:
        scores: `[N]` image scores.
        labels: `[N]` 0 normal / 1 anomalous, or None (unlabeled).
        method: auto | f1 | robust_z | quantile.
        false_alarm_rate: target rate for robust_z and quantile.
        provenance: the `config.json` record of the scores (config, encoder, scoring mode), or None.
        category: the category the scores belong to.
    Returns:
        A Threshold (`.save(path)` writes threshold.json).
    """
    if method not in METHODS:
        raise FiseclipError(f"unknown calibration method {method!r}: choose one of {', '.join(METHODS)}")
    s = np.asarray(scores, dtype=np.float64)
    y = None if labels is None else np.asarray(labels).astype(int)
    if s.size == 0:
        raise FiseclipError("no scores to calibrate on")
    if method == "auto":
        method = "f1" if (y is not None and (y == 1).any() and (y == 0).any()) else "robust_z"
    stats: dict = {}
    rate = None
    if method == "f1":
        if y is None:
            raise FiseclipError("F1 calibration needs labels (a label column); use --method robust_z")
        value, stats = f1_threshold(s, y)
    elif method == "robust_z":
        rate = false_alarm_rate
        value = robust_threshold(s, rate)
        finite = s[np.isfinite(s)]  # the scores robust_threshold used
        med, mad = median_mad(finite)
        stats = {"median": med, "mad": mad,
                 "z": NormalDist().inv_cdf(1 - rate), "calibration_flag_rate": float(np.mean(s > value))}
    else:
        rate = false_alarm_rate
        normal = s if y is None else s[y == 0]
        value = conformal_threshold(normal, rate)
        stats = {"normal_scores": int(normal.size), "calibration_flag_rate": float(np.mean(normal > value))}
    prov = provenance or {}
    enc = prov.get("encoder") or None
    cfg = prov.get("config") or None
    mode = (prov.get("scoring") or {}).get("mode", "batch") if prov else None
    return Threshold(
        value=float(value), method=method, false_alarm_rate=rate, stats=stats, n_scores=int(s.size),
        category=category, encoder={k: enc.get(k) for k in ENCODER_FIELDS} if enc else None,
        config_method=cfg.get("method") if cfg else None,
        config_hash=config_hash(cfg, mode) if cfg else None, mode=mode)


def read_scores(path, category: str | None = None):
    """scores.csv (`run`) or predictions.csv (`predict`) -> (scores, labels or None, provenance or None,
    category). A file with several categories needs `category`."""
    p = Path(path)
    if not p.is_file():
        raise FiseclipError(f"scores file {p} does not exist; pass the scores.csv of fiseclip run or the "
                            f"predictions.csv of fiseclip predict")
    try:
        df = pd.read_csv(p, keep_default_na=False, na_values=["nan", "NaN", ""])
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise FiseclipError(f"scores file {p} is not a readable CSV ({type(e).__name__}); pass a scores.csv "
                            f"written by fiseclip") from None
    if "score" not in df.columns:
        raise FiseclipError(f"scores file {p} has no score column (columns: {', '.join(map(str, df.columns))})")
    if "category" in df.columns:
        cats = sorted(map(str, df["category"].unique()))
        if category is not None:
            if category not in cats:
                raise FiseclipError(f"scores file {p} has no category {category!r}; it holds {', '.join(cats)}")
            df = df[df["category"].astype(str) == category]
        elif len(cats) > 1:
            raise FiseclipError(f"scores file {p} holds categories {', '.join(cats)}: pass --category NAME "
                                f"(a threshold belongs to one category)")
        else:
            category = cats[0] if cats else None
    scores = pd.to_numeric(df["score"], errors="coerce").to_numpy(dtype=np.float64)
    if not np.isfinite(scores).any():
        raise FiseclipError(f"scores file {p} has no finite score")
    labels = None
    if "label" in df.columns:
        labels = pd.to_numeric(df["label"], errors="coerce").to_numpy()
        if not np.isin(labels, [0, 1]).all():
            raise FiseclipError(f"scores file {p}: labels must be 0 (normal) or 1 (anomalous)")
    prov = None
    conf = p.parent / "config.json"
    if conf.is_file():
        try:
            prov = json.loads(conf.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError):
            warnings.warn(f"{conf} is damaged; the threshold records no config")
    else:
        warnings.warn(f"no config.json beside {p}: the threshold records no config and cannot be checked when "
                      f"applied")
    return scores, labels, prov, category


def calibrate_file(scores_path, out, method: str = "auto", false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
                   category: str | None = None) -> Threshold:
    """`fiseclip calibrate`: read scores (`read_scores`), calibrate, write threshold.json atomically."""
    scores, labels, prov, category = read_scores(scores_path, category)
    t = calibrate(scores, labels, method, false_alarm_rate, prov, category)
    t.source = str(scores_path)
    t.save(out)
    return t
