"""DICOM in: pydicom's own bundled test files (windowing, rescale, colour spaces, palettes, RLE,
multi-frame, compressed without a plugin, truncated, no pixel data) and a DICOM folder written from
real BUSI ultrasound images with patient IDs (patient-level splits without a CSV)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom  # the [dicom] extra; dev installs it
import pytest
from pydicom.data import get_testdata_file

from lowshot.check import check_command
from lowshot.config import ConfigError, DataConfig
from lowshot.data import decode_image, load_store
from lowshot.data.dicom import read_dicom


def write_dicom(path: Path, a: np.ndarray, patient: str = "P0", photometric: str | None = None) -> Path:
    """(H, W, 1 | 3) uint8 as an uncompressed Secondary Capture file (explicit VR little endian)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.StudyInstanceUID, ds.Modality = patient, generate_uid(), "US"
    ds.Rows, ds.Columns = a.shape[:2]
    ds.SamplesPerPixel = a.shape[2]
    ds.PhotometricInterpretation = photometric or ("MONOCHROME2" if a.shape[2] == 1 else "RGB")
    if a.shape[2] == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(a).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_ct_rescale_and_an_explicit_window() -> None:
    """CT_small: int16 stored values, slope 1 / intercept -1024 → Hounsfield units, then DICOM's linear
    window (centre 40, width 400: soft tissue) onto 0-255."""
    f = Path(get_testdata_file("CT_small.dcm"))
    ds = pydicom.dcmread(f)
    hu = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    want = np.clip(((hu - 39.5) / 399 + 0.5) * 255, 0, 255)
    got = read_dicom(f, "40,400")
    assert got.shape == (128, 128, 1) and got.dtype == np.uint8
    assert np.abs(got[..., 0].astype(float) - want).max() <= 0.5 + 1e-9
    auto = read_dicom(f)  # no window in the file: 16-bit data by their own min-max
    assert auto.min() == 0 and auto.max() == 255


def test_the_files_own_window_and_minmax() -> None:
    f = Path(get_testdata_file("MR_small.dcm"))
    ds = pydicom.dcmread(f)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    np.testing.assert_array_equal(read_dicom(f, "auto"), read_dicom(f, f"{c},{w}"))
    assert not np.array_equal(read_dicom(f, "auto"), read_dicom(f, "minmax"))
    # RLE Lossless decodes with pydicom alone, to the same pixels
    np.testing.assert_array_equal(read_dicom(Path(get_testdata_file("MR_small_RLE.dcm"))), read_dicom(f))


def test_colour_spaces_palettes_and_frames() -> None:
    from pydicom.pixels import pixel_array

    f = get_testdata_file("examples_ybr_color.dcm")  # YBR_FULL_422, 30 frames
    ybr = read_dicom(Path(f), frames="first")
    assert ybr.shape == (240, 320, 3)
    np.testing.assert_array_equal(ybr, pixel_array(f, as_rgb=True)[0])  # converted to RGB ...
    assert np.abs(ybr.astype(int) - pixel_array(f, as_rgb=False)[0]).mean() > 20  # ... not the raw YBR
    assert read_dicom(Path(get_testdata_file("examples_rgb_color.dcm"))).shape == (240, 320, 3)
    pal = read_dicom(Path(get_testdata_file("examples_palette.dcm")))
    assert pal.shape == (350, 800, 3) and len(np.unique(pal.reshape(-1, 3), axis=0)) > 10
    two = Path(get_testdata_file("SC_rgb_rle_2frame.dcm"))
    ds = pydicom.dcmread(two)
    np.testing.assert_array_equal(read_dicom(two, frames="first"), ds.pixel_array[0])
    np.testing.assert_array_equal(read_dicom(two, frames="middle"), ds.pixel_array[1])
    with pytest.raises(ValueError, match="2 frames"):
        read_dicom(two, frames="error")


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("MR_small_jpeg_ls_lossless.dcm", "need a decoder plugin: pip install pylibjpeg"),
        ("MR_truncated.dcm", "cannot decode the pixel data"),
        ("rtplan.dcm", "without an image"),
    ],
)
def test_what_cannot_be_read_says_why(name: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        read_dicom(Path(get_testdata_file(name)))


def test_monochrome1_is_inverted(busi: Path, tmp_path: Path) -> None:
    """A real ultrasound image stored as MONOCHROME1 (0 = white, inverted values) decodes to the image."""
    png = sorted((busi / "benign").glob("*.png"))[0]
    a = decode_image(png, 0)
    assert a.shape[2] == 1
    f = write_dicom(tmp_path / "inv.dcm", 255 - a, photometric="MONOCHROME1")
    np.testing.assert_array_equal(decode_image(f, 0), a)


def test_a_dicom_folder_gets_patient_level_splits(busi: Path, tmp_path: Path) -> None:
    """BUSI images written as DICOM (some without a suffix, as PACS exports come), two images per patient:
    the store's pixels are the PNGs', PatientID groups the splits, unreadable files are listed."""
    root = tmp_path / "dicom"
    want = {}
    for c in ("benign", "malignant", "normal"):
        (root / c).mkdir(parents=True)
        gray = [p for p in sorted((busi / c).glob("*.png")) if decode_image(p, 0).shape[2] == 1][:24]
        for i, p in enumerate(gray):
            name = f"{c}_{i:02d}" + (".dcm" if i % 2 else "")  # half the files without a suffix
            write_dicom(root / c / name, decode_image(p, 0), patient=f"{c}-patient{i // 2}")
            want[name] = decode_image(p, 32)
    (root / "benign" / "plan.dcm").write_bytes(Path(get_testdata_file("rtplan.dcm")).read_bytes())
    cfg = DataConfig(root=str(tmp_path), source="dicom", cache_dir=str(tmp_path / "cache"), size=32)
    store = load_store(cfg)
    assert len(store.labels) == 72 and store.classes == ["benign", "malignant", "normal"]
    for img, path in zip(store.images, store.paths, strict=True):
        np.testing.assert_array_equal(img, want[Path(path).name])
    assert any("plan.dcm" in f and "without an image" in why for f, why in store.skipped)
    assert store.source_groups is not None  # the patients, before verified duplicates were merged in
    patients = {g: set(store.split[store.source_groups == g]) for g in np.unique(store.source_groups)}
    assert len(patients) == 36 and all(len(s) == 1 for s in patients.values())  # no patient in two splits
    assert set(store.split) == {"train", "val", "test"}
    # `lowshot check` reads the same folder (issue 41: it opened every file with PIL)
    out = tmp_path / "checks"
    args = [
        f"data.root={tmp_path}",
        "data.source=dicom",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.size=32",
    ]
    assert check_command([*args, f"out_dir={out}", "name=c", "--warn-only"]) in (0, 1)
    assert json.loads((out / "c" / "report.json").read_text())["images"] == 72


def test_bad_dicom_settings_fail_with_the_key() -> None:
    with pytest.raises(ConfigError, match=r"data\.dicom_window"):
        DataConfig(dicom_window="soft tissue")
    with pytest.raises(ConfigError, match=r"data\.dicom_frames"):
        DataConfig(dicom_frames="all")
