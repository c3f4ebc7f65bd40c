"""Reading images and masks: 8-bit RGB images (conversions reported), boolean masks, image folders.

Shared by the encoders (preprocessing), the datasets, the decisions (overlays) and the plots.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from fiseclip_lib.errors import FiseclipError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


class ConversionWarning(UserWarning):
    """An image was not 8-bit RGB and was converted; `fiseclip run` reports these once per category and mode."""

    def __init__(self, mode: str, path):
        self.mode, self.path = mode, str(path)
        super().__init__(f"{describe_mode(mode)} image converted to 8-bit RGB: {path}")


def image_name(image, index: int | None = None) -> str:
    """How messages name an image: its path, else its position among the images given (`image #i`), else
    "an image"."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return "an image" if index is None else f"image #{index}"


def describe_mode(mode: str) -> str:
    """A reader's name for a PIL image mode."""
    names = {"L": "grayscale", "LA": "grayscale+alpha", "1": "1-bit", "P": "palette", "PA": "palette+alpha",
             "RGBA": "RGBA", "CMYK": "CMYK", "YCbCr": "YCbCr", "I;16": "16-bit", "I;16B": "16-bit",
             "I;16L": "16-bit", "I;16N": "16-bit", "I": "32-bit integer", "F": "32-bit float"}
    return names.get(mode, mode)


WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Values of more than 8 bits scaled by their own maximum when it exceeds 255 (16-bit images), else clipped."""
    arr = np.asarray(arr, dtype=np.float64)
    hi = arr.max() if arr.size and arr.max() > 255 else 255.0
    return np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)


def _rgb(im: Image.Image) -> Image.Image:
    return (Image.fromarray(_to_uint8(np.asarray(im))) if im.mode in WIDE_MODES else im).convert("RGB")


def rgb_image(image) -> Image.Image:
    """A path, PIL image or array -> 8-bit RGB PIL image, the one conversion every reader uses.

    Arrays: uint8 as they are; wider integers and floats above 255 scaled by their maximum (as 16-bit files);
    floats within [0, 1] are an error (they would be read as black: scale them to 0-255 first).
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            if np.issubdtype(image.dtype, np.floating) and image.size and 0 < float(np.nanmax(image)) <= 1.0:
                raise FiseclipError(f"an image array of {image.dtype} holds values in [0, 1]: give 0-255 (e.g. "
                                    f"(a * 255).astype(np.uint8)); read as it is, it would be black")
            image = _to_uint8(np.nan_to_num(image))
        return Image.fromarray(image).convert("RGB")
    if hasattr(image, "convert"):
        return _rgb(image)
    return load_image(image)


def load_image(path) -> Image.Image:
    """Read an image as 8-bit RGB. Grayscale, RGBA, palette and 16-bit images are converted, each with a
    `ConversionWarning` (16-bit images are scaled by their own maximum when it exceeds 255)."""
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            rgb = _rgb(im)
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
    """Read a mask as a bool array (non-zero = defect, see `mask_array`); resized with nearest to `size` (w, h).
    A folder is one mask per defect region (MVTec LOCO's layout): the union of its image files."""
    if Path(path).is_dir():
        parts = [load_mask(p) for p in images_in(Path(path))]
        if not parts:
            raise FiseclipError(f"mask folder {path} holds no mask image; add the masks or remove the folder")
        if len({m.shape for m in parts}) > 1:
            raise FiseclipError(f"the masks in {path} differ in size; every mask of one image has the image's size")
        mask = np.logical_or.reduce(parts)
        return mask if size is None else resize_mask(mask, size)
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


def images_in(folder: Path) -> list[Path]:
    """The image files of a folder (not recursive, hidden files skipped), sorted."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))
