"""Where decoded stores and embeddings are cached: outside the (read-only) data folder."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..config import DataConfig


def cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else Path.home() / ".cache" / "lowshot"


def store_cache_file(files: list[Path], name: str, cfg: DataConfig) -> Path:
    h = hashlib.sha1(f"v2|{cfg.size}".encode())
    for f in files:
        st = f.stat() if f.exists() else None
        h.update(f"{f.resolve()}|{st.st_size if st else -1}|{st.st_mtime_ns if st else -1}\n".encode())
    return cache_root(cfg) / "stores" / f"{name}-{cfg.size}px-{h.hexdigest()[:16]}.npz"


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename, so that a kill
    at any moment leaves the old file or the new one, never half of one (the process id keeps two
    writers' temporaries apart)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
