"""Streaming: one image at a time against a rolling bank of the last accepted images.

On a production line images arrive one by one and there is no batch to wait for. `Streamer.push(image)`
scores an image against the references it has at that moment:
  - the fixed reference bank (known-good images, `--reference-dir`; never filtered, never dropped), plus
  - a rolling bank of the last `bank_size` (K) images that were *accepted* (admitted), each filtered by its own
    text map exactly as a batch reference is (`filtering.reference_keep` on that image alone).
The cost per image is one encoder pass, one LNAMD of the image, and matching against at most K + R references:
it does not grow with the number of images seen (each bank image's aggregated features are computed once,
when it enters the bank). Memory: K + R images' features per layer and degree.

Exactness. The streamed score of an image is `Detector.score_against([image], references)` with the references
it was scored against (`StreamResult.reference_paths`): the same function on the same inputs, so the two agree
to float rounding (tests: 1e-6). Normalisation is per image (module doc of `predict.py`), so the score never
depends on the other images of the stream except through the bank.

Admission (what keeps defects out of the bank). An image enters the rolling bank only when both say normal:
  1. the score threshold: `score <= threshold`. The threshold is the one given (a number or a calibrated
     `calibrate.Threshold`), or, without one, the unsupervised rule of `calibrate.robust_threshold` over the
     scores of the last `history` images judged normal (median + z MAD; needs `min_history` of them);
  2. the text (methods with a text branch and `filter` != none): the image's text score s_T (CLIP's
     probability of "abnormal" for the whole image) must be below `text_gate` (default `filter_theta`).
An image judged anomalous never enters, so a run of defects is scored against the normal images before it and
cannot teach the bank that defects are normal. Its patches the text calls abnormal are also never references.

States (`StreamResult.state`):
  cold         fewer than `min_references` (2) references: too few to judge. The score is still finite (against
               the one reference, or the text map alone / zeros without any), the decision is "undecided", and
               the image is admitted on the text's word alone (encoders without text: admitted). Give
               known-good references (`references=`) to start warm and to guard the start.
  calibrating  enough references but no threshold yet (no threshold given and fewer than `min_history`
               normal scores): decision "undecided", admission on the text's word alone. Known-good references
               count: each is scored once against the others at the start (`leave_one_out_scores`), so with
               `min_history` (8) of them the stream is warm from its first image.
  warm         decisions by the threshold; admission by threshold and text.
"""
from __future__ import annotations

import collections
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np

from fiseclip_lib.core.detector import Detector
from fiseclip_lib.core.references import BankEntry, ReferenceBank
from fiseclip_lib.errors import FiseclipError

MIN_REFERENCES = 2
MIN_HISTORY = 8
HISTORY = 64


@dataclass
class StreamResult:
    """One streamed image. score is finite in every state; map is `[S, S]` when asked for (keep_map)."""

    index: int
    path: str | None
    score: float
    decision: str  # normal | anomalous | undecided
    state: str  # cold | calibrating | warm
    admitted: bool
    references: int
    threshold: float | None
    text_score: float | None = None
    reference_paths: list = field(default_factory=list)
    map: np.ndarray | None = None


class Streamer:
    """Scores images one at a time against a rolling bank (module doc).

    Args:
        detector: the Detector (config, encoder, feature cache).
        class_name: the object's name for the prompts.
        bank_size: K, how many accepted images the rolling bank holds (oldest out first).
        references: a ReferenceBank of known-good images, or paths of them (never filtered, never dropped).
        threshold: a number, a `calibrate.Threshold`, or None (the online unsupervised rule).
        false_alarm_rate: target rate of the online rule.
        text_gate: s_T above this keeps an image out of the bank (default: the config's filter_theta for the
            method fiseclip; None for no text gate).
        min_references: below this many references the state is cold.
        min_history, history: the online rule needs min_history normal scores and uses the last `history`.
    """

    def __init__(self, detector: Detector, class_name: str, bank_size: int = 16, references=None,
                 threshold=None, false_alarm_rate: float | None = None, text_gate: float | None | str = "auto",
                 min_references: int = MIN_REFERENCES, min_history: int = MIN_HISTORY, history: int = HISTORY):
        from fiseclip_lib.decisions.calibrate import DEFAULT_FALSE_ALARM_RATE, Threshold

        if int(bank_size) < 1:
            raise FiseclipError(f"bank size {bank_size} must be >= 1 (the number of accepted images kept as "
                                f"references)")
        cfg = detector.config
        self.detector, self.class_name = detector, class_name
        self.bank_size = int(bank_size)
        if references is None or isinstance(references, ReferenceBank):
            self.references = references if references is not None else ReferenceBank()
        else:
            self.references = ReferenceBank.from_images(detector, list(references), class_name, filtered=False)
        if isinstance(threshold, Threshold):
            threshold = threshold.value
        if threshold is not None and not np.isfinite(float(threshold)):
            raise FiseclipError(f"threshold {threshold} must be a finite number")
        self.threshold = None if threshold is None else float(threshold)
        self.false_alarm_rate = DEFAULT_FALSE_ALARM_RATE if false_alarm_rate is None else float(false_alarm_rate)
        if text_gate == "auto":
            text_gate = cfg.filter_theta if (cfg.spec.text_filter and cfg.filter != "none") else None
        self.text_gate = text_gate
        self.min_references, self.min_history = int(min_references), int(min_history)
        self.rolling: collections.deque[BankEntry] = collections.deque(maxlen=self.bank_size)
        self.normal_scores: collections.deque[float] = collections.deque(maxlen=int(history))
        self.seen = 0
        self.seconds = 0.0
        if self.threshold is None:
            # known-good references scored against each other start the online rule (no calibrating phase when
            # there are at least min_history of them)
            self.normal_scores.extend(detector.leave_one_out_scores(self.references, class_name))

    @property
    def bank(self) -> ReferenceBank:
        """The references of the next image: the fixed bank, then the rolling bank (oldest first)."""
        return ReferenceBank(list(self.references.entries) + list(self.rolling))

    def current_threshold(self) -> float | None:
        """The threshold the next decision uses (None while calibrating)."""
        from fiseclip_lib.decisions.calibrate import robust_threshold

        if self.threshold is not None:
            return self.threshold
        if len(self.normal_scores) < self.min_history:
            return None
        return robust_threshold(np.array(self.normal_scores), self.false_alarm_rate)

    def push(self, image, keep_map: bool = False) -> StreamResult:
        """Score one image (path, PIL image or array) and update the bank; returns its StreamResult."""
        t0 = time.perf_counter()
        det = self.detector
        feats = det.encode([image])
        bank = self.bank
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="no reference image")
            res = det.score_features(feats, self.class_name, references=bank, mutual=False)
        score = float(res.scores[0])
        s_t = None if res.text_scores is None else float(res.text_scores[0])
        n_refs = len(bank)
        thr = self.current_threshold()
        if n_refs < self.min_references:
            state, decision = "cold", "undecided"
        elif thr is None:
            state, decision = "calibrating", "undecided"
        else:
            state, decision = "warm", ("anomalous" if score > thr else "normal")
        text_ok = self.text_gate is None or s_t is None or s_t < self.text_gate
        admitted = text_ok and decision != "anomalous"
        path = str(image) if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__") else None
        if admitted:
            self.rolling.append(det.reference_entry(feats, self.class_name, filtered=True, path=path, score=score))
            if state != "cold":
                self.normal_scores.append(score)
        result = StreamResult(index=self.seen, path=path, score=score, decision=decision, state=state,
                              admitted=admitted, references=n_refs, threshold=thr, text_score=s_t,
                              reference_paths=bank.paths, map=res.maps[0] if keep_map else None)
        self.seen += 1
        det.costs["images_scored"] += 1
        self.seconds += time.perf_counter() - t0
        return result

    def run(self, images: Iterable, keep_map: bool = False) -> Iterator[StreamResult]:
        """push() every image in order, lazily."""
        for im in images:
            yield self.push(im, keep_map=keep_map)


def stream(detector: Detector, images: Sequence, class_name: str, bank_size: int = 16, references=None,
           threshold=None, keep_map: bool = False, **kwargs) -> Iterator[StreamResult]:
    """Score images one at a time against a rolling bank (module doc); a generator of StreamResult.

    Args:
        detector: the Detector.
        images: an iterable of paths, PIL images or arrays, in arrival order.
        class_name, bank_size, references, threshold: as `Streamer`; kwargs: its other options.
        keep_map: attach each anomaly map to its result.
    """
    return Streamer(detector, class_name, bank_size, references, threshold, **kwargs).run(images, keep_map=keep_map)
