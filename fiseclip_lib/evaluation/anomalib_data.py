"""The field's other dataset layouts, read into the harness's samples: every anomalib image dataset
(`--dataset anomalib:<name>`), read through anomalib's own dataset classes, and the `meta.json` index of
AnomalyCLIP and AdaCLIP (`--dataset metajson`), which needs no anomalib.

anomalib is the optional extra `fiseclip[anomalib]`: it is imported only when an `anomalib:` dataset is read.
Only anomalib's Dataset classes are used (they list the files of a local root), never a DataModule, whose
`prepare_data` downloads: nothing is ever downloaded, and a root that is not there is a one-line error naming
it. Masks follow our rule, any non-zero pixel is a defect (VisA's 0/1 masks, MVTec's 0/255 alike). MVTec LOCO
gives an image one mask file per defect region, in a folder of its own: that folder is the image's mask, read as
the union of its files (`plumbing.images.load_mask`); nothing is written.
docs/anomalib.md lists the names and the layouts they read.
"""
from __future__ import annotations

import importlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence


from fiseclip_lib.errors import DatasetError, FiseclipError
from fiseclip_lib.plumbing.images import images_in

# A test image as `data.Sample`'s fields: (path, category, label, defect, mask). data.load_dataset makes the
# Samples (data.py dispatches here, so this module does not import it).
Row = tuple
# the categories found -> those asked for (data._select: an unknown one is an error)
Select = Callable[[list], list]

PREFIX = "anomalib:"


@dataclass(frozen=True)
class AnomalibLayout:
    """One anomalib image dataset: its module and class in `anomalib.data.datasets.image`, and how its
    categories are found under a root (`marker`: the sub-folder a category folder holds; None: the root is the
    one category, named after the dataset). The layouts themselves are in docs/anomalib.md."""

    module: str
    cls: str
    marker: str | None


# anomalib's names (its module names) -> how to read them; `realiad` is special-cased in load_anomalib (its
# categories are JSON files, its images one folder per resolution)
ANOMALIB_DATASETS: dict[str, AnomalibLayout] = {
    "btech": AnomalibLayout("btech", "BTechDataset", "test"),
    "kolektor": AnomalibLayout("kolektor", "KolektorDataset", None),
    "mpdd": AnomalibLayout("mpdd", "MPDDDataset", "test"),
    "mvtec_loco": AnomalibLayout("mvtec_loco", "MVTecLOCODataset", "test"),
    "mvtecad": AnomalibLayout("mvtecad", "MVTecADDataset", "test"),
    "mvtecad2": AnomalibLayout("mvtecad2", "MVTecAD2Dataset", "test_public"),
    "realiad": AnomalibLayout("realiad", "RealIADDataset", None),
    "visa": AnomalibLayout("visa", "VisaDataset", "test"),
}


def dataset_names() -> list[str]:
    """Every `anomalib:<name>` the harness reads, sorted."""
    return [PREFIX + n for n in sorted(ANOMALIB_DATASETS)]


def split_name(name: str) -> tuple[str, str | None]:
    """`anomalib:<name>[:<variant>]` -> (name, variant); a one-line error for a name anomalib has not here.

    Args:
        name: the dataset as written (`anomalib:mvtec_loco`, `anomalib:realiad:512`).
    Returns:
        (anomalib's dataset name, the variant or None: Real-IAD's resolution).
    """
    base, _, variant = name[len(PREFIX):].partition(":")
    if base not in ANOMALIB_DATASETS:
        raise FiseclipError(f"unknown anomalib dataset {name!r}; use one of {', '.join(dataset_names())}")
    if variant and base != "realiad":
        raise FiseclipError(f"dataset {name!r}: only anomalib:realiad takes a variant (its resolution); "
                            f"write {PREFIX}{base}")
    return base, variant or None


# ------------------------------------------------------------------------------------------- anomalib

def load_anomalib(name: str, root: Path, select: Select) -> list[Row]:
    """The test images of an anomalib dataset under a local root, listed by anomalib's own Dataset class.

    Args:
        name: `anomalib:<name>` (`dataset_names()`; `anomalib:realiad:<resolution>` picks one of several).
        root: the dataset's local root (an existing folder), as anomalib's datamodule takes it; nothing is
            downloaded into it.
        select: picks the categories to read from those found.
    Returns:
        Rows (path, category, label, defect, mask) sorted by category and path; label 1 for anomalous images,
        mask the image's mask file (None for normal images).
    """
    base, variant = split_name(name)
    spec = ANOMALIB_DATASETS[base]
    try:
        cls = getattr(importlib.import_module(f"anomalib.data.datasets.image.{spec.module}"), spec.cls)
    except ImportError as e:
        raise FiseclipError(f"dataset {name} reads through anomalib, which is not installed here ({e}); "
                            f"pip install 'fiseclip[anomalib]'") from None
    if base == "visa" and (root / "visa_pytorch").is_dir():
        root = root / "visa_pytorch"  # where anomalib's Visa datamodule writes its converted split
    elif base == "visa" and (root / "split_csv").is_dir():
        raise DatasetError(f"{root} is raw VisA; anomalib reads VisA after its own conversion (<root>/visa_pytorch, "
                           f"written by its Visa datamodule): use --dataset visa, which reads the raw layout")
    samples: list[Row] = []
    if base == "realiad":
        resolution, found = _realiad_resolution(root, variant, name)
        for cat in select(found):
            ds = _construct(cls, name, root / cat, root=root, category=cat, resolution=resolution, split="test")
            # the defect is the JSON's anomaly_class of the image (anomalib sorts its table by path)
            folder = root / f"realiad_{resolution}" / cat
            kinds = {(folder / e["image_path"]).resolve(): e.get("anomaly_class", "") for e in ds.metadata["test"]}
            samples += _from_frame(ds.samples, cat, [kinds[Path(p).resolve()] for p in ds.samples.image_path])
    elif spec.marker is None:
        ds = _construct(cls, name, root, root=root, split="test")
        samples = _from_frame(ds.samples, base) if select([base]) else []
    else:
        found = sorted(p.name for p in root.iterdir() if (p / spec.marker).is_dir())
        for cat in select(found):
            ds = _construct(cls, name, root / cat, root=root, category=cat, split="test")
            samples += _from_frame(ds.samples, cat)
    samples.sort(key=lambda s: (s[1], s[0]))
    return samples


def _construct(cls, name: str, where: Path, **kwargs):
    """anomalib's Dataset; its reading errors (no images, masks that do not pair: anomalib's MisMatchError, a
    plain Exception) as one line naming `where`."""
    import pandas as pd

    try:
        # anomalib 2.7's readers predate pandas 3's string columns: MVTec LOCO's lists of masks per image cannot
        # be stored in one (TypeError); object columns, as under pandas 2, hold them (the option is deprecated)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            with pd.option_context("future.infer_string", False):
                return cls(**kwargs)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise DatasetError(f"{name}: anomalib's {cls.__name__} cannot read {where} ({type(e).__name__}: {first}); "
                           f"check the layout (docs/anomalib.md)") from None


def _realiad_resolution(root: Path, variant: str | None, name: str) -> tuple[str, list[str]]:
    """Real-IAD: the resolution folder to read (the only one, or the variant) and the categories with a JSON."""
    have = sorted(p.name[len("realiad_"):] for p in root.glob("realiad_*") if p.is_dir() and p.name != "realiad_jsons")
    if variant is not None and variant not in have:
        raise DatasetError(f"{name}: no folder realiad_{variant} under {root} (found: {', '.join(have) or 'none'})")
    if variant is None and len(have) != 1:
        raise DatasetError(f"{name}: {'no realiad_<resolution> folder' if not have else 'several resolutions'} "
                           f"under {root}" + (f"; name one: {', '.join(f'{PREFIX}realiad:{r}' for r in have)}"
                                              if have else ""))
    resolution = variant or have[0]
    from anomalib.data.datasets.image.realiad import CATEGORIES

    jsons = root / "realiad_jsons" / "realiad_jsons"
    images = root / f"realiad_{resolution}"
    found = sorted(p.stem for p in jsons.glob("*.json") if p.stem in CATEGORIES and (images / p.stem).is_dir())
    return resolution, found


def _from_frame(frame, category: str, defects: list[str] | None = None) -> list[Row]:
    """anomalib's samples table (split already test) -> rows; rows of unknown label (-1: MVTec AD 2's private
    sets) are left out, normal images carry no mask (anomalib's all-zero masks of Kolektor included)."""
    out = []
    for i, row in enumerate(frame.to_dict("records")):
        label = int(row["label_index"])
        if label not in (0, 1):
            continue
        defect = defects[i] if defects is not None else str(row.get("label", "good" if label == 0 else "anomaly"))
        defect = "good" if label == 0 else defect
        mask = _mask_of(row.get("mask_path"), row["image_path"]) if label else None
        if mask is not None and not Path(mask).exists():  # some readers list masks they never open (BTech, Real-IAD)
            raise DatasetError(f"mask {mask} of anomalous image {row['image_path']} does not exist; add it or check "
                               f"the layout (docs/anomalib.md)")
        out.append((str(row["image_path"]), category, label, defect, mask))
    return out


def _mask_of(value, image) -> str | None:
    """anomalib's mask_path (a path, "" / None / NaN for none, or a list of per-defect masks) -> one file."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value):
        return None
    if isinstance(value, str):
        return value
    paths = [str(p) for p in value]
    if not paths:
        return None
    if len(paths) == 1:
        return paths[0]
    # one mask per defect region, all in the image's own folder (MVTec LOCO): that folder is the mask, read as the
    # union of its files (plumbing.images.load_mask), so nothing is written
    folder = Path(paths[0]).parent
    if any(Path(p).parent != folder for p in paths) or \
            {p.name for p in images_in(folder)} != {Path(p).name for p in paths}:
        raise DatasetError(f"the masks of {image} are not exactly the images of one folder ({', '.join(paths[:3])}"
                           f"{', ...' if len(paths) > 3 else ''}); keep each image's mask parts in a folder of "
                           f"their own")
    return str(folder)


# ------------------------------------------------------------------------------------------- meta.json

def load_metajson(root: Path, select: Select) -> list[Row]:
    """AnomalyCLIP / AdaCLIP's index: `<root>/meta.json` = {"test": {<cat>: [{"img_path", "mask_path",
    "cls_name", "specie_name", "anomaly"}, ...]}, "train": ...}, paths relative to the root.

    Args:
        root: the folder that holds meta.json (an existing folder).
        select: picks the categories to read from those in the file.
    Returns:
        Rows (path, category, label, defect, mask) sorted by category and path ("anomaly" 1: anomalous; an
        empty mask_path: no mask).
    """
    meta = root / "meta.json"
    if not meta.is_file():
        raise DatasetError(f"{meta} does not exist; the metajson layout is a folder with AnomalyCLIP/AdaCLIP's "
                           f"meta.json (see docs/anomalib.md)")
    try:
        index = json.loads(meta.read_text(encoding="utf-8-sig"))  # a byte-order mark is harmless
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{meta} is not valid JSON ({e}); fix or regenerate it") from None
    test = index.get("test") if isinstance(index, dict) else None
    if not isinstance(test, dict) or not all(isinstance(v, list) for v in test.values()):
        raise DatasetError(f"{meta}: a \"test\" mapping of category -> list of entries expected")
    samples, seen = [], {}
    for cat in select(sorted(test)):
        for k, e in enumerate(test[cat]):
            where = f"{meta}: test/{cat}[{k}]"
            if not isinstance(e, dict) or not isinstance(e.get("img_path"), str) or e.get("anomaly") not in (0, 1):
                raise DatasetError(f"{where} needs img_path (text) and anomaly (0 or 1), got {e!r}")
            mask = e.get("mask_path") or None
            if mask is not None and not isinstance(mask, str):
                raise DatasetError(f"{where}: mask_path must be text (a path under the root) or empty, got {mask!r}")
            img = root / e["img_path"]  # an absolute path stays itself
            if not img.is_file():
                raise DatasetError(f"{where} lists {e['img_path']}, which does not exist"
                                   + ("" if Path(e["img_path"]).is_absolute() else f" under {root}"))
            if img.resolve() in seen:  # listed twice, perhaps with two labels: the metrics would count it twice
                raise DatasetError(f"{where} lists {e['img_path']} again (first at {seen[img.resolve()]}); list each "
                                   f"image once")
            seen[img.resolve()] = f"test/{cat}[{k}]"
            if mask is not None and not (root / mask).is_file():
                raise DatasetError(f"{where} lists mask {mask}, which does not exist"
                                   + ("" if Path(mask).is_absolute() else f" under {root}"))
            label = int(e["anomaly"])
            defect = str(e.get("specie_name") or ("good" if label == 0 else "anomaly"))
            samples.append((str(img), cat, label, "good" if label == 0 else defect,
                            str(root / mask) if mask and label else None))
    samples.sort(key=lambda s: (s[1], s[0]))
    return samples
