"""The configuration reference (docs/configuration.md), generated from the dataclasses in
``lowshot.config``: every setting with its default and the comment written beside it in the source, the
one place the settings are explained. ``python -m lowshot.configdoc > docs/configuration.md``; a test
fails when the page is stale or a setting has no comment."""

from __future__ import annotations

import json
from dataclasses import fields, is_dataclass
from typing import get_type_hints

from .config import Config, to_dict
from .config.notes import field_notes


def reference_markdown() -> str:
    """docs/configuration.md: every setting with its default and its comment, section by section."""
    out = [
        "# Configuration reference",
        "",
        "Generated from the dataclasses in `src/lowshot/config/schema.py` by `python -m lowshot.configdoc > "
        "docs/configuration.md` (a test fails when this page is stale). One source of truth: dataclass "
        "defaults < `--config FILE.yaml` < `$LOWSHOT_DATA_ROOT` / `$LOWSHOT_CACHE` < `key=value` on the command "
        "line; an unknown key or a wrong type stops a run before it starts, naming the closest key.",
        "",
    ]
    hints = get_type_hints(Config)  # the annotations are strings (from __future__ import annotations)
    sections = [("", Config)] + [
        (f.name, hints[f.name]) for f in fields(Config) if is_dataclass(hints[f.name])
    ]
    for name, cls in sections:
        notes = field_notes(cls)
        out += [f"## {name or 'top level'}", "", "| key | default | meaning |", "|---|---|---|"]
        for f in fields(cls):
            if f.name in hints and cls is Config and is_dataclass(hints[f.name]):
                continue
            default = to_dict(cls())[f.name]
            key = f"{name}.{f.name}" if name else f.name
            note = notes.get(f.name, "").replace("|", "\\|")
            out.append(f"| `{key}` | `{json.dumps(default)}` | {note} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(reference_markdown())
