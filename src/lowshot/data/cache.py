"""Where decoded stores and embeddings are cached: outside the (read-only) data folder."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..config import DataConfig


def cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else Path.home() / ".cache" / "lowshot"


def store_cache_file(files: list[Path], name: str, cfg: DataConfig) -> Path:
    """The decoded store's cache file, keyed by the working size, the DICOM settings and every file's path
    and *content* (sha1 of its bytes): an edit that keeps the size and modification time still gives a new
    key. Hashing a labelled set's files is cheap next to decoding them (the pool keys by stat, see pool)."""
    h = hashlib.sha1(f"v4|{cfg.size}{dicom_key(cfg)}".encode())  # v4: with thumbs
    for f in files:
        try:
            with open(f, "rb") as fh:
                digest = hashlib.file_digest(fh, "sha1").hexdigest()
        except OSError:
            digest = "unreadable"
        h.update(f"{f.resolve()}|{digest}\n".encode())
    return cache_root(cfg) / "stores" / f"{name}-{cfg.size}px-{h.hexdigest()[:16]}.npz"


def dicom_key(cfg: DataConfig) -> str:
    """The DICOM decoding settings' part of a cache key: empty at the defaults, so caches made before these
    settings existed stay valid."""
    if (cfg.dicom_window, cfg.dicom_frames) == ("auto", "middle"):
        return ""
    return f"|dicom:{cfg.dicom_window}:{cfg.dicom_frames}"


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename, so that a kill
    at any moment leaves the old file or the new one, never half of one (the process id keeps two
    writers' temporaries apart)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def save_npz_atomic(path: Path, **arrays: np.ndarray) -> Path:
    """``np.savez_compressed`` (no pickles) through a temporary file and a rename, like ``write_atomic``:
    a run killed while saving its predictions leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")  # savez adds .npz to other names
    np.savez_compressed(tmp, allow_pickle=False, **arrays)
    os.replace(tmp, path)
    return path


def save_safetensors_atomic(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """``safetensors.torch.save_file`` (contiguous CPU tensors) through a temporary file and a rename, like
    ``write_atomic``: a kill while saving weights, embeddings or a probe leaves the old file or the new
    one (process id and a random suffix keep concurrent writers' temporaries apart)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path
