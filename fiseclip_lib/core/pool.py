"""A pool of images of one category scored the way the method scores it: in batches, then RsCIN over the pool.

`score_pool` is what `fiseclip run` does for one category and `fiseclip predict` for a folder: the batches are
formed once here (`make_batches`: the seed, the size and the merge rule; the whole pool for a method that scores
categories as one pool), each batch is scored by `Detector.score` (against the references too, when given), and
RsCIN re-scores the image scores over the whole pool when the config asks for it.

A reference is never the image it judges. Images are compared by content (`plumbing.cache.image_hash`): of
identical images in the pool (copies, links, the same file under two names) one representative is scored and
the others receive its score, map and batch, so that a copy never references its twin; a bank reference with the
content of a query is left out of that query's batch. Both give a one-line warning naming the two files. A pool
without identical images is scored exactly as before (same batches, same numbers).
"""
from __future__ import annotations

import random
import warnings
from typing import Sequence

import numpy as np

from fiseclip_lib.core.postprocess import rscin
from fiseclip_lib.core.references import ReferenceBank
from fiseclip_lib.plumbing.cache import image_hash
from fiseclip_lib.plumbing.images import image_name

MIN_LAST_BATCH = 5  # a last partial batch smaller than this is merged into the previous one
# `align`: the shift (px) that registered each image, in scores.csv and predictions.csv
SHIFT_COLUMNS = ["shift_y", "shift_x"]


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
               progress: bool = True, shifts: dict | None = None):
    """Score a pool of images of one category batch by batch.

    Args:
        detector: the `Detector`.
        images: paths (or PIL images / arrays) of the pool.
        class_name: the category's name for the prompts.
        references: a `ReferenceBank` of known-good images added to every batch (None: none).
        dataset: picks RsCIN's default k list (MuSc's per dataset).
        progress: show a progress bar.
        shifts: a dict that receives {index into images: (dy, dx) px} when the config registers images
            (`align`, core/align.py); None: not collected.
    Returns:
        (rows [(index into images, score, batch)], maps `[N, S, S]`), both sorted by path; an image identical to
        an earlier one (module doc) has that image's score, batch and map.
    """
    cfg = detector.config
    digests = [image_hash(im) for im in images]
    twin = representatives(images, digests)
    unique = [i for i, r in enumerate(twin) if r == i]
    bs = cfg.batch_size_for(len(unique))
    if bs > len(unique):
        warnings.warn(f"batch size {bs} > {len(unique)} images in category {class_name}: scored as one batch")
    batches = make_batches(unique, bs, seed=cfg.seed, shuffle=cfg.shuffle)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = tqdm(total=len(images), desc=class_name, unit="img", disable=not progress) if tqdm else None
    rows, maps, embs = [], [], []
    for b, batch in enumerate(batches):
        refs = references_apart(references, {digests[i]: i for i in batch}, images)
        res = detector.score([images[i] for i in batch], class_name, references=refs, mutual=True)
        for i, score, m in zip(batch, res.scores, res.maps):
            rows.append((i, float(score), b))
            maps.append(m)
        if shifts is not None and res.shifts is not None:
            shifts.update({i: (float(s[0]), float(s[1])) for i, s in zip(batch, res.shifts)})
        embs.append(res.embeddings)
        if bar:
            bar.update(len(batch))
    if bar:
        bar.close()
    if cfg.use_rscin:
        new = rscin(np.array([r[1] for r in rows]), np.concatenate(embs), cfg.rscin_ks_for(dataset)).numpy()
        rows = [(i, float(v), b) for (i, _, b), v in zip(rows, new)]
    if len(unique) < len(images):  # each copy gets its representative's result
        where = {row[0]: k for k, row in enumerate(rows)}
        for i, r in enumerate(twin):
            if r != i:
                rows.append((i, rows[where[r]][1], rows[where[r]][2]))
                maps.append(maps[where[r]])
                if shifts is not None and r in shifts:
                    shifts[i] = shifts[r]
    order = sorted(range(len(rows)), key=lambda k: str(images[rows[k][0]]))
    return [rows[k] for k in order], np.stack([maps[k] for k in order])


def representatives(images: Sequence, digests: Sequence[str]) -> list[int]:
    """For each image, the index of the first image with its content (itself when it is the first); one
    warning per copy, naming both.

    Args:
        images: the pool (paths, PIL images or arrays), for the warnings.
        digests: their content hashes (`image_hash`).
    Returns:
        The representative's index per image.
    """
    first: dict[str, int] = {}
    out = []
    for i, d in enumerate(digests):
        r = first.setdefault(d, i)
        if r != i:
            warnings.warn(f"images {image_name(images[r], r)} and {image_name(images[i], i)} are identical: scored "
                          f"once, the second given the first's score and map (an image never references its own "
                          f"copy)")
        out.append(r)
    return out


def references_apart(references, query_digests: dict, images: Sequence):
    """The bank less any reference with the content of a query (one warning per such reference, naming both).

    Args:
        references: a `ReferenceBank` or None.
        query_digests: {content hash: index into images} of the queries scored together.
        images: the pool, for the warnings.
    Returns:
        `references` itself when no reference equals a query, else a new bank without those references (None
        when none is left).
    """
    if references is None or not len(references):
        return references
    same = [e for e in references.entries if e.digest is not None and e.digest in query_digests]
    if not same:
        return references
    for e in same:
        i = query_digests[e.digest]
        warnings.warn(f"reference {e.path or '(unnamed)'} has the same content as image {image_name(images[i], i)}: "
                      f"left out of its references (a reference is never the image it judges)")
    kept = [e for e in references.entries if not any(e is x for x in same)]
    return ReferenceBank(kept, grid=references.grid, identity=references.identity) if kept else None
