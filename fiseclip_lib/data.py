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

import numpy as np
from PIL import Image

from .errors import DatasetError, FiseclipError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
DATASETS = ("mvtec", "visa", "folder", "demo")
MIN_LAST_BATCH = 5  # a last partial batch smaller than this is merged into the previous one


@dataclass(frozen=True)
class Sample:
    """One test image. label: 0 normal, 1 anomalous. mask: path of its ground-truth mask or None."""

    path: str
    category: str
    label: int
    defect: str
    mask: str | None = None


# ------------------------------------------------------------------------------------------- images

class ConversionWarning(UserWarning):
    """An image was not 8-bit RGB and was converted; `fiseclip run` reports these once per category and mode."""

    def __init__(self, mode: str, path):
        self.mode, self.path = mode, str(path)
        super().__init__(f"{describe_mode(mode)} image converted to 8-bit RGB: {path}")


def describe_mode(mode: str) -> str:
    """A reader's name for a PIL image mode."""
    names = {"L": "grayscale", "LA": "grayscale+alpha", "1": "1-bit", "P": "palette", "PA": "palette+alpha",
             "RGBA": "RGBA", "CMYK": "CMYK", "YCbCr": "YCbCr", "I;16": "16-bit", "I;16B": "16-bit",
             "I;16L": "16-bit", "I;16N": "16-bit", "I": "32-bit integer", "F": "32-bit float"}
    return names.get(mode, mode)


def load_image(path) -> Image.Image:
    """Read an image as 8-bit RGB. Grayscale, RGBA, palette and 16-bit images are converted, each with a
    `ConversionWarning` (16-bit images are scaled by their own maximum when it exceeds 255)."""
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                arr = np.asarray(im, dtype=np.float64)
                hi = arr.max() if arr.max() > 255 else 255.0
                im = Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8))
            rgb = im.convert("RGB")
    except FileNotFoundError:
        raise FiseclipError(f"image {path} does not exist") from None
    except Exception as e:
        raise FiseclipError(f"image {path} cannot be read ({type(e).__name__}: {e}); replace or remove it") from None
    if mode != "RGB":
        warnings.warn(ConversionWarning(mode, path))
    return rgb


def mask_array(im: Image.Image) -> np.ndarray:
    """A mask image -> bool array, True where a pixel is non-zero, whatever the encoding: 0/255 (MVTec AD),
    0/1 (raw VisA), 16-bit, palette (the stored index), 1-bit, or colour (any colour channel non-zero)."""
    if im.mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LA", "PA"):
        bands = {"RGBA": 3, "LA": 1, "PA": 1}.get(im.mode)
        arr = np.asarray(im)
        arr = arr[..., :bands] if bands else arr
        return arr.reshape(arr.shape[0], arr.shape[1], -1).any(axis=-1)
    return np.asarray(im) != 0


def load_mask(path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a mask as a bool array (non-zero = defect, see `mask_array`); resized with nearest to `size` (w, h)."""
    try:
        with Image.open(path) as im:
            im.load()
            mask = mask_array(im)
    except Exception as e:
        raise FiseclipError(f"mask {path} cannot be read ({type(e).__name__}); replace or remove it") from None
    return mask if size is None else resize_mask(mask, size)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to `size` (w, h); thresholding commutes with nearest."""
    if mask.shape[::-1] == tuple(size):
        return mask
    return np.asarray(Image.fromarray(mask).resize(tuple(size), resample=Image.NEAREST))


def image_size_of(path) -> tuple[int, int]:
    """(width, height) of an image file, read from its header."""
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as e:
        raise FiseclipError(f"image {path} cannot be read ({type(e).__name__}); replace or remove it") from None


# ------------------------------------------------------------------------------------------- loaders

def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))


def _pair_masks(images: list[Path], mask_dir: Path | None, suffixes=("_mask", "")) -> dict[Path, Path | None]:
    """Pair each image with a mask of the same stem (optionally suffixed); extra masks are an error."""
    masks = {p.stem: p for p in _images_in(mask_dir)} if mask_dir is not None else {}
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
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder; pass --root to an existing folder")
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
        if not any(_images_in(test / d) for d in defects):
            warnings.warn(f"category {cat} has no test images under {test}; skipped")
            continue
        for defect in defects:
            images = _images_in(test / defect)
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
        for img in _images_in(d / "normal"):
            samples.append(Sample(str(img), cat, 0, "good", None))
        abnormal = _images_in(d / "abnormal")
        pairs = _pair_masks(abnormal, d / "masks" if (d / "masks").is_dir() else None)
        for img in abnormal:
            samples.append(Sample(str(img), cat, 1, "abnormal", str(pairs[img]) if pairs[img] else None))
    return samples


def load_dataset(name: str, root, categories: Sequence[str] | None = None) -> list[Sample]:
    """Dispatch by dataset name: mvtec, visa, folder, demo (the demo set has the MVTec layout)."""
    loaders = {"mvtec": load_mvtec, "visa": load_visa, "folder": load_folder, "demo": load_mvtec}
    if name not in loaders:
        raise FiseclipError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}")
    samples = loaders[name](root, categories)
    if not samples:
        raise DatasetError(f"no test images found under {root} for dataset {name!r}")
    return samples


def parse_categories(value, source: str) -> list[str] | None:
    """A `categories` setting: a comma-separated string or a list of names -> stripped names ([] when it names
    none), None when absent; anything else is a one-line error naming `source`."""
    if value is None:
        return None
    if isinstance(value, str):
        return [c.strip() for c in value.split(",") if c.strip()]
    if isinstance(value, list) and all(isinstance(c, str) for c in value):
        return [c.strip() for c in value if c.strip()]
    raise FiseclipError(f"{source}: categories must be a list of names or a comma-separated string, got {value!r}")


def categories_of(samples: Iterable[Sample]) -> list[str]:
    return sorted({s.category for s in samples})


# ------------------------------------------------------------------------------------------- batches

def make_batches(samples: Sequence[Sample], batch_size: int, seed: int = 0, shuffle: bool = True,
                 min_last: int = MIN_LAST_BATCH) -> list[list[Sample]]:
    """Split one category's samples into consecutive batches of `batch_size`.

    shuffle=True (default): a fixed-seed shuffle first (MVTec/VisA file order groups one defect type per
    batch, which changes what the references look like); shuffle=False keeps file order.
    The last partial batch is kept, except that one smaller than `min_last` is merged into the previous
    batch (a batch of 1-4 images has too few references to score reliably).
    batch_size <= 0 or None means the whole category as one batch.
    """
    items = list(samples)
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
