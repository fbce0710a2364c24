"""Atomic writes: a hidden temporary name in the same folder, then a rename,
so that a reader (or a crash) never sees a half-written file or folder.

``atomic_path`` is the one implementation: every file or folder this project
writes for others to read (JSON, CSV, NIfTI, PNG, .keras, SavedModels)
goes through it; ``stale_temporaries`` finds what a write killed before its
rename left. The converter's shards are one exception: they are renamed
together, once every case is written (``data_pipeline.shard_writer.publish_shards``); an
evaluation's folder another: it is filled under a name of its own (from
which an interrupted evaluation resumes), then renamed (``replace_folder``)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pathlib
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator

# tempfile's random part of a name: 8 of these characters.
_RANDOM = "[a-z0-9_]{8}"


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


def replace_folder(tmp, path) -> None:
    """Renames the folder ``tmp`` to ``path``. An existing ``path`` is moved
    aside first (put back if the rename fails), then deleted."""
    tmp, path = pathlib.Path(tmp), pathlib.Path(path)
    if not os.path.lexists(path):
        os.replace(tmp, path)
        return
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
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", suffix=suffix, dir=folder))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=folder)
        os.close(fd)
        tmp = pathlib.Path(name)
    try:
        yield tmp
        os.chmod(tmp, (0o777 if directory else 0o666) & ~umask())
        if directory:
            replace_folder(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def stale_temporaries(path, suffix: str = "", directory: bool = False) -> list[pathlib.Path]:
    """The temporaries ``atomic_path(path, suffix, directory)`` makes, that
    are there beside ``path`` now: those of a write killed before its rename
    (or of one under way). Only names of exactly that pattern, and only
    folders (``directory``) or files, never links; sorted."""
    path = pathlib.Path(path)
    name, end = re.escape(path.name), re.escape(suffix)
    pattern = re.compile(
        rf"^\.{name}\.tmp-{_RANDOM}{end}$" if directory else rf"^\.{name}\.{_RANDOM}\.tmp{end}$"
    )
    folder = path.parent
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if pattern.match(p.name)
        and not p.is_symlink()
        and (p.is_dir() if directory else p.is_file())
    )


def remove_path(path) -> None:
    """Removes a file, or a folder and everything in it."""
    _remove(pathlib.Path(path))


def write_text_atomic(path, text: str) -> None:
    """Writes ``text`` to ``path`` atomically (``atomic_path``)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def update_text(path, text: str) -> bool:
    """Writes ``text`` to ``path`` atomically unless the file holds exactly
    that already (then it is left as it is, its time stamps too); returns
    whether it wrote."""
    try:
        with open(path) as f:
            if f.read() == text:
                return False
    except (OSError, UnicodeDecodeError):
        pass
    write_text_atomic(path, text)
    return True


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
