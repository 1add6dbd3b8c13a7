"""The checks a setting's value must pass where it is made (``__post_init__`` of :mod:`.schema`), the
error they raise, and the names of the DICOM options (read by :mod:`lowshot.data.dicom`)."""

from __future__ import annotations

import math

DICOM_WINDOWS = ("auto", "minmax")  # or "C,W"
DICOM_FRAMES = ("middle", "first", "error")


class ConfigError(ValueError):
    """A bad config file, key or value; the message names it and says how to fix it."""


def check_dicom_options(window: str, frames: str) -> None:
    """``data.dicom_window`` is auto, minmax or ``CENTRE,WIDTH`` with a width > 0 (read by
    :func:`lowshot.data.dicom.read_dicom`); ``data.dicom_frames`` one of :data:`DICOM_FRAMES`."""
    if window not in DICOM_WINDOWS:
        try:
            _, w = (float(v) for v in window.split(","))
        except ValueError:
            raise ConfigError(
                f"data.dicom_window={window!r}: use auto, minmax or CENTRE,WIDTH (e.g. 40,400)"
            ) from None
        if w <= 0:
            raise ConfigError(f"data.dicom_window={window!r}: the width must be > 0")
    if frames not in DICOM_FRAMES:
        raise ConfigError(f"data.dicom_frames={frames!r}: use one of {DICOM_FRAMES}")


def check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    """``value`` is one of ``allowed``, or a ConfigError names the key and the choices."""
    if value not in allowed:
        raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(allowed)}")


def check_positive(section: str, **values: int) -> None:
    """Each of ``values`` (counts: epochs, batch sizes, ...) is at least 1."""
    for k, v in values.items():
        if v < 1:
            raise ConfigError(f"config key '{section}.{k}': {v} must be at least 1")


def check_rate(section: str, lr: float, weight_decay: float) -> None:
    """A learning rate is finite and > 0, a weight decay finite and >= 0: refused when the settings are
    read, not as a torch error after the data have loaded (issue 41). A huge lr stays allowed: the
    divergence guard stops such a run with its own message."""
    if not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"config key '{section}.lr': {lr} must be a number > 0 (e.g. {section}.lr=1e-3)")
    if not math.isfinite(weight_decay) or weight_decay < 0:
        raise ConfigError(f"config key '{section}.weight_decay': {weight_decay} must be a number >= 0")
