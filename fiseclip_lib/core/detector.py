"""The one scoring path: encoded queries against their references -> maps and image scores.

`Detector(config).score(images, class_name, references=None, mutual=True)` is the method, read in one place
(`score_features`): the text branch, the text filter of the references, matching, fusion and post-processing,
with the branches and defaults chosen by the config's method spec (methods.py). Every product feature calls it:
  batch referencing    each query against the other queries         score(images)             = score_batch
  reference bank       each query against the bank (and each other) score(images, bank, mutual=...)
  streaming            one query against a rolling bank             score([image], bank, mutual=False)
  a whole category     batches of it, then RsCIN over the pool      core/pool.py: score_pool
Normalisation rule of the fusion: the images scored together form one group when they reference each other
(mutual), else each query is its own group, so its score depends only on itself and its references.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fiseclip_lib.config import FiseConfig
from fiseclip_lib.core import tiling
from fiseclip_lib.core.align import score_aligned
from fiseclip_lib.core.filtering import reference_keep
from fiseclip_lib.core.fusion import fuse, fuse_text_only
from fiseclip_lib.core.matching import checked_unit, match, reference_features
from fiseclip_lib.core.postprocess import gaussian_smooth, image_scores, pool_embedding, upsample
from fiseclip_lib.core.references import BankEntry, ReferenceBank
from fiseclip_lib.core.text import class_phrase, text_embeddings, text_map, text_score
from fiseclip_lib.core.winclip import upsample as winclip_upsample, winclip_batch
from fiseclip_lib.encoder import Encoder, load_encoder
from fiseclip_lib.encoder.windows import window_embeddings
from fiseclip_lib.errors import FiseclipError
from fiseclip_lib.features import Features
from fiseclip_lib.methods import METHODS
from fiseclip_lib.plumbing.cache import FeatureCache, image_hash


@dataclass
class BatchResult:
    """Scores of one batch. Maps are at the input size; patch-level intermediates are `[N, h, w]`."""

    maps: np.ndarray  # [N, H, W] final anomaly maps
    scores: np.ndarray  # [N] image scores
    grid: tuple[int, int]
    method: str
    visual_map: np.ndarray | None = None  # A_V, raw mutual scores
    text_map: np.ndarray | None = None  # A_T, probability of 'abnormal'
    keep: np.ndarray | None = None  # reference patches the text filter kept
    text_scores: np.ndarray | None = None  # s_T per image
    embeddings: np.ndarray | None = None  # [N, D] class embeddings for RsCIN over a pool (postprocess.rscin)
    notes: list[str] = field(default_factory=list)
    shifts: np.ndarray | None = None  # [N, 2] (dy, dx) px that registered each image (align=translation; core/align.py)


def concat_features(parts: Sequence[Features]) -> Features:
    """Join encoder outputs of consecutive chunks of one batch."""
    cat = lambda xs: None if xs[0] is None else torch.cat(xs)  # noqa: E731
    return Features(
        layers={l: torch.cat([p.layers[l] for p in parts]) for l in parts[0].layers},
        grid=parts[0].grid,
        global_embedding=cat([p.global_embedding for p in parts]),
        dense=cat([p.dense for p in parts]),
        attention=cat([p.attention for p in parts]),
        windows=None if parts[0].windows is None else {s: torch.cat([p.windows[s] for p in parts])
                                                       for s in parts[0].windows},
    )


def split_features(feats: Features) -> list[Features]:
    """A batch of Features -> one Features per image (views, no copies)."""
    n = next(iter(feats.layers.values())).shape[0]
    pick = lambda x, i: None if x is None else x[i:i + 1]  # noqa: E731
    return [Features(layers={l: t[i:i + 1] for l, t in feats.layers.items()}, grid=feats.grid,
                     global_embedding=pick(feats.global_embedding, i), dense=pick(feats.dense, i),
                     windows=None if feats.windows is None else {s: t[i:i + 1] for s, t in feats.windows.items()})
            for i in range(n)]


class Detector:
    """Zero-shot anomaly detector for batches of one category (FiSeCLIP and the baselines of the harness)."""

    def __init__(self, config: FiseConfig | None = None, encoder: Encoder | None = None,
                 cache: FeatureCache | None = None):
        self.config = (config or FiseConfig()).validate()
        self.cache = cache
        # Seconds spent in the encoder (images actually encoded, cache misses) and after it (text, filter,
        # matching, fusion, post-processing), so that reports can state both per image.
        self.costs = {"encode_s": 0.0, "images_encoded": 0, "score_s": 0.0, "match_s": 0.0, "images_scored": 0}
        cfg = self.config
        self.encoder = encoder or load_encoder(**cfg.encoder_args())
        if encoder is not None and cfg.image_size is not None and encoder.image_size != cfg.input_size:
            raise FiseclipError(f"the encoder given takes {encoder.image_size} px images but the config says image_size "
                                f"{cfg.input_size}; load the encoder at that size or set image_size={encoder.image_size}")
        if self.encoder.has_text and self.encoder.restore_depth != cfg.restore_depth:
            self.encoder = self.encoder.with_restore_depth(cfg.restore_depth)  # shares the model; identity follows
        if not self.encoder.has_text and cfg.spec.text:
            raise FiseclipError(
                f"method {cfg.method!r} needs a text tower; {self.encoder.model_name} has none: use --method "
                f"{' or '.join(m for m, spec in METHODS.items() if not spec.text)} "
                f"or a CLIP model"
            )
        self.layers = self.encoder.check_layers(cfg.layers)
        sigma = cfg.smoothing_sigma
        if math.ceil(4 * sigma) >= self.encoder.image_size:
            raise FiseclipError(f"sigma {sigma} px is too large for image size {self.encoder.image_size}: the "
                                f"smoothing window (4 sigma each side) must fit; use sigma < "
                                f"{self.encoder.image_size / 4:g}")

    @property
    def uses_text(self) -> bool:
        return self.config.spec.text

    @property
    def restore(self) -> str | None:
        return self.config.restore if self.uses_text else None

    def encode(self, images: Sequence, return_attention: bool = False) -> Features:
        """Images (PIL, arrays or paths) -> Features, `encode_batch` images through the encoder at a time.

        With a feature cache, images encoded before (same encoder, weights, size, layers, restoration and
        image content) are read from disk instead; attention maps are never cached.
        """
        if len(images) == 0:
            raise FiseclipError("an empty batch cannot be scored")
        # the feature cache holds no window embeddings (WinCLIP): those methods encode every time
        use_cache = self.cache is not None and not return_attention and not self.config.spec.windows
        per_image: list = [None] * len(images)
        keys = []
        if use_cache:
            ident = self.encoder.identity()
            keys = [self.cache.key(ident, self.layers, self.restore, image_hash(im)) for im in images]
            per_image = [None if f is None else f.to(self.encoder.device)
                         for f in (self.cache.get(k, self.layers) for k in keys)]
        todo = [i for i, f in enumerate(per_image) if f is None]
        parts = []
        step = self.config.encode_batch
        for s in range(0, len(todo), step):
            idx = todo[s:s + step]
            chunk = [images[i] for i in idx]
            t0 = time.perf_counter()
            pixels = self.encoder.preprocess(chunk)
            feats = self.encoder(pixels, layers=self.layers, restore=self.restore, return_attention=return_attention)
            if self.config.spec.windows:
                feats.windows = window_embeddings(self.encoder, pixels, self.config.spec.windows)
            self.costs["encode_s"] += time.perf_counter() - t0
            self.costs["images_encoded"] += len(chunk)
            tensors = list(feats.layers.values()) + [t for t in (feats.dense, feats.global_embedding) if t is not None]
            bad = [i for n, i in enumerate(idx) if not all(torch.isfinite(t[n]).all() for t in tensors)]
            if bad:
                names = [str(images[i]) if isinstance(images[i], (str, Path)) else f"#{i}" for i in bad]
                raise FiseclipError(f"NaN or inf in the encoder's features of {', '.join(names[:3])}: "
                                    f"{self._nan_cause()}")
            if return_attention:
                parts.append(feats)
                continue
            for n, (i, piece) in enumerate(zip(idx, split_features(feats))):
                per_image[i] = piece
                if use_cache:
                    self.cache.put(keys[i], feats, n)
        if return_attention:
            return concat_features(parts)
        return concat_features(per_image)

    def _nan_cause(self) -> str:
        """The likely cause of non-finite features, for the error message (checked, not guessed)."""
        enc = self.encoder
        if enc.model is not None and any(not torch.isfinite(p).all() for p in enc.model.parameters()):
            return f"the weights ({enc.weights}) contain NaN or inf; use other weights"
        if enc.precision != "fp32":
            return f"precision {enc.precision} overflowed; use --set precision=fp32"
        return "the weights and inputs look finite; check these images (e.g. open them) and the weights file"

    def encode_each(self, images: Sequence) -> list[Features]:
        """One Features per image (views of one encoded batch)."""
        return split_features(self.encode(images))

    def score(self, images: Sequence, class_name: str, references: ReferenceBank | None = None,
              mutual: bool = True) -> BatchResult:
        """Encode images (PIL, arrays or paths) and score them (`score_features`): registered first with `align`
        (`core.align`: maps returned in each image's frame), cut into tiles with `tiles` (`core.tiling`: maps at
        the original size), whole otherwise."""
        if self.config.align != "none":
            return score_aligned(self, images, class_name, references=references, mutual=mutual)
        return self.score_registered(images, class_name, references=references, mutual=mutual)

    def score_registered(self, images: Sequence, class_name: str, references: ReferenceBank | None = None,
                         mutual: bool = True) -> BatchResult:
        """`score` after alignment: tile by tile when `tiles` gives more than one tile for these images."""
        cfg = self.config
        if cfg.tiles is not None:
            arrays = [tiling.as_array(im) for im in images]
            grid = tiling.resolve_grid(cfg.tiles, tiling.common_size(arrays, images), self.encoder.image_size,
                                       cfg.tile_overlap, tuple(self.encoder.grid))
            if grid is not None:
                return tiling.score_tiled(self, arrays, class_name, grid, references=references, mutual=mutual)
        return self.score_untiled(images, class_name, references=references, mutual=mutual)

    def score_untiled(self, images: Sequence, class_name: str, references: ReferenceBank | None = None,
                      mutual: bool = True) -> BatchResult:
        """Encode whole images (or tiles) at the input size and score them (`score_features`)."""
        feats = self.encode(images)
        t0 = time.perf_counter()
        result = self.score_features(feats, class_name, references=references, mutual=mutual)
        self.costs["score_s"] += time.perf_counter() - t0
        self.costs["images_scored"] += len(images)
        return result

    def score_batch(self, images: Sequence, class_name: str) -> BatchResult:
        """Score a batch: each image is referenced by the others."""
        return self.score(images, class_name)

    def score_against(self, images: Sequence, class_name: str, references: ReferenceBank | None = None,
                      mutual: bool = False) -> BatchResult:
        """Score images against a reference bank: each image against the references only (mutual=False,
        per-image normalisation, what streaming computes) or also against each other (mutual=True)."""
        return self.score(images, class_name, references=references, mutual=mutual)

    def score_features(self, feats: Features, class_name: str, keep: torch.Tensor | None = None,
                       references: ReferenceBank | None = None, mutual: bool = True) -> BatchResult:
        """Everything after the encoder: the method's decision tree, once.

        Args:
            feats: Features of the N query images.
            class_name: the category's name for the prompts.
            keep: a bool `[N, P]` keep-mask of the queries as each other's references that replaces the text
                filter (e.g. an oracle from ground truth, `filtering.oracle_keep`), for studies.
            references: external references (a `ReferenceBank`; None or empty: none).
            mutual: the queries reference each other (a batch, with or without a bank; fused over the batch) or
                not (each query against the references alone; fused per image).
        Returns:
            A BatchResult; `keep` is the queries' own filter as references (mutual only).
        """
        cfg, spec = self.config, self.config.spec
        n = next(iter(feats.layers.values())).shape[0]
        grid = tuple(feats.grid)
        bank = references if references is not None else ReferenceBank()
        if len(bank) and tuple(bank.grid) != grid:
            raise FiseclipError(f"references have a {tuple(bank.grid)} patch grid, the images {grid}: use one encoder "
                                f"and image size for both")
        notes: list[str] = []
        if spec.windows:  # WinCLIP (core/winclip.py): zero-shot, or few-shot against the bank only
            patch, scores = winclip_batch(self.encoder, feats, class_phrase(class_name, cfg.class_names),
                                          [e.feats for e in bank.entries])
            maps = gaussian_smooth(winclip_upsample(patch, self.encoder.image_size), cfg.smoothing_sigma)
            return BatchResult(maps=maps.numpy().astype(np.float32), scores=scores.numpy().astype(np.float64),
                               grid=grid, method=cfg.method, notes=notes,
                               embeddings=pool_embedding(feats).cpu().numpy())
        a_v = q_keep = None
        a_t, s_t = self.text_branch(feats, class_name)
        n_refs = len(bank) + (n - 1 if mutual else 0)
        groups = [slice(0, n)] if mutual else [slice(i, i + 1) for i in range(n)]  # images fused together

        def per_group(fn, *xs):
            return torch.cat([fn(*(x[g] for x in xs)) for g in groups])

        if not spec.visual:
            patch = a_t
        elif n_refs == 0:
            msg = (("batch of one image: no references, " if mutual and n == 1 else "no reference image: ")
                   + ("the text map is used alone" if a_t is not None else "the map is zero"))
            warnings.warn(msg)
            notes.append(msg)
            # the text branch on the fusion's scale, so that the map compares with other batches' fused maps
            patch = (per_group(lambda t_: fuse_text_only(t_, cfg.fusion, cfg.alpha, cfg.gate_tau, cfg.fusion_norm),
                               a_t) if a_t is not None else torch.zeros(n, grid[0] * grid[1]))
        else:
            q_pen = None
            if keep is not None:
                q_keep = torch.as_tensor(keep, dtype=torch.bool)
            elif mutual and n > 1 and spec.text_filter:
                q_keep, q_pen = reference_keep(a_t, cfg.filter, cfg.filter_theta, cfg.filter_ratio,
                                               cfg.filter_min_keep)
            refs, r_keep, r_pen = bank.stacked()
            r_tokens, r_norms = bank.stacked_tokens() if len(bank) else (None, None)
            t0 = time.perf_counter()
            a_v = match(feats.layers, grid, cfg.degrees, references=refs, mutual=mutual, keep=q_keep, penalty=q_pen,
                        ref_keep=r_keep, ref_penalty=r_pen, topmin_max=cfg.topmin_max, dtype=self.match_dtype,
                        engine=cfg.match_engine, ref_tokens=r_tokens, ref_norms=r_norms,
                        ref_unit=bank.unit_flags() if len(bank) else None, window=cfg.match_window)
            self.costs["match_s"] += time.perf_counter() - t0
            patch = a_v if not spec.text else per_group(
                lambda v, t_: fuse(v, t_, cfg.fusion, cfg.alpha, cfg.gate_tau, cfg.fusion_norm), a_v, a_t)
        return self.batch_result(feats, patch, a_v=a_v, a_t=a_t, s_t=s_t, keep=q_keep, notes=notes)

    @property
    def match_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.config.match_dtype == "bf16" else torch.float32

    def reference_entry(self, feats: Features, class_name: str, filtered: bool, path: str | None = None,
                        score: float | None = None, box_inputs: bool = True) -> BankEntry:
        """A bank entry from the Features of one image: LNAMD per (layer, degree), and the method's text filter
        when `filtered` (a stream's admitted images; known-good references are not filtered); with `box_inputs`
        also the layer-normed tokens and window norms that the box engines match (`BankEntry.tokens`, `norms`)."""
        cfg = self.config
        keep = penalty = None
        if filtered and cfg.spec.text_filter and feats.dense is not None:
            a_t = text_map(feats.dense, self.text_embedding(class_name), cfg.text_temperature).cpu()
            keep, penalty = reference_keep(a_t, cfg.filter, cfg.filter_theta, cfg.filter_ratio, cfg.filter_min_keep)
        z, tokens, norms = {}, {}, {}
        for l, t in feats.layers.items():  # the box engines match the layer-normed tokens (one GEMM per layer)
            agg, tokens[l], n_ = reference_features(t, feats.grid, cfg.degrees)
            tokens[l] = tokens[l].cpu()
            z.update({(l, r): agg[r].cpu() for r in cfg.degrees})
            norms.update({(l, r): n_[r].cpu() for r in cfg.degrees})
        return BankEntry(features=z, keep=keep, penalty=penalty, path=path, score=score, grid=tuple(feats.grid),
                         tokens=tokens if box_inputs else None, norms=norms if box_inputs else None,
                         unit={k: checked_unit(v) for k, v in z.items()})  # checked once, not per query

    def leave_one_out_scores(self, bank: ReferenceBank, class_name: str, indices=None) -> list[float]:
        """Each reference's score against the other references (per-image normalisation, as streaming scores):
        the scores of known-good images, from which the unsupervised threshold rule can start.

        Args:
            bank: the references (their entries need `feats`); class_name: the prompts' class.
            indices: the entries to score (default: all), each against all the others.
        Returns:
            One score per scored entry; empty when the bank has fewer than 2 entries or one of them lacks feats.
        """
        indices = range(len(bank)) if indices is None else list(indices)
        if len(bank) < 2 or any(bank.entries[i].feats is None for i in indices):
            return []
        return [float(self.score_features(bank.entries[i].feats, class_name, references=bank.without(i),
                                          mutual=False).scores[0]) for i in indices]

    def text_embedding(self, class_name: str) -> torch.Tensor:
        """t_n, t_a `[2, D]` for a category (`text.text_embeddings`: memoised on the encoder, cached on disk)."""
        return text_embeddings(self.encoder, class_name, self.config.class_names)

    def text_branch(self, feats: Features, class_name: str):
        """(A_T `[N, P]`, s_T `[N]`) on the CPU for methods that use text, else (None, None)."""
        if not self.uses_text:
            return None, None
        cfg = self.config
        t = self.text_embedding(class_name)
        return (text_map(feats.dense, t, cfg.text_temperature).cpu(),
                text_score(feats.global_embedding, t, cfg.text_temperature).cpu())

    def batch_result(self, feats: Features, patch: torch.Tensor, a_v=None, a_t=None, s_t=None, keep=None,
                     notes=None) -> BatchResult:
        """Post-processing of patch scores `[N, P]` into a BatchResult: upsampling to the input size, smoothing,
        image scores (shared by batch scoring and scoring against a reference bank, `predict.py`).
        RsCIN (`cfg.use_rscin`) needs the whole pool: `pool.score_pool` applies it after the last batch."""
        cfg, grid, n = self.config, feats.grid, patch.shape[0]
        maps = gaussian_smooth(upsample(patch, grid, self.encoder.image_size), cfg.smoothing_sigma)
        scores = image_scores(maps, s_t, cfg.beta)

        def grid_np(x):
            return None if x is None else x.reshape(n, *grid).float().numpy()

        return BatchResult(
            maps=maps.numpy().astype(np.float32), scores=scores.numpy().astype(np.float64), grid=grid,
            method=cfg.method, visual_map=grid_np(a_v), text_map=grid_np(a_t),
            keep=None if keep is None else torch.as_tensor(keep).reshape(n, *grid).numpy(),
            text_scores=None if s_t is None else s_t.numpy(), notes=list(notes or []),
            embeddings=pool_embedding(feats).cpu().numpy(),
        )
