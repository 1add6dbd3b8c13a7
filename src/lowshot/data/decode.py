"""Decoding image files into uint8 arrays, and the fingerprints taken while decoding (dHash bits and a
pixel digest of the native image)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .dicom import is_dicom, read_dicom

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".dcm", ".dicom"}


# What decoding raises for a bad file rather than a bug: the file is listed as skipped, never fatal.
UNREADABLE = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)
MISSING_IN_MANIFEST = "missing (manifest paths are relative to the manifest's folder)"


def unreadable(err: BaseException, missing: str = "no such file") -> str:
    """Why a file in UNREADABLE's way could not be decoded, for the skipped list."""
    if isinstance(err, FileNotFoundError):
        return missing
    if isinstance(err, Image.DecompressionBombError):  # one huge file must not stop the data set
        return f"too large ({err}); PIL.Image.MAX_IMAGE_PIXELS is the limit"
    return f"cannot decode: {err}"


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file's bytes, read in chunks (md5 for MedMNIST files, sha1 for weights)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def decode_image(path: Path, size: int, dicom: tuple[str, str] = ("auto", "middle")) -> np.ndarray:
    """Decode one file to (size, size, C) uint8, C = 1 for grayscale content, else 3 (size 0: the
    native resolution, padded to a square).

    DICOM files (by suffix or the Part 10 marker) go through ``lowshot.data.dicom.read_dicom`` with
    ``dicom`` = (data.dicom_window, data.dicom_frames).

    Modes are handled explicitly: 16-bit and float grayscale are scaled to 8 bits by their own
    min-max (the window the image uses), alpha is composited onto black, palettes are expanded, and
    RGB files whose three channels are equal count as grayscale. The image is padded to a square
    with black (keeping the whole field of view, no distortion) and resized with antialiasing.
    """
    if is_dicom(path):
        a = read_dicom(path, *dicom)
        return square_resize(_gray_if_equal(a), size)
    with Image.open(path) as f:
        im: Image.Image = ImageOps.exif_transpose(f)
        if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            a = np.asarray(im, dtype=np.float32)
            lo, hi = float(a.min()), float(a.max())
            im = Image.fromarray(((a - lo) / max(hi - lo, 1e-6) * 255.0 + 0.5).astype(np.uint8), "L")
        elif im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
        elif im.mode in ("1", "L"):
            im = im.convert("L")
        else:  # P, CMYK, YCbCr, LAB, HSV, RGB
            im = im.convert("RGB")
        a = np.asarray(im)
    return square_resize(_gray_if_equal(a if a.ndim == 3 else a[..., None]), size)


def _gray_if_equal(a: np.ndarray) -> np.ndarray:
    """(H, W, C) → (H, W, 1) when the three colour channels are equal (an RGB export of a gray image)."""
    if a.shape[-1] == 3 and (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all():
        return a[..., :1]
    return a


def square_resize(a: np.ndarray, size: int) -> np.ndarray:
    """(H, W, C) uint8 → (size, size, C): pad to a centred square with 0, then antialiased resize."""
    h, w, c = a.shape
    if h != w:
        s = max(h, w)
        sq = np.zeros((s, s, c), dtype=np.uint8)
        sq[(s - h) // 2 : (s - h) // 2 + h, (s - w) // 2 : (s - w) // 2 + w] = a
        a = sq
    if size > 0 and a.shape[0] != size:
        im = Image.fromarray(a[..., 0] if c == 1 else a)
        a = np.asarray(im.resize((size, size), Image.Resampling.BICUBIC))
        a = a[..., None] if a.ndim == 2 else a
    return a


def resize_batch(x: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W, C) uint8 → (N, size, size, C)."""
    if x.shape[1] == size and x.shape[2] == size:
        return np.ascontiguousarray(x)
    return np.stack([square_resize(a, size) for a in x])


def stack_images(imgs: list[np.ndarray]) -> np.ndarray:
    """Stack per-image arrays; if any image is colour, grayscale ones are replicated to 3 channels."""
    if n_colour := sum(a.shape[-1] == 3 for a in imgs):
        if n_colour < len(imgs):
            log.warning(
                "%d of %d images have colour, so the store is RGB; data.color=gray converts them",
                n_colour,
                len(imgs),
            )
        imgs = [np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a for a in imgs]
    return np.stack(imgs)


# -------------------------------------------------------------------------------------------- duplicates
def dhash(a: np.ndarray) -> np.ndarray:
    """(H, W, C) uint8 → 64 bools: is each pixel of a 9x8 grayscale thumbnail darker than its right
    neighbour (difference hash, Krawetz 2013; robust to resizing, re-encoding and small edits)."""
    im = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).convert("L")
    t = np.asarray(im.resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    return (t[:, 1:] > t[:, :-1]).ravel()


def pixel_digest(a: np.ndarray) -> str:
    """SHA-1 of decoded pixels and shape: equal for identical images whatever their file bytes."""
    return hashlib.sha1(np.ascontiguousarray(a).data.tobytes() + str(a.shape).encode()).hexdigest()


def fingerprints(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(N, 64) dHash bits and (N,) pixel SHA-1 digests of (H, W, C) uint8 images."""
    if not images:
        return np.zeros((0, 64), bool), np.zeros(0, "<U40")
    return np.stack([dhash(a) for a in images]), np.array([pixel_digest(a) for a in images])


def to_channels(a: np.ndarray, channels: int) -> np.ndarray:
    """(..., C) uint8 → (..., channels): colour → ITU-R 601 luma (as PIL's convert("L")), gray replicated
    to RGB. One image or a whole (N, H, W, C) store."""
    if a.shape[-1] == channels:
        return a
    if channels == 1:
        luma = a.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return np.clip(luma + 0.5, 0, 255).astype(np.uint8)[..., None]
    return np.repeat(a, 3, axis=-1)
