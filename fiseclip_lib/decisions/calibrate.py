"""Thresholds: from image scores to a decision rule, with the provenance needed to apply it safely.

A score means something only for the scores it was calibrated on: a robust-z fused map, a raw distance and an
RsCIN-normalised score are different scales, a bank of known-good references or a stream moves every score. So
a threshold file (format `fiseclip-threshold/2`) records, from the `config.json` beside the scores:
  category   the category / class name of the images (`predict --class-name` must name the same);
  encoder    its identity (model, weights content, input size, precision, preprocessing, restoration depth);
  config     every config field that changes scores (the config's own metadata: `config.scoring_fields`, less
             the batch-only fields for a stream), automatic values resolved;
  mode       the decision mode: `batch` (images referencing each other: `run`, `predict`), `bank` (a batch with
             a reference bank: `predict --reference-dir`) or `stream` (`predict --stream`);
  scale      what the score is (method, branch normalisation, RsCIN, text weight), for the reader;
  config_hash  a hash of config and mode (a quick test), and `checksum`, over the whole record.
`Threshold.check` compares each of these with the scores to threshold and, on a difference, stops naming every
field that differs with both values (`force` turns it into a warning). A file changed by hand fails its checksum
and is refused; a file never says `method: given` (a plain number on the command line is the only unchecked
threshold). Files of format 1 (version 0.1 on) still load and are checked by their config hash
(`legacy_config_hashes`).

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
Every method needs finite scores (a NaN or inf row is an error naming it); the file and the command's summary
line state the flag rate over the scores used (`flag_rate`: the share above the threshold).
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

from fiseclip_lib.plumbing.files import write_text_atomic
from fiseclip_lib.config import FiseConfig, scoring_fields
from fiseclip_lib.core.robust import MAD_TO_SIGMA, median_mad
from fiseclip_lib.errors import FiseclipError

METHODS = ("auto", "f1", "robust_z", "quantile")
DEFAULT_FALSE_ALARM_RATE = 0.01
ENCODER_FIELDS = ("model", "weights_id", "input_size", "precision", "quick_gelu", "restore_depth")  # format 1
ENCODER_UNCHECKED = ("weights",)  # the weights as asked (a path or tag); their content is weights_id
MODES = ("batch", "bank", "stream")
FORMAT = "fiseclip-threshold/2"
FORMAT_1 = "fiseclip-threshold/1"
FORMATS = (FORMAT_1, FORMAT)  # what load_threshold reads
SCALE_FIELDS = ("method", "fusion_norm", "rscin", "beta")


def _jsonable(x):
    """`x` as it reads back from JSON (tuples become lists), so that recorded and live values compare."""
    return json.loads(json.dumps(x, default=str))


def scored_config(config: dict, mode: str = "batch") -> dict:
    """The config fields that change scores of this mode, automatic values resolved (so that `sigma: null` and
    the 4 px it means are one value); streaming ignores the batch-only fields (config.py).

    Args:
        config: a config dict (`FiseConfig.to_dict()` or `resolved()`; one of another version is taken as
            written).
        mode: batch, bank or stream.
    Returns:
        {field: value} as JSON reads it back.
    """
    try:
        config = FiseConfig.from_dict(config).resolved()
    except FiseclipError:
        pass  # a config of another version: compared as written (the check names what differs)
    relevant = scoring_fields(config, stream=mode == "stream")
    if relevant.get("rscin") is False:
        relevant.pop("rscin_ks", None)  # no RsCIN: its k list (resolved per dataset) changes no score
    return _jsonable(relevant)


def _hash(relevant: dict, mode: str) -> str:
    return hashlib.sha256(json.dumps({"config": relevant, "mode": mode}, sort_keys=True,
                                     default=str).encode()).hexdigest()[:16]


def config_hash(config: dict, mode: str = "batch") -> str:
    """sha256 (16 hex) of the config fields that change scores (`scored_config`) and the mode."""
    return _hash(scored_config(config, mode), mode)


def score_scale(config: dict, mode: str = "batch") -> dict:
    """What a score is, in the fields that set its scale: the method (its branches), the branch normalisation,
    RsCIN's pool re-scoring (never in a stream) and the weight of the text score."""
    c = scored_config(config, mode)
    return {"method": c.get("method"), "fusion_norm": c.get("fusion_norm"),
            "rscin": bool(c.get("rscin")) if mode != "stream" else False, "beta": c.get("beta")}


def decision_mode(scoring: dict | None) -> str:
    """The decision mode of scores from their `config.json` `scoring` record: stream, bank (a batch with
    references; config.json files before format 2 of thresholds say batch and count the references) or batch
    (also for `run`, whose config.json has no such record)."""
    scoring = scoring or {}
    mode = scoring.get("mode") or "batch"
    if mode == "batch" and (scoring.get("references") or 0) > 0:
        return "bank"
    return mode


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
    config: dict | None = None  # scored_config of the calibration scores (None: a format 1 file, or no config)
    scale: dict | None = None
    flag_rate: float | None = None  # share of the scores used above the threshold
    n_used: int | None = None  # the scores the rule was computed from (quantile: the normal ones)

    def to_dict(self) -> dict:
        d = {"format": FORMAT, **dataclasses.asdict(self)}
        d["checksum"] = record_checksum(d)
        return d

    def save(self, path) -> None:
        """Write threshold.json atomically, as strict JSON (a NaN or inf is an error, never written)."""
        try:
            text = json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False)
        except ValueError:
            raise FiseclipError(f"threshold {path}: a non-finite number in {self.to_dict()}; nothing written") from None
        write_text_atomic(path, text + "\n")

    def decide(self, scores) -> np.ndarray:
        """"anomalous" / "normal" per score."""
        return np.where(np.asarray(scores, dtype=np.float64) > self.value, "anomalous", "normal")

    def differences(self, detector, mode: str, class_name: str | None = None) -> list[str]:
        """What differs between the calibration scores and the scores of `detector` in `mode` (batch, bank,
        stream) for `class_name`: one "field: threshold value vs now value" per field (empty: none).

        Args:
            detector: the Detector that scores the images to threshold.
            mode: their decision mode.
            class_name: their class name (None: not checked).
        Returns:
            The differences, category first, then mode, encoder, config fields and scale.
        """
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        diffs = []
        if class_name is not None and self.category is not None and str(self.category) != str(class_name):
            diffs.append(f"category {self.category!r} in the threshold vs class name {class_name!r} now")
        if self.encoder is None and self.config_hash is None:
            return diffs  # no config recorded (check warns)
        legacy = self.config is None  # format 1: a bank was "batch", the config only a hash
        if legacy and mode == "bank" and self.mode == "batch":
            mode = "batch"
        if self.mode is not None and self.mode != mode:
            diffs.append(f"mode {self.mode} in the threshold vs {mode} now")
        enc = _jsonable(detector.encoder.identity())
        for k in sorted(self.encoder or {}):
            if k not in ENCODER_UNCHECKED and self.encoder[k] != enc.get(k):
                diffs.append(f"encoder {k} {self.encoder[k]!r} in the threshold vs {enc.get(k)!r} now")
        cfg = detector.config.to_dict()
        if legacy:
            if self.config_method and self.config_method != detector.config.method:
                diffs.append(f"method {self.config_method!r} in the threshold vs {detector.config.method!r} now")
            known = {config_hash(cfg, mode)} | legacy_config_hashes(detector.config, mode)
            if not diffs and self.config_hash is not None and self.config_hash not in known:
                diffs.append(f"config (a threshold file of {FORMAT_1} records only its hash, {self.config_hash}: "
                             f"recalibrate to see which field differs)")
            return diffs
        now = scored_config(cfg, mode)
        if self.config_hash == _hash(now, mode) and self.config == now:
            fields = []  # the quick test; the field comparison below decides when it fails
        else:
            default = _jsonable(FiseConfig().to_dict())
            missing = object()
            fields = []
            for k in sorted(set(self.config) | set(now)):  # rscin before rscin_ks
                if k == "rscin_ks" and "rscin" in fields:
                    continue  # RsCIN on one side only: its k list is not the difference
                # a field the file predates had its default then (new fields default to the old behaviour)
                was = self.config.get(k, default.get(k, missing))
                cur = now.get(k, missing)
                if was != cur:
                    fields.append(k)
                    diffs.append(f"{k} {_show(was, missing)} in the threshold vs {_show(cur, missing)} now")
        for k, v in sorted((self.scale or {}).items()):
            cur = score_scale(cfg, mode).get(k)
            if k not in fields and v != cur:
                diffs.append(f"score scale {k} {v!r} in the threshold vs {cur!r} now")
        return diffs

    def check(self, detector, mode: str, force: bool = False, class_name: str | None = None) -> None:
        """Stop (or warn, with force) when the scores to threshold are not those it was calibrated on: another
        category, decision mode, encoder, score-changing config field or score scale (`differences`); the
        message names each differing field with both values.

        Args:
            detector: the Detector that scores the images to threshold.
            mode: batch, bank (a batch with a reference bank) or stream.
            force: warn instead of stopping.
            class_name: the images' class name (None: not checked).
        """
        if self.method == "given":
            return  # a number the user typed (load_threshold never reads one from a file)
        diffs = self.differences(detector, mode, class_name)
        if self.encoder is None and self.config_hash is None:
            warnings.warn(f"threshold {self.source or ''} records no config (calibrated from scores without a "
                          f"config.json beside them): it cannot be checked against this config")
        if diffs:
            msg = (f"threshold {self.source or ''} was calibrated on other scores: {'; '.join(diffs)}; recalibrate "
                   f"with fiseclip calibrate on scores of this config (or --force-threshold)")
            if not force:
                raise FiseclipError(msg)
            warnings.warn(msg)


def _show(v, missing) -> str:
    return "(not recorded)" if v is missing else repr(v)


def record_checksum(d: dict) -> str:
    """sha256 (16 hex) of a threshold record without its checksum: a file changed by hand no longer matches."""
    body = {k: v for k, v in d.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_threshold(spec) -> Threshold:
    """A Threshold from a Threshold, a number, or a threshold.json path (one-line errors for bad files).

    Only a number gives an unchecked threshold (method "given"); a file must be one fiseclip calibrate wrote
    (format 2: its checksum matches) or a file of format 1.
    """
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
    if not isinstance(d, dict) or d.get("format") not in FORMATS:
        raise FiseclipError(f"threshold file {p} is not a fiseclip threshold ({FORMAT}); recreate it with "
                            f"fiseclip calibrate")
    v = d.get("value")
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise FiseclipError(f"threshold file {p}: value {v!r} is not a finite number")
    if d.get("method") not in METHODS[1:]:
        hint = (" ('given' is what a plain number on the command line is; a file is always checked)"
                if d.get("method") == "given" else "")
        raise FiseclipError(f"threshold file {p}: method {d.get('method')!r} is not one fiseclip calibrate writes"
                            f"{hint}; recalibrate, or pass the number itself with --threshold VALUE")
    if d["format"] == FORMAT and d.get("checksum") != record_checksum(d):
        raise FiseclipError(f"threshold file {p} was changed after fiseclip calibrate wrote it (its checksum does "
                            f"not match); recalibrate, or pass the number itself with --threshold VALUE")
    kinds = {"encoder": dict, "config": dict, "scale": dict, "stats": dict, "category": str, "mode": str}
    for k, kind in kinds.items():
        if d.get(k) is not None and not isinstance(d[k], kind):
            raise FiseclipError(f"threshold file {p}: {k} {d[k]!r} is not a {kind.__name__}; recreate it with "
                                f"fiseclip calibrate")
    if d.get("mode") is not None and d["mode"] not in MODES:
        raise FiseclipError(f"threshold file {p}: mode {d['mode']!r} is not one of {', '.join(MODES)}")
    fields = {f.name for f in dataclasses.fields(Threshold)}
    t = Threshold(**{k: d[k] for k in fields if k in d})
    t.source = str(p)
    return t


def calibrate(scores, labels=None, method: str = "auto",
              false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE, provenance: dict | None = None,
              category: str | None = None) -> Threshold:
    """A threshold from image scores (module doc).

    Args:
        scores: `[N]` image scores, all finite.
        labels: `[N]` 0 normal / 1 anomalous, or None (unlabeled).
        method: auto | f1 | robust_z | quantile.
        false_alarm_rate: target rate for robust_z and quantile.
        provenance: the `config.json` record of the scores (config, encoder, scoring mode), or None.
        category: the category the scores belong to (default: the record's class_name, if any).
    Returns:
        A Threshold (`.save(path)` writes threshold.json), with its flag rate over the scores it used.
    """
    if method not in METHODS:
        raise FiseclipError(f"unknown calibration method {method!r}: choose one of {', '.join(METHODS)}")
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = None if labels is None else np.asarray(labels).astype(int)
    if s.size == 0:
        raise FiseclipError("no scores to calibrate on")
    bad = np.flatnonzero(~np.isfinite(s))
    if bad.size:
        raise FiseclipError(f"{bad.size} score(s) are not finite (positions {_listed(bad.tolist())}): a threshold "
                            f"needs finite scores; rescore those images or leave them out")
    if method == "auto":
        method = "f1" if (y is not None and (y == 1).any() and (y == 0).any()) else "robust_z"
    stats: dict = {}
    rate = None
    used = s
    if method == "f1":
        if y is None:
            raise FiseclipError("F1 calibration needs labels (a label column); use --method robust_z")
        value, stats = f1_threshold(s, y)
    elif method == "robust_z":
        rate = false_alarm_rate
        value = robust_threshold(s, rate)
        med, mad = median_mad(s)
        stats = {"median": med, "mad": mad,
                 "z": NormalDist().inv_cdf(1 - rate), "calibration_flag_rate": float(np.mean(s > value))}
    else:
        rate = false_alarm_rate
        used = s if y is None else s[y == 0]
        value = conformal_threshold(used, rate)
        stats = {"normal_scores": int(used.size), "calibration_flag_rate": float(np.mean(used > value))}
    prov = provenance or {}
    enc = prov.get("encoder") or None
    cfg = prov.get("config") or None
    mode = decision_mode(prov.get("scoring")) if prov else None
    if category is None and prov.get("class_name"):
        category = str(prov["class_name"])
    relevant = scored_config(cfg, mode) if cfg else None
    return Threshold(
        value=float(value), method=method, false_alarm_rate=rate, stats=stats, n_scores=int(s.size),
        category=category, encoder=_jsonable(enc) if enc else None,
        config_method=cfg.get("method") if cfg else None,
        config_hash=_hash(relevant, mode) if cfg else None, mode=mode, config=relevant,
        scale=score_scale(cfg, mode) if cfg else None,
        flag_rate=float(np.mean(used > value)), n_used=int(used.size))


def _listed(items, most: int = 5) -> str:
    shown = ", ".join(map(str, items[:most]))
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


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
    if df.empty:
        raise FiseclipError(f"scores file {p} has no rows to calibrate on")
    scores = pd.to_numeric(df["score"], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:  # named by their line in the file (the header is line 1) and their image
        lines = (df.index.to_numpy()[bad] + 2).tolist()
        names = df["path"].astype(str).to_numpy()[bad].tolist() if "path" in df.columns else [None] * bad.size
        raw = df["score"].astype(str).to_numpy()[bad].tolist()
        rows = [f"line {ln} ({v}{', ' + n if n else ''})" for ln, v, n in zip(lines, raw, names)]
        raise FiseclipError(f"scores file {p}: {bad.size} score(s) are not finite numbers, in the row(s) at "
                            f"{_listed(rows, 3)}; rescore those images or delete their rows")
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
            prov = None
        if not isinstance(prov, dict):
            prov = None
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
