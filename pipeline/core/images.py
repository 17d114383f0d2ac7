"""Image decoding and preprocessing for the precompute step: raw bytes -> RGB -> [-1, 1] crops, or a skip reason.

Bad input never raises: it comes back as a `SkipReason` the caller counts in its report. Declared sizes are checked
before any pixel is decoded (decompression bombs), and only common raster formats are opened (no EPS/ghostscript).
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.core.plan.data import DEFAULT_MAX_PIXELS

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG's opener also reads MPO (phone photos)
WHITE = (255, 255, 255)


class SkipReason(str, Enum):
    """Why an image was skipped; a str, so it counts and serialises as its value."""

    EMPTY = "empty"
    NOT_AN_IMAGE = "not_an_image"
    CORRUPT = "corrupt"
    TOO_SMALL = "too_small"
    TOO_LARGE = "too_large"


@dataclass
class Decoded:
    """An RGB image (None when skipped), its upright size (header size when skipped early), and the reason."""

    image: Image.Image | None
    reason: SkipReason | None = None
    width: int = 0
    height: int = 0


@dataclass
class Prepared:
    """Per resolution a (3, R, R) float32 array in [-1, 1], or None where the short side is below R."""

    arrays: dict[int, np.ndarray | None] = field(default_factory=dict)
    reason: SkipReason | None = None
    width: int = 0
    height: int = 0

    @property
    def missing(self) -> list[int]:
        """Resolutions the image is too small for (absent, never upsampled)."""
        return [r for r, a in self.arrays.items() if a is None]


def decode_image(data: bytes, min_size: int = 1, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode bytes to an upright RGB image (alpha composited on white), or a skip reason."""
    if not data:
        return Decoded(None, SkipReason.EMPTY)
    try:
        with warnings.catch_warnings():
            # Our own max_pixels applies below; PIL's global bomb limit still raises past 2x its default.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=_formats())
            w, h = im.size  # header only: nothing decoded yet
            if w * h > max_pixels:
                return Decoded(None, SkipReason.TOO_LARGE, w, h)
            if min(w, h) < min_size:
                return Decoded(None, SkipReason.TOO_SMALL, w, h)
            im.load()
    except UnidentifiedImageError:
        return Decoded(None, SkipReason.NOT_AN_IMAGE)
    except Image.DecompressionBombError:
        return Decoded(None, SkipReason.TOO_LARGE)
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, MemoryError):
        # Truncated streams, bad chunks/CRCs, broken headers: PIL raises a zoo of types.
        return Decoded(None, SkipReason.CORRUPT)
    try:
        rgb = _to_rgb(_upright(im))
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError):
        return Decoded(None, SkipReason.CORRUPT, w, h)
    w, h = rgb.size
    if min(w, h) < min_size:  # EXIF rotation does not change the short side, but be exact
        return Decoded(None, SkipReason.TOO_SMALL, w, h)
    return Decoded(rgb, None, w, h)


def _formats() -> list[str]:
    Image.init()  # registers plugins; a format missing from this Pillow build is left out
    return [f for f in FORMATS if f in Image.OPEN]


def _upright(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a broken EXIF block is ignored rather than failing the image."""
    try:
        return ImageOps.exif_transpose(im)
    except (SyntaxError, ValueError, KeyError, TypeError, IndexError, ZeroDivisionError):
        return im


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency is composited on white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        im = _to_8bit_gray(im)
    if im.mode == "1":
        im = im.convert("L")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE + (255,)), rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")  # L, P, CMYK, YCbCr, LAB, HSV


def _to_8bit_gray(im: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer and float grayscale -> 8-bit L, preserving the relative scale."""
    a = np.asarray(im)
    if im.mode.startswith("I;16"):
        a = a.astype(np.float64) / 257.0  # 65535 -> 255
    elif im.mode == "I":
        a = a.astype(np.float64) / (257.0 if a.max(initial=0) > 255 else 1.0)
    else:  # "F": [0, 1] floats or 0..255
        a = a.astype(np.float64) * (255.0 if a.max(initial=0) <= 1.0 else 1.0)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def preprocess(image: Image.Image, resolution: int) -> np.ndarray:
    """Bicubic resize of the short side to R, center crop R x R, scale to [-1, 1]: (3, R, R) float32."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode!r}")
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    w, h = image.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return to_signed(np.asarray(image))  # (3, R, R)


def to_signed(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 pixels -> (3, H, W) float32 in [-1, 1], the layout the VAE encodes."""
    a = np.asarray(pixels, dtype=np.float32)  # (H, W, 3) in 0..255
    return np.ascontiguousarray((a / 127.5 - 1.0).transpose(2, 0, 1))


def to_uint8(x: np.ndarray) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8; the exact inverse of to_signed."""
    return np.rint((np.asarray(x).transpose(1, 2, 0) + 1.0) * 127.5).clip(0, 255).astype(np.uint8)


def prepare(data: bytes, resolutions: list[int], min_size: int | None = None,
            max_pixels: int = DEFAULT_MAX_PIXELS) -> Prepared:
    """Decode once and preprocess at each resolution; resolutions above the short side are None (not upsampled).

    min_size (default: the smallest resolution) is the floor below which the image is skipped as too_small.
    """
    resolutions = sorted({int(r) for r in resolutions})
    if not resolutions or resolutions[0] < 1:
        raise ValueError(f"expected positive resolutions, got {resolutions}")
    floor = resolutions[0] if min_size is None else int(min_size)
    d = decode_image(data, min_size=floor, max_pixels=max_pixels)
    if d.image is None:
        return Prepared({r: None for r in resolutions}, d.reason, d.width, d.height)
    short = min(d.width, d.height)
    arrays = {r: preprocess(d.image, r) if short >= r else None for r in resolutions}
    # Decoded but smaller than every resolution (min_size below them): nothing usable.
    reason = SkipReason.TOO_SMALL if all(a is None for a in arrays.values()) else None
    return Prepared(arrays, reason, d.width, d.height)
