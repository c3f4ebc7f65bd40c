"""Alignment before position-aware matching (`align: translation`).

Position-aware matching (`match_window`) compares a patch only with the same place in the references, so a part
photographed a few pixels off would light up everywhere. With `align=translation` each image is registered to
a template by a translation estimated with phase correlation (`skimage.registration.phase_cross_correlation`,
sub-pixel, on mean-free Hann-windowed grey images), shifted onto it (bilinear, borders repeated), scored, and
its maps shifted back, so maps are returned in the image's own frame. The template is the pixel-wise median of
the reference bank's images when a bank built from paths is given, else of the batch itself; the batch's median
is refined once (the median of the registered images is sharper than that of the raw ones). The estimated shift
(dy, dx) in px of the original image, what was applied to move it onto the template, is reported per image
(`BatchResult.shifts`). The image score is the one computed in the registered frame.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

from fiseclip_lib.core.tiling import as_array, common_size
from fiseclip_lib.errors import FiseclipError
from fiseclip_lib.plumbing.images import image_name

UPSAMPLE = 10  # phase correlation's sub-pixel precision: 1/10 px
MAX_SHIFT = 0.2  # a shift beyond this share of the image's side is not trusted (module doc of estimate_shifts)


def _shift(a: np.ndarray, shift) -> np.ndarray:
    """scipy's bilinear shift with border pixels repeated (imported here: only aligned runs pay its import)."""
    from scipy import ndimage

    return ndimage.shift(a, shift, order=1, mode="nearest")


def to_gray(image: np.ndarray) -> np.ndarray:
    """`[H, W, 3]` (or `[H, W]`) -> float64 `[H, W]` luminance."""
    a = np.asarray(image, dtype=np.float64)
    return a if a.ndim == 2 else a[..., :3] @ np.array([0.299, 0.587, 0.114])


def estimate_shifts(grays: Sequence[np.ndarray], template: np.ndarray | None = None,
                    unreliable: list | None = None) -> np.ndarray:
    """The translation that registers each image onto a template (phase correlation, 1/UPSAMPLE px).

    A shift is not trusted, and set to 0, for an image without structure (a uniform image: phase correlation has
    no peak) or when it exceeds MAX_SHIFT of the image's side (a part that far off is not a small pose jitter,
    and its map would be moved by as much).

    Args:
        grays: `[H, W]` images of one size.
        template: `[H, W]` frame to register to; None: the median of the images, refined once with the median of
            the registered images.
        unreliable: a list that receives the indices of the images whose shift was not trusted (None: not kept).
    Returns:
        float64 `[N, 2]` shifts (dy, dx): `shift_image(image, s)` moves the image onto the template.
    """
    from skimage.filters import window
    from skimage.registration import phase_cross_correlation

    stack = np.stack([np.asarray(g, dtype=np.float64) for g in grays])
    rounds = 1 if template is not None else 2
    ref = np.median(stack, axis=0) if template is None else np.asarray(template, dtype=np.float64)
    if ref.shape != stack.shape[1:]:
        raise FiseclipError(f"align: the template is {ref.shape[1]}x{ref.shape[0]} px, the images "
                            f"{stack.shape[2]}x{stack.shape[1]}; use references of the images' size")
    # mean removed and a Hann window: the image borders are not periodic, and unwindowed their edges dominate the
    # phase correlation (measured: a 1.7 px shift of a texture with repeated borders was estimated as 0)
    win = window("hann", stack.shape[1:])
    prep = lambda g: (g - g.mean()) * win  # noqa: E731
    moving = [prep(g) for g in stack]
    limit = MAX_SHIFT * np.array(stack.shape[1:], dtype=np.float64)
    flat = [float(np.abs(g).max()) <= 1e-9 for g in moving]
    for k in range(rounds):
        fixed = prep(ref)
        with warnings.catch_warnings():  # scikit-image warns of an undefined error for a featureless image
            warnings.simplefilter("ignore", UserWarning)
            shifts = np.array([(0.0, 0.0) if f else phase_cross_correlation(fixed, g, upsample_factor=UPSAMPLE)[0]
                               for g, f in zip(moving, flat)], dtype=np.float64)
        bad = [i for i, s in enumerate(shifts) if flat[i] or np.any(np.abs(s) > limit)]
        shifts[bad] = 0.0
        if k + 1 < rounds:
            ref = np.median(np.stack([_shift(g, s) for g, s in zip(stack, shifts)]), axis=0)
    if unreliable is not None:
        unreliable.extend(bad)
    return shifts


def warn_unreliable(name: str) -> None:
    """The one-line warning for an image whose shift was not trusted (`estimate_shifts`)."""
    warnings.warn(f"align: no reliable shift for {name} (no structure to register, or more than {MAX_SHIFT:.0%} of "
                  f"the side off): scored as it is")


def shift_image(image: np.ndarray, shift) -> np.ndarray:
    """An `[H, W, 3]` uint8 image moved by (dy, dx) px (bilinear, border pixels repeated), uint8."""
    a = np.asarray(image, dtype=np.float32)
    out = np.stack([_shift(a[..., c], shift) for c in range(a.shape[2])], axis=-1)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def moved_onto(image: np.ndarray, shift) -> np.ndarray:
    """The image moved by its estimated shift (`shift_image`), itself when the shift is zero."""
    return shift_image(image, shift) if np.any(np.abs(shift) > 1e-9) else image


def unshift_maps(maps: np.ndarray, shifts: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """Maps `[N, h, w]` of registered images back to each image's own frame (the shift undone at the maps' scale).

    Args:
        maps: the registered images' maps; shifts: `[N, 2]` (dy, dx) in image px; image_hw: (H, W) of the images.
    Returns:
        float32 `[N, h, w]`.
    """
    scale = np.array([maps.shape[1] / image_hw[0], maps.shape[2] / image_hw[1]])
    return np.stack([_shift(m.astype(np.float32), -s * scale)
                     for m, s in zip(maps, shifts)]).astype(np.float32)


def bank_template(references) -> np.ndarray | None:
    """The median grey image of a bank built from paths, or None without a bank; a bank without paths is an
    error (its images are not at hand to be the frame)."""
    if references is None or not len(references):
        return None
    if any(e.path is None for e in references.entries):
        raise FiseclipError("align: the reference bank must be built from image paths (ReferenceBank.from_images "
                            "with paths): its median image is the frame every image is registered to")
    grays = [to_gray(as_array(e.path)) for e in references.entries]
    if len({g.shape for g in grays}) > 1:
        raise FiseclipError("align: the reference images must share one size")
    return np.median(np.stack(grays), axis=0)


def score_aligned(detector, images: Sequence, class_name: str, references=None, mutual: bool = True):
    """Register images (module doc), score them with `detector.score_registered`, return maps in their frame.

    Args:
        detector: the `Detector`; images: paths, PIL images or arrays of one size; class_name: the prompt's class;
        references: a `ReferenceBank` or None (its images, when given by path, are the template);
        mutual: the images reference each other.
    Returns:
        The `BatchResult` with maps in each image's own frame and `shifts` `[N, 2]` (dy, dx) px.
    """
    arrays = [as_array(im) for im in images]
    common_size(arrays, images, "align")
    unreliable: list = []
    shifts = estimate_shifts([to_gray(a) for a in arrays], bank_template(references), unreliable)
    for i in unreliable:
        warn_unreliable(image_name(images[i], i))
    moved = [moved_onto(a, s) for a, s in zip(arrays, shifts)]
    res = detector.score_registered(moved, class_name, references=references, mutual=mutual)
    res.maps = unshift_maps(res.maps, shifts, arrays[0].shape[:2])
    res.shifts = shifts
    return res
