"""The decoded store: images, labels, splits and groups of one source, with the test split as a lockbox."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from .decode import fingerprints

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Bad or missing input data; the message names the file and the fix."""


class LockboxError(RuntimeError):
    """The test split was read while sealed, i.e. before model selection had finished."""


@dataclass
class Store:
    """Decoded images with labels, splits and groups.

    images: (N, H, W, C) uint8, C in {1, 3}; labels: (N,) int64; split, groups, paths: (N,) str.
    """

    images: np.ndarray
    labels: np.ndarray
    split: np.ndarray
    groups: np.ndarray
    paths: np.ndarray
    classes: list[str]
    name: str
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason) not decoded
    source_groups: np.ndarray | None = None  # the source's own groups, before duplicates were merged
    # Of each image at its native resolution, taken when decoding: (N, 64) dHash bits, (N,) pixel SHA-1.
    hashes: np.ndarray | None = None
    digests: np.ndarray | None = None
    # (N, 32, 32) uint8 grayscale thumbnails of the native images for the copy search (data.copies), taken
    # when decoding, so the duplicate verification and its cache do not depend on data.size
    thumbs: np.ndarray | None = None
    sealed: bool = False  # True: the test rows cannot be read (see seal / unseal)
    test_reads: int = 0  # how often the test split was unsealed in this process

    @property
    def grayscale(self) -> bool:
        return self.images.shape[-1] == 1

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def indices(self, *splits: str) -> np.ndarray:
        """Store rows in any of ``splits`` ('train', 'val', 'test', 'unlabelled')."""
        if self.sealed and "test" in splits:
            raise LockboxError(
                "the test split is sealed: epochs, learning rates and probe strengths must be chosen on "
                "train/val only. Read it once, after selection, through Store.unseal()."
            )
        return np.flatnonzero(np.isin(self.split, splits))

    def fingerprints(self) -> tuple[np.ndarray, np.ndarray]:
        """(N, 64) dHash bits and (N,) pixel digests of the native images (of the store images if the
        source gave none)."""
        if self.hashes is None or self.digests is None:
            self.hashes, self.digests = fingerprints(list(self.images))
        return self.hashes, self.digests

    def seal(self) -> None:
        """Lock the test split until :meth:`unseal` (call before any model selection)."""
        self.sealed = True

    def unseal(self) -> np.ndarray:
        """Open the test split for the final evaluation; returns its rows. Counted in ``test_reads``."""
        self.sealed = False
        self.test_reads += 1
        return self.indices("test")

    def test_digest(self) -> str:
        """SHA-1 of the test images (their native-pixel digests: the same at any data.size) and labels:
        which lockbox a ledger entry refers to."""
        return self.split_digests()["test"]

    def split_digests(self) -> dict[str, str]:
        """Per split (train, val, test, and 'unlabelled' where a label budget made one), the SHA-1 of its
        images' native-pixel digests and labels, in store order: which images a number was made on. Two
        runs whose digests agree saw the same split; where they differ, a difference in their numbers
        may be the split's (a changed grouping, another split_seed) rather than the training's. Reads no
        test pixels beyond the fingerprints the duplicate check already took."""
        digests = self.fingerprints()[1]
        out = {}
        for s in (*SPLITS, "unlabelled"):
            rows = np.flatnonzero(self.split == s)
            if s == "unlabelled" and not len(rows):
                continue
            h = hashlib.sha1("".join(str(d) for d in digests[rows]).encode())
            h.update(np.ascontiguousarray(self.labels[rows]).data)
            out[s] = h.hexdigest()[:16]
        return out

    def counts(self) -> dict[str, list[int]]:
        """Images per class in each split, e.g. ``{'train': [147, 399], ...}``."""
        return {
            s: np.bincount(self.labels[self.split == s], minlength=self.num_classes).tolist() for s in SPLITS
        }

    def describe(self) -> str:
        c = self.counts()
        h, w, ch = self.images.shape[1:]
        parts = [f"{s} {sum(c[s])} {c[s]}" for s in SPLITS]
        return f"{self.name}: {len(self.labels)} images {h}x{w}x{ch}, classes {self.classes}; " + ", ".join(
            parts
        )


# ----------------------------------------------------------------------------------------------- sources
