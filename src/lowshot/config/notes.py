"""Each setting's meaning, read from the comment written beside its field in :mod:`.schema` (the one place
the settings are explained): for ``--help`` and for the generated docs/configuration.md."""

from __future__ import annotations

import inspect
import re
from dataclasses import fields, is_dataclass
from typing import get_type_hints

from .schema import Config


def field_notes(cls: type) -> dict[str, str]:
    """Each field's comment in ``cls``'s source: the ``#`` lines above it and the one after it, joined
    (the one place the settings are explained; the configuration reference is generated from it)."""
    notes: dict[str, str] = {}
    above: list[str] = []
    current = ""
    for line in inspect.getsource(cls).splitlines()[1:]:
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("# ").rstrip())
        elif m := re.match(r"(\w+): [^=]+=.*?(?:#\s*(.*))?$", text):
            current = m.group(1)
            notes[current] = " ".join([*above, m.group(2) or ""]).strip()
            above = []
        elif text.startswith("def "):
            break
        elif current and "  # " in text:  # a comment on a field's continuation line
            notes[current] = (notes[current] + " " + text.split("  # ", 1)[1]).strip()
            above = []
    return notes


def setting_notes() -> dict[str, str]:
    """``{"section.key": meaning}`` for every setting of :class:`Config`."""
    hints = get_type_hints(Config)  # the annotations are strings (from __future__ import annotations)
    out = {k: v for k, v in field_notes(Config).items() if not is_dataclass(hints.get(k))}
    for f in fields(Config):
        if is_dataclass(hints[f.name]):
            out |= {f"{f.name}.{k}": v for k, v in field_notes(hints[f.name]).items()}
    return out
