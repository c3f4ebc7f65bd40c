"""Streaming: one image at a time against a rolling bank of the last accepted images.

On a production line images arrive one by one and there is no batch to wait for. `Streamer.push(image)`
scores an image against the references it has at that moment:
  - the fixed reference bank (known-good images, `--reference-dir`; never filtered, never dropped), plus
  - a rolling bank of the last `bank_size` (K) images that were *accepted* (admitted), each filtered by its own
    text map exactly as a batch reference is (`filtering.reference_keep` on that image alone).
The cost per image is one encoder pass, one LNAMD of the image, and matching against at most K + R references:
it does not grow with the number of images seen (each bank image's aggregated features are computed once,
when it enters the bank, and kept stacked: an entering image overwrites the oldest row, nothing is re-stacked).
`Streamer.run` encodes `prefetch` images per encoder call (the bank changes between images, so only the encoder
is batched; decisions stay sequential). Memory: K + R images' features per layer and degree.

Exactness. The streamed score of an image is `Detector.score_against([image], references)` with the references
it was scored against (`StreamResult.reference_paths`): the same function on the same inputs, so the two agree
to float rounding (tests: 1e-6). Normalisation is per image (module doc of `predict.py`), so the score never
depends on the other images of the stream except through the bank. A reference with the same content as the
image (`BankEntry.digest`, the feature cache's `image_hash`) is left out for that image: an image is never
matched against a copy of itself.

Tiles and alignment (`tiles`, `align`; `_Frames`): an image is registered to the median of the known-good
references (a fixed frame; align needs them) and cut into the tiles of its size; tile t is scored against tile t
of every reference (`tile_match=same`: one rolling stack per tile) or each tile against every tile of them
(`all`), the map stitched at the image's size and shifted back to its frame, the score taken on the stitched map,
exactly as `Detector.score` does for a batch (`score_against` with the same references; tests: 1e-5). Memory and
cost: T tiles per image, K x T rolling entries.

Speed: a streamed image needs K products against its references where a batch of K + 1 shares each product
between two images (K / 2 per image): about twice the matching work, so the stream reaches 0.5-0.6 of a batch's
throughput at K = 16 when matching dominates (benchmarks/README.md; bench.py's stream section).

Admission (what keeps defects out of the bank). An image enters the rolling bank only when both say normal:
  1. the score: warm, `score <= threshold`; while calibrating (no threshold yet), policy `admission`:
       "robust" (default) below median + CALIBRATING_Z (3.5) x 1.4826 MAD of the normal scores seen so far
                 (known-good leave-one-out scores and admitted images; needs MIN_BOUND_SCORES (3) of them, the
                 images before that are admitted on the text's word alone). A run of defects while calibrating
                 stays out of the bank; the price: a first normal image far from the few before it (a slow
                 change) is kept out too, so calibration takes a few more images.
       "open"    the text's word alone (the behaviour before issue 20): cheap, but an unguarded stream without
                 a text branch (CNN encoders) admits anything it sees before it is warm.
  2. the text (methods with a text branch and `filter` != none): the image's text score s_T (CLIP's
     probability of "abnormal" for the whole image) must be below `text_gate` (default `filter_theta`).
An image judged anomalous never enters, so a run of defects is scored against the normal images before it and
cannot teach the bank that defects are normal. Its patches the text calls abnormal are also never references.

The threshold (`rule`, used when no threshold is given):
  robust_z   (default) median + z x 1.4826 MAD of the last `history` normal scores, z = Phi^-1(1 - rate), from
             `min_history` of them. NOT rate-controlled: image scores are maxima of maps, skewed to the right,
             so the realised false-alarm rate is above the target (an outside trial: 6 % for a 1 % target over
             34 warm decisions). Measure yours with `false_alarm_study`.
  conformal  the ceil((n + 1)(1 - rate))-th smallest of the last n normal scores once n >= 1/rate - 1 (99 at
             1 %; `history` is raised to hold them); robust_z before that. For normal images exchangeable with
             the history, the false-alarm rate is at most the target; the price: slower to warm up, and a score
             history of admitted (hence below-threshold) images biases it low, i.e. towards more alarms, never
             fewer.

Shifts (a lighting or product change): the bank never adapts by itself, since flagged images never enter it.
  - drift alarm: when more than `drift_rate` of the last `drift_window` (W) warm decisions are "anomalous", the
    state is "drift" and one line is warned (once per episode). `on_drift` says what happens then:
      "flag" (default)   keep flagging: a line stops on a real change; an operator confirms the new normal.
      "rebaseline"       the last min(K, W) images become the rolling bank and their leave-one-out scores the
                         score history: the stream adapts by itself, at the price that a long enough run of real
                         defects (W x drift_rate in a row) is taken as the new normal.
  - `Streamer.confirm_normal(images)` (or `confirm=` paths: the arrival of the first of them confirms them
    all; CLI `predict --stream --confirm FILE`): an operator's word that these images are the new normal. The
    rolling bank and the score history are reset to them (the fixed known-good bank stays).

States (`StreamResult.state`):
  cold         fewer than `min_references` (2) references: too few to judge. The score is still finite (against
               the one reference, or the text map alone / zeros without any), the decision is "undecided", and
               the image is admitted on the text's word alone (encoders without text: admitted). Give
               known-good references (`references=`) to start warm and to guard the start. A stream whose
               bank size plus references is below min_references can never leave it (warned at the start).
  calibrating  enough references but no threshold yet (no threshold given and fewer than `min_history`
               normal scores): decision "undecided", admission by policy `admission`. Known-good references
               count: each is scored once against the others at the start (`leave_one_out_scores`), so with
               `min_history` (8) of them the stream is warm from its first image.
  warm         decisions by the threshold; admission by threshold and text.
  drift        warm, and the drift alarm is on (above).
"""
from __future__ import annotations

import collections
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from fiseclip_lib.core import align, tiling
from fiseclip_lib.core.detector import Detector, concat_features, split_features
from fiseclip_lib.core.references import BankEntry, ReferenceBank, check_finite_tokens
from fiseclip_lib.core.robust import MAD_TO_SIGMA, median_mad
from fiseclip_lib.errors import FiseclipError
from fiseclip_lib.plumbing.cache import image_hash
from fiseclip_lib.plumbing.images import image_name

MIN_REFERENCES = 2
MIN_HISTORY = 8
HISTORY = 64
CALIBRATING_Z = 3.5  # robust z above which a calibrating stream keeps an image out (references.AUDIT_Z's bound)
MIN_BOUND_SCORES = 3  # fewer normal scores give no usable median and MAD
DRIFT_WINDOW = 16
DRIFT_RATE = 0.5
RULES = ("robust_z", "conformal")
ADMISSIONS = ("robust", "open")
ON_DRIFT = ("flag", "rebaseline")


@dataclass
class StreamResult:
    """One streamed image. score is finite in every state; map is `[S, S]` when asked for (keep_map)."""

    index: int
    path: str | None
    score: float
    decision: str  # normal | anomalous | undecided
    state: str  # cold | calibrating | warm | drift
    admitted: bool
    references: int
    threshold: float | None
    text_score: float | None = None
    reference_paths: list = field(default_factory=list)
    map: np.ndarray | None = None
    shift: tuple[float, float] | None = None  # align: the (dy, dx) px that registered the image


class _Stack:
    """The fixed entries and a ring of K rolling entries, stacked once: `bank()` is a ReferenceBank whose stacked
    tensors are views (rows: fixed, then rolling slots), so nothing is re-stacked per image."""

    def __init__(self, fixed: Sequence[BankEntry], k: int):
        self.fixed, self.k = list(fixed), k
        self.slots: list[BankEntry | None] = [None] * k
        self.filled = self.next = 0
        self.feats = self.keep = self.penalty = None
        self.tokens = self.norms = None  # the box engines' route (BankEntry.tokens / norms), when every entry has them
        self.has_keep = self.has_pen = False
        self.has_tokens = True
        for i, e in enumerate(self.fixed):
            self._write(i, e)

    def _write(self, row: int, e: BankEntry) -> None:
        if self.feats is None:
            n = len(self.fixed) + self.k
            self.feats = {key: torch.empty((n,) + tuple(t.shape[1:]), dtype=t.dtype) for key, t in e.features.items()}
            p = next(iter(e.features.values())).shape[1]
            self.keep = torch.ones(n, p, dtype=torch.bool)
            self.penalty = torch.zeros(n, p)
        for key, t in self.feats.items():
            t[row] = e.features[key][0]
        tokens, norms = e.tokens, e.norms
        self.has_tokens &= tokens is not None and norms is not None
        if self.has_tokens:
            if self.tokens is None:
                n = len(self.fixed) + self.k
                self.tokens = {l: torch.empty((n,) + tuple(t.shape[1:]), dtype=t.dtype) for l, t in tokens.items()}
                self.norms = {key: torch.empty((n,) + tuple(t.shape[1:])) for key, t in norms.items()}
            check_finite_tokens([e])  # once here, not at every query
            for l, t in self.tokens.items():
                t[row] = tokens[l][0]
            for key, t in self.norms.items():
                t[row] = norms[key][0]
        # entries without a filter keep all their patches with no penalty (references.stack_entries)
        self.keep[row] = True if e.keep is None else e.keep[0]
        self.penalty[row] = 0.0 if e.penalty is None else e.penalty[0]
        self.has_keep |= e.keep is not None
        self.has_pen |= e.penalty is not None

    def push(self, e: BankEntry) -> None:
        slot = self.next % self.k
        self._write(len(self.fixed) + slot, e)
        self.slots[slot] = e
        self.next += 1
        self.filled = min(self.k, self.filled + 1)

    def clear(self) -> None:
        self.slots = [None] * self.k
        self.filled = self.next = 0

    def bank(self, exclude_digest: str | None = None) -> ReferenceBank:
        entries = self.fixed + self.slots[:self.filled]
        rows = [i for i, e in enumerate(entries)
                if exclude_digest is None or getattr(e, "digest", None) != exclude_digest]
        bank = ReferenceBank([entries[i] for i in rows])
        if not rows:
            return bank
        pick = (lambda t: t[:len(entries)]) if len(rows) == len(entries) else (lambda t: t[rows])  # noqa: E731
        bank._stacked = ({key: pick(t) for key, t in self.feats.items()}, pick(self.keep) if self.has_keep else None,
                         pick(self.penalty) if self.has_pen else None)
        bank._stacked_tokens = ((None, None) if not self.has_tokens else
                                ({l: pick(t) for l, t in self.tokens.items()},
                                 {key: pick(t) for key, t in self.norms.items()}))
        return bank


class _Frames:
    """How a stream with `tiles` or `align` sees an image (the batch's way: core/align.py, core/tiling.py).

    An image is registered to the known-good references' median image (align: a fixed frame; a rolling template
    would follow a drift), cut into the tiles of its size (tiles), and each tile is a unit: tile t is matched
    against tile t of the references (tile_match same: one rolling stack per tile) or every unit against every
    tile of them (all: one stack of K x T tiles). Maps are stitched at the image's size and shifted back to its
    frame; the score is taken on the stitched map, as `Detector.score` does for a batch.
    """

    def __init__(self, detector: Detector, references: ReferenceBank, class_name: str):
        cfg = detector.config
        self.detector, self.class_name = detector, class_name
        self.same = cfg.tile_match == "same"
        self.template = None
        if cfg.align != "none":
            self.template = align.bank_template(references)
            if self.template is None:
                raise FiseclipError(f"align={cfg.align} in a stream registers each image to the median of the "
                                    f"known-good references: give them as image paths (--reference-dir), or use "
                                    f"align=none")
        self.hw = self.grid = self.boxes = None
        self.units = 1
        self.fixed: list[list[BankEntry]] = [list(references.entries)]  # per unit: the known-good references' entries
        if len(references):
            self.set_size(tiling.as_array(references.entries[0].path).shape[:2] if references.entries[0].path
                          else None, references)

    def set_size(self, hw, references: ReferenceBank | None = None) -> None:
        """The tile layout of images of this (H, W) size; the known-good references cut the same way."""
        if hw is None:
            raise FiseclipError("tiles in a stream: the known-good references must be given as image paths")
        cfg = self.detector.config
        self.hw = tuple(hw)
        self.grid = tiling.resolve_grid(cfg.tiles, self.hw, self.detector.encoder.image_size, cfg.tile_overlap,
                                        tuple(self.detector.encoder.grid))
        if self.grid is None:
            return
        self.boxes = tiling.tile_boxes(self.hw, self.grid, cfg.tile_overlap)
        self.units = len(self.boxes)
        if references is not None and len(references):
            banks = tiling.tile_banks(self.detector, references, self.class_name, self.grid, cfg.tile_overlap,
                                      self.hw)  # references of another size are refused
            # a reference's tiles carry its path and content hash: a copy of an image never references it
            self.fixed = [[dataclasses.replace(e, path=src.path, digest=src.digest)
                           for e, src in zip(b.entries, references.entries)] for b in banks]

    def stacks(self, k: int) -> list["_Stack"]:
        if self.same:
            return [_Stack(self.fixed[t] if t < len(self.fixed) else [], k) for t in range(self.units)]
        return [_Stack([e for unit in self.fixed for e in unit], k * self.units)]

    def encode(self, image):
        """(one Features per unit, the shift that registered the image or None)."""
        arr = tiling.as_array(image)
        if self.hw is None:
            self.set_size(arr.shape[:2])
        elif arr.shape[:2] != self.hw:
            raise FiseclipError(f"{image_name(image)} is {arr.shape[1]}x{arr.shape[0]} px, the stream's "
                                f"frame (its references or first image) {self.hw[1]}x{self.hw[0]}: a tiled or "
                                f"registered stream takes one size")
        shift = None
        if self.template is not None:
            unreliable: list = []
            shift = align.estimate_shifts([align.to_gray(arr)], self.template, unreliable)[0]
            if unreliable:
                align.warn_unreliable(image_name(image))
            arr = align.moved_onto(arr, shift)
        crops = tiling.cut(arr, self.boxes) if self.grid else [arr]
        return split_features(self.detector.encode(crops)), shift


def _digest(item) -> str | None:
    """The content hash of a rolling item: a BankEntry, or the list of an image's unit entries."""
    return (item[0] if isinstance(item, list) else item).digest


def _path_of(image) -> str | None:
    return str(image) if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__") else None


class Streamer:
    """Scores images one at a time against a rolling bank (module doc).

    Args:
        detector: the Detector (config, encoder, feature cache).
        class_name: the object's name for the prompts.
        bank_size: K, how many accepted images the rolling bank holds (oldest out first).
        references: a ReferenceBank of known-good images, or paths of them (never filtered, never dropped).
        threshold: a number, a `calibrate.Threshold`, or None (the online rule `rule`).
        false_alarm_rate: target rate of the online rule.
        text_gate: s_T above this keeps an image out of the bank (default: the config's filter_theta for the
            method fiseclip; None for no text gate).
        min_references: below this many references the state is cold.
        min_history, history: the online rule needs min_history normal scores and uses the last `history`
            (default 64; the conformal rule raises it to hold 2 / false_alarm_rate scores).
        rule: "robust_z" or "conformal" (module doc: only the latter controls the false-alarm rate).
        admission: "robust" or "open", the admission policy while calibrating (module doc).
        drift_window, drift_rate: the drift alarm (None window: no alarm).
        on_drift: "flag" or "rebaseline" (module doc).
        confirm: images (paths) that, when the first of them arrives (recognised by content), are confirmed as
            the new normal (`confirm_normal`).
    """

    def __init__(self, detector: Detector, class_name: str, bank_size: int = 16, references=None,
                 threshold=None, false_alarm_rate: float | None = None, text_gate: float | None | str = "auto",
                 min_references: int = MIN_REFERENCES, min_history: int = MIN_HISTORY, history: int | None = None,
                 rule: str = "robust_z", admission: str = "robust", drift_window: int | None = DRIFT_WINDOW,
                 drift_rate: float = DRIFT_RATE, on_drift: str = "flag", confirm: Sequence | None = None):
        from fiseclip_lib.decisions.calibrate import DEFAULT_FALSE_ALARM_RATE, Threshold

        if int(bank_size) < 1:
            raise FiseclipError(f"bank size {bank_size} must be >= 1 (the number of accepted images kept as "
                                f"references)")
        for name, value, allowed in (("rule", rule, RULES), ("admission", admission, ADMISSIONS),
                                     ("on_drift", on_drift, ON_DRIFT)):
            if value not in allowed:
                raise FiseclipError(f"stream {name} {value!r} is not one of {', '.join(allowed)}")
        if drift_window is not None and (int(drift_window) < 1 or not 0 <= float(drift_rate) < 1):
            raise FiseclipError(f"drift window {drift_window} must be >= 1 and drift rate {drift_rate} in [0, 1)")
        cfg = detector.config
        self.detector, self.class_name = detector, class_name
        self.bank_size = int(bank_size)
        if references is None or isinstance(references, ReferenceBank):
            self.references = references if references is not None else ReferenceBank()
        else:
            self.references = ReferenceBank.from_images(detector, list(references), class_name, filtered=False,
                                                        box_inputs=True)
        if cfg.spec.windows and not len(self.references):
            raise FiseclipError(f"method {cfg.method} in a stream needs known-good references (--reference-dir): "
                                f"without them its first image is scored zero-shot and the next ones few-shot "
                                f"against the rolling bank, two scales that one threshold cannot share")
        if isinstance(threshold, Threshold):
            threshold = threshold.value
        if threshold is not None and not np.isfinite(float(threshold)):
            raise FiseclipError(f"threshold {threshold} must be a finite number")
        self.threshold = None if threshold is None else float(threshold)
        self.false_alarm_rate = DEFAULT_FALSE_ALARM_RATE if false_alarm_rate is None else float(false_alarm_rate)
        self.rule, self.admission, self.on_drift = rule, admission, on_drift
        if history is None:
            history = max(HISTORY, math.ceil(2 / self.false_alarm_rate)) if rule == "conformal" else HISTORY
        if text_gate == "auto":
            text_gate = cfg.filter_theta if (cfg.spec.text_filter and cfg.filter != "none") else None
        self.text_gate = text_gate
        self.min_references, self.min_history = int(min_references), int(min_history)
        if self.bank_size + len(self.references) < self.min_references:
            warnings.warn(f"this stream can never be warm: bank size {self.bank_size} + {len(self.references)} "
                          f"reference(s) < the {self.min_references} references a decision needs, so every image "
                          f"stays undecided; use --bank-size {self.min_references} or more, or give --reference-dir")
        # rolling items: BankEntry, or with tiles / align (`_Frames`) the list of an image's unit entries
        self.rolling: collections.deque = collections.deque(maxlen=self.bank_size)
        self._frames = (_Frames(detector, self.references, class_name)
                        if cfg.tiles is not None or cfg.align != "none" else None)
        self._stack = _Stack(self.references.entries, self.bank_size) if self._frames is None else None
        self._stacks = None if self._frames is None or self._frames.hw is None else self._frames.stacks(self.bank_size)
        self.normal_scores: collections.deque[float] = collections.deque(maxlen=int(history))
        self.drift_window, self.drift_rate = (None if drift_window is None else int(drift_window)), float(drift_rate)
        self.flags: collections.deque[bool] = collections.deque(maxlen=self.drift_window or 1)
        self.recent: collections.deque[BankEntry] = collections.deque(
            maxlen=min(self.bank_size, self.drift_window or 1))  # rebaseline's candidates
        self.in_drift = False
        self.drift_events: list[int] = []  # indices of the images that raised the alarm
        # by content: the arrival of a listed image is recognised whatever path names it
        self.confirm = None if confirm is None else list(confirm)
        self._confirm_digests = set() if confirm is None else {image_hash(p) for p in self.confirm}
        self.seen = 0
        self.seconds = 0.0
        if self.threshold is None:
            # known-good references scored against each other start the online rule (no calibrating phase when
            # there are at least min_history of them)
            self.normal_scores.extend(detector.leave_one_out_scores(self.references, class_name)
                                      if self._frames is None else self._unit_loo_scores())

    @property
    def bank(self) -> ReferenceBank:
        """The references of the next image: the fixed bank, then the rolling bank (oldest first); with tiles or
        align, the rolling images' first units (their paths and hashes name the images)."""
        return ReferenceBank(list(self.references.entries)
                             + [x[0] if isinstance(x, list) else x for x in self.rolling])

    def current_threshold(self) -> float | None:
        """The threshold the next decision uses (None while calibrating)."""
        from fiseclip_lib.decisions.calibrate import conformal_threshold, robust_threshold

        if self.threshold is not None:
            return self.threshold
        n = len(self.normal_scores)
        if n < self.min_history:
            return None
        scores = np.array(self.normal_scores)
        if self.rule == "conformal" and math.ceil((n + 1) * (1 - self.false_alarm_rate)) <= n:
            return conformal_threshold(scores, self.false_alarm_rate)
        return robust_threshold(scores, self.false_alarm_rate)

    def calibrating_bound(self) -> float | None:
        """The score above which a calibrating stream keeps an image out of the bank (policy "robust"; None: no
        bound yet, or policy "open")."""
        if self.admission != "robust" or len(self.normal_scores) < MIN_BOUND_SCORES:
            return None
        med, mad = median_mad(np.array(self.normal_scores))
        return med + CALIBRATING_Z * MAD_TO_SIGMA * mad

    def _entry(self, feats, path, score, digest) -> BankEntry:
        entry = self.detector.reference_entry(feats, self.class_name, filtered=True, path=path, score=score)
        entry.digest = digest
        entry.feats = feats  # for the leave-one-out scores of a reset (confirm_normal, rebaseline)
        return entry

    def _unit_entries(self, units, path, score, digest) -> list[BankEntry]:
        """An image's entries, one per unit (tile), each carrying the image's path and content hash."""
        return [self._entry(f, path, score, digest) for f in units]

    def _admit(self, item) -> None:
        """Into the rolling bank and its stacked tensors (each unit into its stack; `all`: one stack of tiles)."""
        self.rolling.append(item)
        if self._frames is None:
            self._stack.push(item)
        elif self._frames.same:
            for stack, e in zip(self._stacks, item):
                stack.push(e)
        else:
            for e in item:
                self._stacks[0].push(e)

    def _score_units(self, units, digest, shift=None):
        """Score an image's units against their stacks, without any entry of the same content; the map stitched
        and returned to the image's frame. Returns (score, s_T or None, map, reference images, their paths)."""
        det, fr = self.detector, self._frames
        maps, texts, paths, seen = [], [], [], set()
        groups = [([u], s) for u, s in zip(units, self._stacks)] if fr.same else [(list(units), self._stacks[0])]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="no reference image")
            for feats, stack in groups:
                bank = stack.bank(exclude_digest=digest)
                res = det.score_features(concat_features(feats), self.class_name, references=bank, mutual=False)
                maps.extend(res.maps)
                texts.extend([-math.inf] * len(feats) if res.text_scores is None else res.text_scores)
                for e in bank.entries:
                    seen.add(e.digest if e.digest is not None else id(e))
                    paths.append(e.path)
        if fr.grid is None:
            image_map, score = maps[0], float(res.scores[0])
            s_t = None if res.text_scores is None else float(res.text_scores[0])
        else:
            stitched, scores, st = tiling.stitch_scores([maps], fr.boxes, fr.hw, np.array([texts]),
                                                        det.config.beta)
            image_map, score, s_t = stitched[0], float(scores[0]), None if st is None else float(st[0])
        if shift is not None:
            image_map = align.unshift_maps(image_map[None], np.asarray(shift)[None], fr.hw)[0]
        return score, s_t, image_map, len(seen), list(dict.fromkeys(paths))

    def _unit_loo_scores(self, groups=None, digests=None) -> list[float]:
        """Each image's score against the stacks without its own content: the known-good references (default:
        their unit features and hashes) or the images of a reset. Empty when some hash or feature is unknown."""
        if self._stacks is None:
            return []
        if groups is None:
            refs = self.references.entries
            if len(refs) < 2:
                return []
            per_unit = self._frames.fixed
            groups = [[per_unit[t][i].feats for t in range(len(per_unit))] for i in range(len(refs))]
            digests = [e.digest for e in refs]
        out = []
        for feats, d in zip(groups, digests):
            if d is None or any(f is None for f in feats):
                return []
            score, _, _, n_refs, _ = self._score_units(feats, d)
            if n_refs:
                out.append(score)
        return out

    def _reset(self, entries: Sequence[BankEntry]) -> None:
        """The rolling bank := entries (the last K), the score history := their leave-one-out scores."""
        entries = list(entries)[-self.bank_size:]
        self.rolling.clear()
        for s in ([self._stack] if self._frames is None else self._stacks or []):
            s.clear()
        for e in entries:
            self._admit(e)
        self.normal_scores.clear()
        self.flags.clear()
        self.recent.clear()
        self.in_drift = False
        if self._frames is not None:
            self.normal_scores.extend(self._unit_loo_scores([[e.feats for e in g] for g in entries],
                                                            [_digest(g) for g in entries]))
            return
        bank = self._stack.bank()
        n_fixed = len(self.references)
        self.normal_scores.extend(self.detector.leave_one_out_scores(
            bank, self.class_name, indices=range(n_fixed, n_fixed + len(entries))))

    def confirm_normal(self, images: Sequence) -> None:
        """An operator's word that `images` (paths, PIL images or arrays) are the new normal: they become the
        rolling bank (the last `bank_size` of them) and their leave-one-out scores the score history; the fixed
        known-good bank stays. Use it after a lighting or product change (module doc)."""
        images = list(images)
        if not images:
            raise FiseclipError("confirm_normal needs at least one image of the new normal")
        if self._frames is not None:
            self._reset([self._unit_entries(self._frames.encode(im)[0], _path_of(im), None, image_hash(im))
                         for im in images])
            return
        self._reset([self._entry(f, _path_of(im), None, image_hash(im))
                     for im, f in zip(images, self.detector.encode_each(images))])

    def push(self, image, keep_map: bool = False, feats=None) -> StreamResult:
        """Score one image (path, PIL image or array) and update the bank; returns its StreamResult.

        Args:
            image: the image.
            keep_map: attach its anomaly map.
            feats: its Features when already encoded (`run` encodes several per encoder call).
        """
        t0 = time.perf_counter()
        det = self.detector
        path = _path_of(image)
        digest = image_hash(image)
        if digest in self._confirm_digests:
            group, self.confirm, self._confirm_digests = self.confirm, None, set()
            self.confirm_normal(group)
        shift = None
        if self._frames is not None:  # tiles / align: units scored one stack each, the map stitched
            units, shift = self._frames.encode(image)
            if self._stacks is None:
                self._stacks = self._frames.stacks(self.bank_size)
            score, s_t, image_map, n_refs, ref_paths = self._score_units(units, digest, shift)
        else:
            if feats is None:
                feats = det.encode([image])
            bank = self._stack.bank(exclude_digest=digest)  # never a copy of the image itself
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="no reference image")
                res = det.score_features(feats, self.class_name, references=bank, mutual=False)
            score = float(res.scores[0])
            s_t = None if res.text_scores is None else float(res.text_scores[0])
            n_refs, ref_paths, image_map = len(bank), bank.paths, res.maps[0]
        thr = self.current_threshold()
        bound = None
        if n_refs < self.min_references:
            state, decision = "cold", "undecided"
        elif thr is None:
            state, decision = "calibrating", "undecided"
            bound = self.calibrating_bound()
        else:
            state, decision = "warm", ("anomalous" if score > thr else "normal")
        text_ok = self.text_gate is None or s_t is None or s_t < self.text_gate
        admitted = text_ok and decision != "anomalous" and (bound is None or score <= bound)
        entry = None
        if admitted or self.on_drift == "rebaseline":
            entry = (self._entry(feats, path, score, digest) if self._frames is None else
                     self._unit_entries(units, path, score, digest))
        if state == "warm" and self.drift_window:
            self.flags.append(decision == "anomalous")
            if self.on_drift == "rebaseline":
                self.recent.append(entry)
            alarm = len(self.flags) == self.drift_window and np.mean(self.flags) > self.drift_rate
            if alarm:
                state = "drift"
                if not self.in_drift:
                    self.drift_events.append(self.seen)
                    warnings.warn(f"stream drift at image {self.seen} ({path or 'unnamed'}): "
                                  f"{sum(self.flags)} of the last {self.drift_window} images flagged; "
                                  + ("the recent images become the new normal (on_drift=rebaseline)"
                                     if self.on_drift == "rebaseline" else
                                     "still flagging: confirm the new normal (Streamer.confirm_normal, "
                                     "--confirm) if the change is intended"))
                if self.on_drift == "rebaseline":
                    self._reset(list(self.recent))  # this image among them: in the bank now
                    admitted, entry = True, None
                else:
                    self.in_drift = True
            else:
                self.in_drift = False
        if admitted and any(_digest(e) == digest for e in self.rolling):
            entry = None  # already in the bank (a confirmed image arriving): never twice
        if admitted and entry is not None:
            self._admit(entry)
            if state != "cold":
                self.normal_scores.append(score)
        result = StreamResult(index=self.seen, path=path, score=score, decision=decision, state=state,
                              admitted=admitted, references=n_refs, threshold=thr, text_score=s_t,
                              reference_paths=ref_paths, map=image_map if keep_map else None,
                              shift=None if shift is None else (float(shift[0]), float(shift[1])))
        self.seen += 1
        det.costs["images_scored"] += 1
        self.seconds += time.perf_counter() - t0
        return result

    def run(self, images: Iterable, keep_map: bool = False, prefetch: int | None = None) -> Iterator[StreamResult]:
        """push() every image in order, lazily, encoding `prefetch` images per encoder call (default: the
        config's encode_batch; 1: one at a time). Only the encoder is batched: decisions stay sequential."""
        step = max(1, int(prefetch if prefetch is not None else self.detector.config.encode_batch))
        it = iter(images)
        while True:
            chunk = [im for _, im in zip(range(step), it)]
            if not chunk:
                return
            feats = (split_features(self.detector.encode(chunk)) if len(chunk) > 1 and self._frames is None
                     else [None] * len(chunk))
            for im, f in zip(chunk, feats):
                yield self.push(im, keep_map=keep_map, feats=f)


def stream(detector: Detector, images: Sequence, class_name: str, bank_size: int = 16, references=None,
           threshold=None, keep_map: bool = False, prefetch: int | None = None, **kwargs) -> Iterator[StreamResult]:
    """Score images one at a time against a rolling bank (module doc); a generator of StreamResult.

    Args:
        detector: the Detector.
        images: an iterable of paths, PIL images or arrays, in arrival order.
        class_name, bank_size, references, threshold: as `Streamer`; kwargs: its other options (rule,
            admission, drift_window, drift_rate, on_drift, confirm, ...).
        keep_map: attach each anomaly map to its result.
        prefetch: images per encoder call (`Streamer.run`).
    """
    return Streamer(detector, class_name, bank_size, references, threshold, **kwargs).run(
        images, keep_map=keep_map, prefetch=prefetch)


def false_alarm_study(detector: Detector, normal_images: Sequence, class_name: str, bank_size: int = 16,
                      references=None, rules: Sequence[str] = RULES, false_alarm_rate: float | None = None,
                      **kwargs):
    """The false-alarm rate of the online threshold rules on held-out normal images, against their target.

    Each rule streams the same normal images (in order) and counts its warm decisions that say "anomalous":
    every one is a false alarm. The interval is Clopper-Pearson's 95 % for the rate.

    Args:
        detector: the Detector.
        normal_images: images known to be normal (paths, PIL images or arrays), in arrival order; none of them
            among `references`.
        class_name: the object's name for the prompts.
        bank_size, references: as `Streamer`.
        rules: online rules to compare (RULES).
        false_alarm_rate: the target (default calibrate.DEFAULT_FALSE_ALARM_RATE).
        kwargs: other `Streamer` options (min_history, history, ...); drift alarms are off here.
    Returns:
        A DataFrame, one row per rule: rule, target, images, warm (decisions made), false_alarms, rate (nan
        without a warm decision), ci_low, ci_high, within_target (the target inside the interval or above it).
    """
    import pandas as pd
    from scipy.stats import beta

    from fiseclip_lib.decisions.calibrate import DEFAULT_FALSE_ALARM_RATE

    target = DEFAULT_FALSE_ALARM_RATE if false_alarm_rate is None else float(false_alarm_rate)
    if isinstance(references, (list, tuple)):  # encode the known-good images once for all rules
        references = ReferenceBank.from_images(detector, list(references), class_name, filtered=False,
                                               box_inputs=True)
    rows = []
    for rule in rules:
        s = Streamer(detector, class_name, bank_size, references, None, false_alarm_rate=target, rule=rule,
                     drift_window=None, **kwargs)
        res = list(s.run(normal_images))
        warm = [r for r in res if r.state == "warm"]
        n, k = len(warm), sum(r.decision == "anomalous" for r in warm)
        lo = 0.0 if k == 0 else float(beta.ppf(0.025, k, n - k + 1))
        hi = 1.0 if k == n else float(beta.ppf(0.975, k + 1, n - k))
        rows.append({"rule": rule, "target": target, "images": len(res), "warm": n, "false_alarms": k,
                     "rate": k / n if n else float("nan"), "ci_low": lo if n else float("nan"),
                     "ci_high": hi if n else float("nan"), "within_target": bool(n and lo <= target)})
    return pd.DataFrame(rows)
