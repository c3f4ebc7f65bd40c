"""Datasets: MVTec AD, VisA (raw and MVTec-like), generic folders; sample records and per-category batches.

A dataset is a list of `Sample` records; nothing is read from an image until it is encoded. Masks are paired
with images by file stem (MVTec's `NNN_mask.png` pairs with `NNN.png`) and validated up front, so a mismatch
is reported with the file names before any compute is spent.
"""
from __future__ import annotations

import csv
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence


from fiseclip_lib.core.pool import MIN_LAST_BATCH, make_batches  # noqa: F401 - batches of samples
from fiseclip_lib.errors import DatasetError, FiseclipError
from fiseclip_lib.evaluation import anomalib_data as A  # anomalib's datasets and meta.json (anomalib imported lazily)
from fiseclip_lib.plumbing.images import (IMAGE_EXTS, ConversionWarning, describe_mode, image_size_of, images_in,  # noqa: F401
                                         load_image, load_mask, mask_array, resize_mask)

# The dataset layouts read without anomalib, defined once (`fiseclip run --dataset`, params files, sweep grids,
# load_dataset); `anomalib:<name>` reads anomalib's datasets (evaluation/anomalib_data.py, the extra).
DATASETS = ("mvtec", "visa", "folder", "metajson", "demo")


@dataclass(frozen=True)
class Sample:
    """One test image. label: 0 normal, 1 anomalous. mask: path of its ground-truth mask or None."""

    path: str
    category: str
    label: int
    defect: str
    mask: str | None = None


# ------------------------------------------------------------------------------------------- loaders

def _pair_masks(images: list[Path], mask_dir: Path | None, suffixes=("_mask", "")) -> dict[Path, Path | None]:
    """Pair each image with a mask of the same stem (optionally suffixed); extra masks are an error."""
    masks = {p.stem: p for p in images_in(mask_dir)} if mask_dir is not None else {}
    pairs, used = {}, set()
    for img in images:
        found = None
        for suf in suffixes:
            if img.stem + suf in masks:
                found = masks[img.stem + suf]
                break
        pairs[img] = found
        if found is not None:
            used.add(found)
    orphans = sorted(set(masks.values()) - used)
    if orphans:
        raise DatasetError(
            f"masks without an image of the same stem in {mask_dir}: {', '.join(p.name for p in orphans[:5])}"
            f"{' ...' if len(orphans) > 5 else ''}; rename or remove them"
        )
    return pairs


def _require_root(root) -> Path:
    root = Path(root)
    if root.is_file():
        raise DatasetError(f"dataset root {root} is a file; pass --root to the folder that holds it ({root.parent})")
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist; pass --root to an existing folder")
    return root


def _select(categories_found: list[str], categories: Sequence[str] | None, root: Path) -> list[str]:
    if not categories_found:
        raise DatasetError(f"no categories found under {root}; check the layout (see README, 'Datasets')")
    if not categories:
        return categories_found
    unknown = [c for c in categories if c not in categories_found]
    if unknown:
        raise DatasetError(f"unknown categories {unknown} under {root}; available: {', '.join(categories_found)}")
    return list(categories)


def load_mvtec(root, categories: Sequence[str] | None = None) -> list[Sample]:
    """MVTec AD layout: `<cat>/test/<defect>/*.png`, masks `<cat>/ground_truth/<defect>/NNN_mask.png`.

    Also reads VisA after MVTec-like conversion and the demo set, which use the same layout.
    """
    root = _require_root(root)
    found = sorted(p.name for p in root.iterdir() if (p / "test").is_dir())
    samples: list[Sample] = []
    for cat in _select(found, categories, root):
        test = root / cat / "test"
        defects = sorted(d.name for d in test.iterdir() if d.is_dir())
        if not any(images_in(test / d) for d in defects):
            warnings.warn(f"category {cat} has no test images under {test}; skipped")
            continue
        for defect in defects:
            images = images_in(test / defect)
            label = 0 if defect == "good" else 1
            gt = root / cat / "ground_truth" / defect
            pairs = _pair_masks(images, gt if gt.is_dir() else None)
            for img in images:
                samples.append(Sample(str(img), cat, label, defect, str(pairs[img]) if pairs[img] else None))
    return samples


def load_visa(root, categories: Sequence[str] | None = None) -> list[Sample]:
    """VisA: raw layout with `split_csv/1cls.csv` (test rows), or the MVTec-like converted layout."""
    root = _require_root(root)
    split = root / "split_csv" / "1cls.csv"
    if not split.is_file():
        if any((p / "test").is_dir() for p in root.iterdir()):
            return load_mvtec(root, categories)
        raise DatasetError(f"{root} is neither raw VisA (missing split_csv/1cls.csv) nor MVTec-like (<cat>/test/)")
    rows = []
    try:
        with open(split, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            need = {"object", "split", "label", "image", "mask"}
            if not need <= set(reader.fieldnames or []):
                raise DatasetError(f"{split}: columns {sorted(need)} expected, found {reader.fieldnames}")
            rows = [r for r in reader if r["split"] == "test"]
    except UnicodeDecodeError as e:
        raise DatasetError(f"{split} is not UTF-8 text (byte {e.start}); save it as UTF-8 CSV") from None
    except csv.Error as e:
        raise DatasetError(f"{split} is not a valid CSV file ({e})") from None
    bad = [r for r in rows if any(r.get(k) is None for k in ("object", "label", "image"))]
    if bad:
        raise DatasetError(f"{split}: a test row has missing fields (e.g. {bad[0]}); fix the file")
    found = sorted({r["object"] for r in rows})
    cats = set(_select(found, categories, root))
    samples = []
    for r in rows:
        if r["object"] not in cats:
            continue
        img = root / r["image"]
        label = 0 if r["label"] == "normal" else 1
        mask = (root / r["mask"]) if label and r.get("mask") else None
        if not img.is_file():
            raise DatasetError(f"{split} lists {r['image']}, which does not exist under {root}")
        if mask is not None and not mask.is_file():
            raise DatasetError(f"{split} lists mask {r['mask']} for {r['image']}, which does not exist")
        samples.append(Sample(str(img), r["object"], label, "anomaly" if label else "good",
                              str(mask) if mask else None))
    samples.sort(key=lambda s: (s.category, s.path))
    return samples


def load_folder(root, categories: Sequence[str] | None = None) -> list[Sample]:
    """Generic folders: `<cat>/normal/*`, `<cat>/abnormal/*`, optional `<cat>/masks/*` (same stems).

    A root that directly holds `normal/` and `abnormal/` is one category named after the root.
    Without masks the category is evaluated at image level only.
    """
    root = _require_root(root)
    if (root / "normal").is_dir():
        cat_dirs = {root.name: root}
    else:
        cat_dirs = {p.name: p for p in sorted(root.iterdir()) if (p / "normal").is_dir() or (p / "abnormal").is_dir()}
    samples = []
    for cat in _select(sorted(cat_dirs), categories, root):
        d = cat_dirs[cat]
        for img in images_in(d / "normal"):
            samples.append(Sample(str(img), cat, 0, "good", None))
        abnormal = images_in(d / "abnormal")
        pairs = _pair_masks(abnormal, d / "masks" if (d / "masks").is_dir() else None)
        for img in abnormal:
            samples.append(Sample(str(img), cat, 1, "abnormal", str(pairs[img]) if pairs[img] else None))
    return samples


def load_dataset(name: str, root, categories: Sequence[str] | None = None) -> list[Sample]:
    """Dispatch by dataset name: mvtec, visa, folder, metajson, demo (the demo set has the MVTec layout), or
    anomalib:<name> (anomalib's own reader of that dataset)."""
    loaders = {"mvtec": load_mvtec, "visa": load_visa, "folder": load_folder, "demo": load_mvtec}
    check_dataset(name)
    if name.startswith(A.PREFIX) or name == "metajson":
        root = _require_root(root)
        read = A.load_metajson if name == "metajson" else lambda r, pick: A.load_anomalib(name, r, pick)
        samples = [Sample(*row) for row in read(root, lambda found: _select(found, categories, root))]
    else:
        samples = loaders[name](root, categories)
    if not samples:
        raise DatasetError(f"no test images found under {root} for dataset {name!r}")
    return samples


def check_dataset(name, source: str = "") -> str:
    """`name` if it is one of DATASETS or `anomalib:<name>` of a dataset anomalib has, else a one-line error
    naming `source` and the choices (anomalib need not be installed to check a name)."""
    where = source + ": " if source else ""
    if isinstance(name, str) and name.startswith(A.PREFIX):
        try:
            A.split_name(name)
        except FiseclipError as e:
            raise FiseclipError(where + str(e)) from None
    elif name not in DATASETS:
        hint = f" (anomalib's: {A.PREFIX}{name})" if isinstance(name, str) and name in A.ANOMALIB_DATASETS else ""
        raise FiseclipError(f"{where}unknown dataset {name!r}{hint}; use {', '.join(DATASETS)} or "
                            f"{A.PREFIX}<name> ({', '.join(sorted(A.ANOMALIB_DATASETS))})")
    return name


def parse_categories(value, source: str) -> list[str] | None:
    """A `categories` setting (params file, --categories, sweep grid): a comma-separated string or a list of
    names -> the stripped names; None means every category: absent, "" and [] (and blanks only) alike.
    Anything else is a one-line error naming `source`."""
    if value is None:
        return None
    if isinstance(value, str):
        names = [c.strip() for c in value.split(",") if c.strip()]
    elif isinstance(value, list) and all(isinstance(c, str) for c in value):
        names = [c.strip() for c in value if c.strip()]
    else:
        raise FiseclipError(f"{source}: categories must be a list of names or a comma-separated string, "
                            f"got {value!r}")
    return names or None


def categories_of(samples: Iterable[Sample]) -> list[str]:
    return sorted({s.category for s in samples})


# ------------------------------------------------------------------------------------------- batches

def validate_category(samples: Sequence[Sample]) -> dict:
    """Check one category before scoring; return what can be evaluated and warnings to show."""
    cat = samples[0].category if samples else "?"
    notes = []
    labels = {s.label for s in samples}
    if len(labels) < 2:
        notes.append(f"category {cat}: only {'normal' if labels == {0} else 'anomalous'} images; "
                     f"image AUROC/AP/F1 are undefined (NaN)")
    missing = [s for s in samples if s.label == 1 and s.mask is None]
    pixel = not missing
    if missing and len(missing) < sum(s.label for s in samples):
        notes.append(f"category {cat}: {len(missing)} anomalous images without mask "
                     f"(e.g. {Path(missing[0].path).name}); pixel metrics skipped for this category")
    elif missing:
        notes.append(f"category {cat}: no masks; evaluated at image level only")
    good_masks = [s for s in samples if s.label == 0 and s.mask is not None]
    if good_masks:
        notes.append(f"category {cat}: {len(good_masks)} normal images have masks (e.g. "
                     f"{Path(good_masks[0].mask).name}); they are ignored (normal = all-zero mask)")
    for n in notes:
        warnings.warn(n)
    return {"pixel": pixel, "notes": notes}


def compose_batch(samples: Sequence[Sample], size: int, anomalous_share: float, seed: int = 0) -> list[Sample]:
    """A batch of `size` images of one category with round(share * size) anomalous ones (for contamination
    studies). Raises when the category has too few images of either kind."""
    n_bad = int(round(anomalous_share * size))
    good = [s for s in samples if s.label == 0]
    bad = [s for s in samples if s.label == 1]
    if n_bad > len(bad) or size - n_bad > len(good):
        raise FiseclipError(f"a batch of {size} with {n_bad} anomalous images needs more images than the category "
                            f"has ({len(good)} normal, {len(bad)} anomalous)")
    rng = random.Random(seed)
    batch = rng.sample(good, size - n_bad) + rng.sample(bad, n_bad)
    rng.shuffle(batch)
    return batch
