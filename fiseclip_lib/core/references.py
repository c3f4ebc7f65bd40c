"""References outside the queries: known-good images (a bank) or a stream's rolling bank.

A `ReferenceBank` holds each reference image once, already aggregated (LNAMD per layer and degree) and, when
asked, filtered by its own text map; the scoring core (`Detector.score_features(..., references=bank)`) matches
queries against it. Build one with `ReferenceBank.from_images(detector, images, class_name)` or add entries made
by `Detector.reference_entry`.

A reference is never the image it judges: `from_images` records each image's content hash (`BankEntry.digest`,
the feature cache's `image_hash`), and `core.pool.score_pool` leaves out, per batch, any reference with the
content of a query (a copy, a hard link, a symlink, the same file under another name), with a warning.
`ReferenceBank.audit` checks that the references themselves look alike (leave-one-out scores, robust z), so
that a defective "known-good" image is named before it hides the same defect in the queries.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from fiseclip_lib.core.robust import MAD_TO_SIGMA, median_mad
from fiseclip_lib.errors import FiseclipError
from fiseclip_lib.plumbing.cache import image_hash

AUDIT_Z = 3.5  # robust z above which a reference is suspect (Iglewicz & Hoaglin's outlier bound)
AUDIT_MIN = 6  # fewer references give no usable median and MAD of their leave-one-out scores
# The z scale is at least this share of the median score: in a small bank a few normal scores often agree to the
# third digit (MAD near 0) and any other normal image then looks like an outlier (measured: docs/decisions.md).
AUDIT_REL_SCALE = 0.1


@dataclass
class BankEntry:
    """One reference image: its aggregated features per (layer, degree), filter and provenance.

    features: {(layer, r): `[1, P, C]`}; keep: bool `[1, P]` or None (all patches); penalty: `[1, P]` or None;
    grid: (h, w) of its patches (None: a square grid is inferred from P).
    """

    features: dict
    keep: torch.Tensor | None = None
    penalty: torch.Tensor | None = None
    path: str | None = None
    score: float | None = None
    feats: object = None  # the image's Features (kept for known-good references: their leave-one-out scores)
    grid: tuple[int, int] | None = None
    digest: str | None = None  # content hash of the image (plumbing.cache.image_hash); None: unknown
    # the box engines' route (core.matching._box_cross_distances): {layer: `[1, P, C]`} layer-normed tokens and
    # {(layer, r): `[1, P]`} their window norms; None: that route is not taken for a bank holding this entry
    tokens: dict | None = None
    norms: dict | None = None
    unit: dict | None = None  # {(layer, r): features finite and unit rows}, checked once (matching.checked_unit)

    def patch_grid(self) -> tuple[int, int]:
        if self.grid is not None:
            return tuple(self.grid)
        if not self.features:
            raise FiseclipError(f"reference {self.path or '(unnamed)'} has no features")
        p = next(iter(self.features.values())).shape[1]
        side = math.isqrt(p)
        if side * side != p:
            raise FiseclipError(f"reference {self.path or '(unnamed)'} has {p} patches, not a square grid: give "
                                f"BankEntry(grid=(h, w))")
        return side, side


class ReferenceBank:
    """A set of reference images (module doc); `len(bank)` is the number of images."""

    def __init__(self, entries: Sequence[BankEntry] = (), grid: tuple[int, int] | None = None,
                 identity: dict | None = None):
        self.entries: list[BankEntry] = []
        self.grid = grid
        self.identity = identity
        self._stacked = None
        self._stacked_tokens = None
        for e in entries:
            self.add(e)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def paths(self) -> list[str | None]:
        return [e.path for e in self.entries]

    @classmethod
    def from_images(cls, detector, images: Sequence, class_name: str = "object",
                    filtered: bool = False, box_inputs: bool = False) -> "ReferenceBank":
        """Encode reference images once (the feature cache is used) and aggregate them.

        Args:
            detector: the `Detector` whose encoder and config score the queries.
            images: paths, PIL images or arrays.
            class_name: the text prompt's class (used only when filtered).
            filtered: apply the method's text filter to these references (False for known-good images).
            box_inputs: keep the layer-normed tokens too (`BankEntry.tokens`): the box engines then match the
                bank with one GEMM per layer (a `Streamer` given reference paths does this; its rolling entries
                always carry them); scores equal up to rounding (~1e-6), not bit for bit, those of entries without.
        Returns:
            The bank (empty when `images` is empty).
        """
        bank = cls(identity=detector.encoder.identity())
        if len(images) == 0:
            return bank
        for i, one in enumerate(detector.encode_each(list(images))):
            path = str(images[i]) if isinstance(images[i], (str, os.PathLike)) else None
            entry = detector.reference_entry(one, class_name, filtered, path, box_inputs=box_inputs)
            entry.feats = one
            entry.digest = image_hash(images[i])
            bank.add(entry)
        return bank

    def add(self, entry: BankEntry) -> None:
        grid = entry.patch_grid()
        if self.grid is not None and tuple(grid) != tuple(self.grid):
            raise FiseclipError(f"reference image {entry.path or ''} has a {grid} patch grid, the bank {self.grid}: "
                                f"encode references with the same encoder and image size")
        self.grid = tuple(grid)
        self.entries.append(entry)
        self._stacked = None
        self._stacked_tokens = None

    def leave_one_out_scores(self, detector, class_name: str) -> list[float]:
        """Each reference's score against the others (`Detector.leave_one_out_scores`)."""
        return detector.leave_one_out_scores(self, class_name)

    def audit(self, detector, class_name: str, z_bound: float = AUDIT_Z) -> list[dict]:
        """Flag references that do not look like the others: a cheap check of a "known-good" bank before use.

        Each reference is scored against the others (`leave_one_out_scores`); a defective reference keeps its
        defect's patches unmatched and scores high. Its robust z, (score - median) / (1.4826 MAD) over the
        bank's leave-one-out scores, above `z_bound` marks it suspect (one-sided: only high scores are defects).
        The scale is at least AUDIT_REL_SCALE * |median| (small banks: module constants). Large defects are
        found; small ones (a thin scratch, a spot) often are not (docs/decisions.md).

        Args:
            detector: the `Detector` that will score the queries.
            class_name: the text prompt's class.
            z_bound: the robust z above which a reference is suspect.
        Returns:
            One dict per reference in bank order: path, score, z, suspect (bool). Empty when the bank has fewer
            than AUDIT_MIN references or lacks their features (hand-built entries): nothing to compare with.
        """
        if len(self) < AUDIT_MIN:
            return []
        scores = np.asarray(self.leave_one_out_scores(detector, class_name), dtype=np.float64)
        if scores.size == 0:
            return []
        med, mad = median_mad(scores)
        scale = max(MAD_TO_SIGMA * mad, AUDIT_REL_SCALE * abs(med), np.finfo(np.float64).tiny)
        z = (scores - med) / scale
        return [{"path": e.path, "score": float(s), "z": float(zi), "suspect": bool(zi > z_bound)}
                for e, s, zi in zip(self.entries, scores, z)]

    def without(self, index: int) -> "ReferenceBank":
        """The bank less one entry (leave-one-out)."""
        return ReferenceBank([e for j, e in enumerate(self.entries) if j != index], identity=self.identity)

    def stacked(self):
        """(features {(layer, r): `[R, P, C]`}, keep `[R, P]` or None, penalty `[R, P]` or None); entries without
        a filter keep all of their patches (and have no penalty)."""
        if self._stacked is None:
            self._stacked = stack_entries(self.entries)
        return self._stacked

    def unit_flags(self) -> dict | None:
        """{(layer, r): every entry's features checked finite and unit} (`cross_distances`' ref_unit: no per-query
        check), or None when some entry was not checked (hand-built) or is not finite."""
        if not self.entries or any(e.unit is None or None in e.unit.values() for e in self.entries):
            return None
        return {k: all(e.unit[k] for e in self.entries) for k in self.entries[0].unit}

    def stacked_tokens(self):
        """(tokens {layer: `[R, P, C]`}, norms {(layer, r): `[R, P]`}) of the box engines' route, stacked once and
        checked once (finite); (None, None) when some entry lacks them (hand-built entries)."""
        if self._stacked_tokens is None:
            self._stacked_tokens = stack_tokens(self.entries)
        return self._stacked_tokens


def stack_tokens(entries: Sequence[BankEntry]):
    """Entries -> (tokens {layer: `[R, P, C]`}, norms {(layer, r): `[R, P]`}), or (None, None) when some entry has
    none; non-finite tokens are an error here, once, instead of at every query."""
    if not entries or any(e.tokens is None or e.norms is None for e in entries):
        return None, None
    tokens = {l: torch.cat([e.tokens[l] for e in entries]) for l in entries[0].tokens}
    norms = {k: torch.cat([e.norms[k] for e in entries]) for k in entries[0].norms}
    if not all(bool(torch.isfinite(t).all()) for t in tokens.values()):
        check_finite_tokens(entries)
    return tokens, norms


def check_finite_tokens(entries: Sequence[BankEntry]) -> None:
    """Non-finite layer-normed tokens are an error naming the images (checked when entries are stacked, once,
    not at every query)."""
    bad = [e.path or f"reference #{i}" for i, e in enumerate(entries)
           if any(not bool(torch.isfinite(t).all()) for t in e.tokens.values())]
    if bad:
        raise FiseclipError(f"reference features contain NaN or inf ({', '.join(bad)}); check those images and "
                            f"the encoder precision")


def stack_entries(entries: Sequence[BankEntry]):
    """Entries -> (features {(l, r): `[R, P, C]`}, keep or None, penalty or None)."""
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
