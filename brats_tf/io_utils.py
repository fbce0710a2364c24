"""Atomic file writes: a hidden temporary name in the same folder, then a rename,
so that a reader (or a crash) never sees a half-written file."""

from __future__ import annotations

import json
import os


def write_text_atomic(path, text: str) -> None:
    """Writes ``text`` to ``path`` through ``.<name>.tmp`` and os.replace."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json_atomic(path, payload, indent: int = 2) -> None:
    """JSON (sorted keys) written atomically."""
    write_text_atomic(path, json.dumps(payload, indent=indent, sort_keys=True))
