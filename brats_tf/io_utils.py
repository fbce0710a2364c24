"""Atomic writes: a hidden temporary name in the same folder, then a rename,
so that a reader (or a crash) never sees a half-written file or folder.

``atomic_path`` is the one implementation: every file or folder this project
writes for others to read (JSON, CSV, NIfTI, PNG, .keras, SavedModels,
evaluation folders) goes through it. The converter's shards are the one
exception: they are renamed together, once every case is written
(``data_pipeline.convert``)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pathlib
import shutil
import tempfile
import uuid
from typing import Iterator


def umask() -> int:
    """The process's file mode creation mask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _replace_folder(tmp: pathlib.Path, path: pathlib.Path) -> None:
    """Renames the folder ``tmp`` to ``path``, which exists: ``path`` is moved
    aside first (put back if the rename fails), then deleted."""
    old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    _remove(old)


@contextlib.contextmanager
def atomic_path(path, suffix: str = "", directory: bool = False) -> Iterator[pathlib.Path]:
    """Yields a new, hidden temporary path beside ``path`` to write instead:
    an empty file (``.<name>.<random>.tmp<suffix>``) or, with ``directory``,
    an empty folder (``.<name>.tmp-<random><suffix>``).

    When the block ends without an error, the temporary gets the permissions
    of a file (folder) created normally, 0666 (0777) less the umask (not
    tempfile's 0600 / 0700), and is renamed to ``path`` (os.replace): an
    existing file is replaced; with ``directory``, an existing ``path`` is
    moved aside, then deleted (put back if the rename fails). When the block
    raises, the temporary is removed and the error goes on. ``path``'s folder
    must exist.

    Args:
      path: the file or folder to write.
      suffix: the temporary name's ending, for writers that choose a format
        by it (nibabel compresses a ".nii.gz", Keras saves only to ".keras").
      directory: make the temporary a folder.
    """
    path = pathlib.Path(path)
    folder = str(path.parent)
    if directory:
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", suffix=suffix,
                                            dir=folder))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=folder)
        os.close(fd)
        tmp = pathlib.Path(name)
    try:
        yield tmp
        os.chmod(tmp, (0o777 if directory else 0o666) & ~umask())
        if directory and os.path.lexists(path):
            _replace_folder(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_text_atomic(path, text: str) -> None:
    """Writes ``text`` to ``path`` atomically (``atomic_path``)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_json_atomic(path, payload, indent: int = 2) -> None:
    """JSON (sorted keys) written atomically."""
    write_text_atomic(path, json.dumps(payload, indent=indent, sort_keys=True))


def expand_pattern(path) -> list[str]:
    """A path with shell wildcards (``*``, ``?``, ``[``) -> its matches, sorted
    ([] if none); a path without them -> [path]."""
    path = str(path)
    if not any(c in path for c in "*?["):
        return [path]
    return sorted(glob.glob(path))
