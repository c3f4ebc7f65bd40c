"""A pool of images of one category scored the way the method scores it: in batches, then RsCIN over the pool.

`score_pool` is what `fiseclip run` does for one category and `fiseclip predict` for a folder: the batches are
formed once here (`make_batches`: the seed, the size and the merge rule; the whole pool for a method that scores
categories as one pool), each batch is scored by `Detector.score` (against the references too, when given), and
RsCIN re-scores the image scores over the whole pool when the config asks for it.
"""
from __future__ import annotations

import random
import warnings
from typing import Sequence

import numpy as np

from fiseclip_lib.core.postprocess import rscin

MIN_LAST_BATCH = 5  # a last partial batch smaller than this is merged into the previous one


def make_batches(items: Sequence, batch_size: int | None, seed: int = 0, shuffle: bool = True,
                 min_last: int = MIN_LAST_BATCH) -> list[list]:
    """Split one category's items into consecutive batches of `batch_size`.

    shuffle=True (default): a fixed-seed shuffle first (MVTec/VisA file order groups one defect type per
    batch, which changes what the references look like); shuffle=False keeps file order.
    The last partial batch is kept, except that one smaller than `min_last` is merged into the previous
    batch (a batch of 1-4 images has too few references to score reliably).
    batch_size <= 0 or None means the whole category as one batch.

    Example:
        >>> [len(b) for b in make_batches(range(37), 16, shuffle=False)]
        [16, 21]
    """
    items = list(items)
    if not items:
        return []
    if batch_size is None or batch_size <= 0 or batch_size >= len(items):
        batch_size = len(items)
    if shuffle:
        random.Random(seed).shuffle(items)
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < min(min_last, batch_size):
        batches[-2].extend(batches.pop())
    return batches


def score_pool(detector, images: Sequence, class_name: str, references=None, dataset: str | None = None,
               progress: bool = True):
    """Score a pool of images of one category batch by batch.

    Args:
        detector: the `Detector`.
        images: paths (or PIL images / arrays) of the pool.
        class_name: the category's name for the prompts.
        references: a `ReferenceBank` of known-good images added to every batch (None: none).
        dataset: picks RsCIN's default k list (MuSc's per dataset).
        progress: show a progress bar.
    Returns:
        (rows [(index into images, score, batch)], maps `[N, S, S]`), both sorted by path.
    """
    cfg = detector.config
    bs = cfg.batch_size_for(len(images))
    if bs > len(images):
        warnings.warn(f"batch size {bs} > {len(images)} images in category {class_name}: scored as one batch")
    batches = make_batches(range(len(images)), bs, seed=cfg.seed, shuffle=cfg.shuffle)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = tqdm(total=len(images), desc=class_name, unit="img", disable=not progress) if tqdm else None
    rows, maps, embs = [], [], []
    for b, batch in enumerate(batches):
        res = detector.score([images[i] for i in batch], class_name, references=references, mutual=True)
        for i, score, m in zip(batch, res.scores, res.maps):
            rows.append((i, float(score), b))
            maps.append(m)
        embs.append(res.embeddings)
        if bar:
            bar.update(len(batch))
    if bar:
        bar.close()
    if cfg.use_rscin:
        new = rscin(np.array([r[1] for r in rows]), np.concatenate(embs), cfg.rscin_ks_for(dataset)).numpy()
        rows = [(i, float(v), b) for (i, _, b), v in zip(rows, new)]
    order = sorted(range(len(rows)), key=lambda k: str(images[rows[k][0]]))
    return [rows[k] for k in order], np.stack([maps[k] for k in order])
