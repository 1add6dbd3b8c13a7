"""Where decoded stores and embeddings are cached: outside the (read-only) data folder."""

from __future__ import annotations

import hashlib
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
