"""References outside the queries: known-good images (a bank) or a stream's rolling bank.

A `ReferenceBank` holds each reference image once, already aggregated (LNAMD per layer and degree) and, when
asked, filtered by its own text map; the scoring core (`Detector.score_features(..., references=bank)`) matches
queries against it. Build one with `ReferenceBank.from_images(detector, images, class_name)` or add entries made
by `Detector.reference_entry`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

import torch

from fiseclip_lib.errors import FiseclipError


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
        for e in entries:
            self.add(e)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def paths(self) -> list[str | None]:
        return [e.path for e in self.entries]

    @classmethod
    def from_images(cls, detector, images: Sequence, class_name: str = "object",
                    filtered: bool = False) -> "ReferenceBank":
        """Encode reference images once (the feature cache is used) and aggregate them.

        Args:
            detector: the `Detector` whose encoder and config score the queries.
            images: paths, PIL images or arrays.
            class_name: the text prompt's class (used only when filtered).
            filtered: apply the method's text filter to these references (False for known-good images).
        Returns:
            The bank (empty when `images` is empty).
        """
        bank = cls(identity=detector.encoder.identity())
        if len(images) == 0:
            return bank
        for i, one in enumerate(detector.encode_each(list(images))):
            path = str(images[i]) if isinstance(images[i], (str, os.PathLike)) else None
            entry = detector.reference_entry(one, class_name, filtered, path)
            entry.feats = one
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

    def leave_one_out_scores(self, detector, class_name: str) -> list[float]:
        """Each reference's score against the others (`Detector.leave_one_out_scores`)."""
        return detector.leave_one_out_scores(self, class_name)

    def without(self, index: int) -> "ReferenceBank":
        """The bank less one entry (leave-one-out)."""
        return ReferenceBank([e for j, e in enumerate(self.entries) if j != index], identity=self.identity)

    def stacked(self):
        """(features {(layer, r): `[R, P, C]`}, keep `[R, P]` or None, penalty `[R, P]` or None); entries without
        a filter keep all of their patches (and have no penalty)."""
        if self._stacked is None:
            self._stacked = stack_entries(self.entries)
        return self._stacked


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
