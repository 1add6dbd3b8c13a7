"""DICOM files as images: pixel data → uint8 (H, W, C), and the patient (or study) as the group.

pydicom is an optional extra (``pip install 'lowshot[dicom]'``); compressed transfer syntaxes (JPEG,
JPEG 2000, JPEG-LS) need its decoder plugins (pylibjpeg with pylibjpeg-libjpeg / -openjpeg, or
python-gdcm); without one the file is listed as unreadable with the plugin to install. RLE and
deflated files decode with pydicom alone.

Grayscale (MONOCHROME1/2), in DICOM's order (PS3.3 C.11): the Modality LUT (rescale slope/intercept:
CT in Hounsfield units), then the window, ``data.dicom_window``:

- ``auto``: the file's VOI LUT or its first window centre/width where it has one; otherwise 8-bit data
  as stored, and deeper data by their own min–max (as 16-bit PNGs are);
- ``minmax``: the image's own min–max, whatever the file says;
- ``C,W``: this centre and width (e.g. ``40,400``: CT soft tissue), for every file.

The linear window is DICOM's (C.11.2.1.2.1) mapped onto 0–255; MONOCHROME1 (0 = white) is inverted
after it. Colour: RGB as stored, YBR_* converted to RGB by pydicom, PALETTE COLOR through its lookup
table; deeper-than-8-bit colour is scaled by its maximum. Multi-frame files (``data.dicom_frames``):
``middle`` (default: a volume's central slice, a cine loop's middle frame), ``first``, or ``error``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# The setting's names live with the setting (config is the bottom layer and checks them at parse time).
from ..config.checks import DICOM_WINDOWS as WINDOWS

PLUGINS = (
    "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (JPEG, JPEG-LS, JPEG 2000) or python-gdcm"
)


def is_dicom(path: Path) -> bool:
    """A ``.dcm``/``.dicom`` suffix, or the "DICM" marker at byte 128 of a Part 10 file (many exports
    have no suffix at all)."""
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _pydicom() -> Any:
    try:
        import pydicom
    except ImportError:
        raise ValueError("a DICOM file, and pydicom is not installed: pip install 'lowshot[dicom]'") from None
    return pydicom


def read_dicom(path: Path, window: str = "auto", frames: str = "middle") -> np.ndarray:
    """One DICOM file → (H, W, C) uint8, C = 1 or 3. Raises ValueError with the reason (no pixel data, a
    missing decoder plugin, a truncated file, several frames under ``frames=error``)."""
    pydicom = _pydicom()
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as err:
        raise ValueError(f"not a readable DICOM file ({err})") from None
    if "PixelData" not in ds:
        kind = getattr(ds, "Modality", "") or str(getattr(ds, "SOPClassUID", "no SOP class"))
        raise ValueError(f"a DICOM file without an image ({kind}: e.g. a report, plan or structure set)")
    try:
        a = ds.pixel_array
    except (RuntimeError, NotImplementedError) as err:
        msg = str(err)
        if "plugin" in msg or "decompress" in msg or "missing" in msg:
            syntax = ds.file_meta.get("TransferSyntaxUID", "?")
            first = msg.splitlines()[0][:160]
            raise ValueError(
                f"compressed pixel data ({getattr(syntax, 'name', syntax)}) need a decoder plugin: {PLUGINS} "
                f"(pydicom: {first})"
            ) from None
        raise ValueError(f"cannot decode the pixel data ({msg[:200]})") from None
    except (ValueError, EOFError, OSError) as err:  # truncated or inconsistent pixel data
        raise ValueError(f"cannot decode the pixel data: {str(err)[:200]}") from None
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    colour = photometric not in ("MONOCHROME1", "MONOCHROME2")
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if n_frames > 1:
        if frames == "error":
            raise ValueError(f"{n_frames} frames (data.dicom_frames=error; middle or first picks one)")
        a = a[n_frames // 2 if frames == "middle" else 0]
    if photometric == "PALETTE COLOR":
        a = apply_color_lut(a, ds)
    if colour:
        a = np.asarray(a)
        if a.dtype != np.uint8:
            a = np.clip(a.astype(np.float64) / max(1.0, float(a.max())) * 255.0 + 0.5, 0, 255).astype(
                np.uint8
            )
        return np.ascontiguousarray(a[..., :3])
    raw = np.asarray(a)
    values = apply_modality_lut(raw, ds).astype(np.float64)
    bits = int(getattr(ds, "BitsStored", 8) or 8)
    has_window = "WindowCenter" in ds and "WindowWidth" in ds
    if window not in WINDOWS:
        c, w = (float(v) for v in window.split(","))
        out = _linear_window(values, c, w)
    elif window == "auto" and "VOILUTSequence" in ds:
        out = _minmax(apply_voi_lut(apply_modality_lut(raw, ds), ds).astype(np.float64))
    elif window == "auto" and has_window:
        c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)
        out = _linear_window(values, c, w)
    elif window == "auto" and bits <= 8 and values.min() >= 0 and values.max() <= 255:
        out = values
    else:
        out = _minmax(values)
    img = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    if photometric == "MONOCHROME1":  # 0 is white
        img = 255 - img
    return img[..., None]


def _first(v: Any) -> float:
    """A window value, or the first of several (DICOM allows a list of windows)."""
    try:
        return float(v[0])
    except TypeError:
        return float(v)


def _linear_window(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """DICOM's linear VOI function (PS3.3 C.11.2.1.2.1) onto [0, 255]."""
    if w <= 1:
        return np.where(x <= c - 0.5, 0.0, 255.0)
    return np.clip(((x - (c - 0.5)) / (w - 1) + 0.5) * 255.0, 0.0, 255.0)


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / max(hi - lo, 1e-6) * 255.0


def dicom_group(path: Path) -> str:
    """The patient (PatientID), else the study (StudyInstanceUID), of a DICOM file; "" if it has neither
    or cannot be read (the header only: pixel data are not read)."""
    pydicom = _pydicom()
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID", "StudyInstanceUID"])
    except Exception:
        return ""
    return str(getattr(ds, "PatientID", "") or getattr(ds, "StudyInstanceUID", "") or "")
