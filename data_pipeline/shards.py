"""Reading shard files, and saying which one (and which case) cannot be read.

A shard that cannot be read (corrupt in place, truncated) fails a dataset
with TensorFlow's words, which name neither the file nor the case:
``find_unreadable_shard`` reads each shard once to say which (train.py
after such an error), and ``shard_error`` words it for readers that read one
file at a time (evaluate.py).
"""

import re

import tensorflow as tf

from data_pipeline import record_format

READ_BUFFER = 8 << 20  # bytes of a TFRecordDataset's read buffer; records are MBs


class ShardError(ValueError):
    """A shard that cannot be read; str() is one line naming the file, and the
    case where the manifest says which case the record that fails holds."""


def tf_error_text(error: Exception) -> str:
    """A TensorFlow error's first line in its own words, without the function
    and op names that TensorFlow wraps around them."""
    lines = str(getattr(error, "message", None) or error).strip().splitlines()
    text = lines[0] if lines else ""
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)
    text = re.sub(r"\s*\[Op:[^\]]*\].*$", "", text)
    return text.strip() or type(error).__name__


def shard_error(file, index: int, cases, error: Exception) -> ShardError:
    """The ShardError of reading ``file`` failing at its record ``index``
    (0-based: the records before it were read) with ``error``.

    Args:
      cases: the case ids the manifest lists for the shard, in the order
        written (None or not a list: unknown); names the case of that record.
    """
    if isinstance(cases, list) and index < len(cases):
        where = f"record {index + 1} of {len(cases)} (case {cases[index]})"
    elif isinstance(cases, list):
        where = f"after its {len(cases)} record(s)"
    else:
        where = f"record {index + 1}"
    return ShardError(
        f"shard {file}: cannot read {where}: {tf_error_text(error)}; the file is "
        f"corrupt or truncated: convert the data again"
    )


def read_shard(file, cases=None) -> int:
    """Reads every record of one shard once (decompressed and checked, not
    parsed); returns how many. Raises ShardError (``shard_error``)."""
    index = 0
    try:
        for _ in tf.data.TFRecordDataset(str(file), record_format.COMPRESSION, READ_BUFFER):
            index += 1
    except tf.errors.OpError as e:
        raise shard_error(file, index, cases, e) from None
    return index


def find_unreadable_shard(files, cases_of: dict | None = None) -> ShardError | None:
    """The ShardError of the first of ``files`` that cannot be read (each read
    once, in order; ``cases_of``: file -> its case ids from the manifest), or
    None when every one reads. For after a dataset over them failed: it costs
    one read of the data."""
    for file in files:
        try:
            read_shard(file, (cases_of or {}).get(str(file)))
        except ShardError as e:
            return e
    return None
