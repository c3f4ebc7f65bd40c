"""The pipeline: encoder -> restore -> text -> filter -> match -> fuse -> post-process, for one batch.

`Detector(config).score_batch(images, class_name)` scores one batch of unlabeled images of one category;
the images are each other's references. `score_features` does everything after the encoder, so that
sweeps over matching, filtering and fusion options can reuse encoded features.
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

from .cache import FeatureCache, image_hash
from .config import FiseConfig
from .encoder import Encoder, Features, load_encoder
from .errors import FiseclipError
from .filtering import reference_keep
from .fusion import fuse, fuse_text_only
from .matching import visual_map
from .postprocess import gaussian_smooth, image_scores, pool_embedding, upsample
from .text import text_embeddings, text_map, text_score

TEXT_METHODS = ("fiseclip", "fiseclip-nofilter", "text")


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


def concat_features(parts: Sequence[Features]) -> Features:
    """Join encoder outputs of consecutive chunks of one batch."""
    cat = lambda xs: None if xs[0] is None else torch.cat(xs)  # noqa: E731
    return Features(
        layers={l: torch.cat([p.layers[l] for p in parts]) for l in parts[0].layers},
        grid=parts[0].grid,
        global_embedding=cat([p.global_embedding for p in parts]),
        dense=cat([p.dense for p in parts]),
        attention=cat([p.attention for p in parts]),
    )


def split_features(feats: Features) -> list[Features]:
    """A batch of Features -> one Features per image (views, no copies)."""
    n = next(iter(feats.layers.values())).shape[0]
    pick = lambda x, i: None if x is None else x[i:i + 1]  # noqa: E731
    return [Features(layers={l: t[i:i + 1] for l, t in feats.layers.items()}, grid=feats.grid,
                     global_embedding=pick(feats.global_embedding, i), dense=pick(feats.dense, i))
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
        self.encoder = encoder or load_encoder(cfg.model, cfg.weights_tag, cfg.input_size, cfg.device, cfg.precision,
                                               cfg.cache_dir, seed=cfg.seed, quick_gelu=cfg.quick_gelu,
                                               restore_depth=cfg.restore_depth)
        if self.encoder.has_text and self.encoder.restore_depth != cfg.restore_depth:
            self.encoder = self.encoder.with_restore_depth(cfg.restore_depth)  # shares the model; identity follows
        if not self.encoder.has_text and cfg.method != "musc":
            raise FiseclipError(
                f"method {cfg.method!r} needs a text tower; {self.encoder.model_name} has none: use --method musc "
                f"or a CLIP model"
            )
        self.layers = self.encoder.check_layers(cfg.layers)
        sigma = getattr(cfg, "smoothing_sigma", cfg.sigma) or 0.0
        if math.ceil(4 * sigma) >= self.encoder.image_size:
            raise FiseclipError(f"sigma {sigma} px is too large for image size {self.encoder.image_size}: the "
                                f"smoothing window (4 sigma each side) must fit; use sigma < "
                                f"{self.encoder.image_size / 4:g}")

    @property
    def uses_text(self) -> bool:
        return self.config.method in TEXT_METHODS

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
        use_cache = self.cache is not None and not return_attention
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
            feats = self.encoder(self.encoder.preprocess(chunk), layers=self.layers, restore=self.restore,
                                 return_attention=return_attention)
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

    def score_batch(self, images: Sequence, class_name: str) -> BatchResult:
        """Score a batch: each image is referenced by the others. images: PIL images or paths."""
        feats = self.encode(images)
        t0 = time.perf_counter()
        result = self.score_features(feats, class_name)
        self.costs["score_s"] += time.perf_counter() - t0
        self.costs["images_scored"] += len(images)
        return result

    def score_against(self, images: Sequence, class_name: str, references=None, mutual: bool = False) -> BatchResult:
        """Score images against a reference bank (`predict.score_against`): each image against the references
        only (mutual=False, per-image normalisation, what streaming computes) or also against each other."""
        from .predict import score_against

        return score_against(self, images, class_name, references, mutual=mutual)

    def stream(self, images, class_name: str, bank_size: int = 16, references=None, threshold=None, **kwargs):
        """Score images one at a time against a rolling bank of the last `bank_size` accepted images (plus the
        known-good `references`); a generator of `stream.StreamResult`. See `fiseclip_lib/stream.py`."""
        from .stream import stream

        return stream(self, images, class_name, bank_size=bank_size, references=references, threshold=threshold,
                      **kwargs)

    def score_features(self, feats: Features, class_name: str, keep: torch.Tensor | None = None) -> BatchResult:
        """Everything after the encoder. keep: a bool `[N, P]` reference keep-mask that replaces the text filter
        (e.g. an oracle from ground truth, `filtering.oracle_keep`), for studies."""
        cfg = self.config
        n = next(iter(feats.layers.values())).shape[0]
        grid = feats.grid
        notes: list[str] = []
        a_v = ref_keep = None
        a_t, s_t = self.text_branch(feats, class_name)
        match_dtype = torch.bfloat16 if cfg.match_dtype == "bf16" else torch.float32
        if cfg.method == "text":
            patch = a_t
        elif n == 1:
            msg = "batch of one image: no references, " + ("the text map is used alone" if a_t is not None
                                                            else "the map is zero")
            warnings.warn(msg)
            notes.append(msg)
            # the text branch on the fusion's scale, so that the map compares with other batches' fused maps
            patch = (fuse_text_only(a_t, cfg.fusion, cfg.alpha, cfg.gate_tau, cfg.fusion_norm) if a_t is not None
                     else torch.zeros(1, grid[0] * grid[1]))
        else:
            penalty = None
            if keep is not None:
                ref_keep = torch.as_tensor(keep, dtype=torch.bool)
            elif cfg.method == "fiseclip":
                ref_keep, penalty = reference_keep(a_t, cfg.filter, cfg.filter_theta, cfg.filter_ratio,
                                                   cfg.filter_min_keep)
            t0 = time.perf_counter()
            a_v = visual_map(feats.layers, grid, cfg.degrees, keep=ref_keep, penalty=penalty,
                             topmin_max=cfg.topmin_max, dtype=match_dtype).cpu()  # .cpu() waits for a GPU
            self.costs["match_s"] += time.perf_counter() - t0
            patch = a_v if cfg.method == "musc" else fuse(a_v, a_t, cfg.fusion, cfg.alpha, cfg.gate_tau,
                                                          cfg.fusion_norm)
        return self.batch_result(feats, patch, a_v=a_v, a_t=a_t, s_t=s_t, keep=ref_keep, notes=notes)

    def text_branch(self, feats: Features, class_name: str):
        """(A_T `[N, P]`, s_T `[N]`) on the CPU for methods that use text, else (None, None)."""
        if not self.uses_text:
            return None, None
        cfg = self.config
        t = text_embeddings(self.encoder, class_name, cfg.class_names)
        return (text_map(feats.dense, t, cfg.text_temperature).cpu(),
                text_score(feats.global_embedding, t, cfg.text_temperature).cpu())

    def batch_result(self, feats: Features, patch: torch.Tensor, a_v=None, a_t=None, s_t=None, keep=None,
                     notes=None) -> BatchResult:
        """Post-processing of patch scores `[N, P]` into a BatchResult: upsampling to the input size, smoothing,
        image scores (shared by batch scoring and scoring against a reference bank, `predict.py`).
        RsCIN (`cfg.use_rscin`) needs the whole pool: `run.score_category` applies it after the last batch."""
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
