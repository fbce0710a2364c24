"""Writing the converter's shards into the output folder: each under a
temporary name first (``Temporaries``, all removed when the run fails), then
made visible together once every shard is complete (``publish_shards``)."""

from __future__ import annotations

import dataclasses
import os
import re

import tensorflow as tf

from data_pipeline import record_format
from data_pipeline.manifest import MANIFEST
from data_pipeline.shard_plan import SHARD_NAME, shard_files

COMPRESSION_LEVEL = 1  # zlib level: files ~7% larger than level 6, written ~3x faster


def tmp_name(name):
    return f".tmp-{name}.partial"  # hidden, and not matched by *.tfrecord


def case_tmp_name(index):
    return f".tmp-case-{index:06d}.partial"  # --skip_bad: one checked case, before its shard


# What tmp_name and case_tmp_name name.
_TMP_RE = re.compile(rf"^\.tmp-({SHARD_NAME}|case-\d+)\.partial$")


def read_record(path):
    """The one record of a file case_tmp_name names."""
    return next(iter(tf.data.TFRecordDataset(path, record_format.COMPRESSION))).numpy()


@dataclasses.dataclass
class Temporaries:
    """This run's temporary files in the output folder, all removed (and the
    folder, if this run made it and it is left empty) when the run fails."""

    folder: str
    created: bool
    paths: list = dataclasses.field(default_factory=list)

    @classmethod
    def open(cls, folder):
        """Makes the folder if needed and removes an interrupted run's
        temporaries there, and only those."""
        created = not os.path.exists(folder)
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(folder):
            if _TMP_RE.match(name):
                os.remove(os.path.join(folder, name))
        return cls(folder, created)

    def writer(self, name):
        """A TFRecordWriter of the temporary file ``name`` (recorded first)."""
        path = os.path.join(self.folder, name)
        self.paths.append(path)
        options = tf.io.TFRecordOptions(
            compression_type=record_format.COMPRESSION, compression_level=COMPRESSION_LEVEL
        )
        return tf.io.TFRecordWriter(path, options)

    def remove(self):
        for tmp in self.paths:
            if os.path.exists(tmp):
                os.remove(tmp)
        if self.created and not os.listdir(self.folder):
            os.rmdir(self.folder)


def write_shards(plan, cases_of, release, temporaries):
    """Writes each shard of the plan under its temporary name; returns
    (the manifest's shard entries, without sizes, and case records)."""
    shards, records = [], []
    for name, fold, members in plan:
        with temporaries.writer(tmp_name(name)) as writer:
            for _case, (record, case_record) in cases_of(members):
                writer.write(record)
                records.append(dict(case_record, fold=fold, shard=name))
        shards.append(
            {
                "file": name,
                "fold": fold,
                "cases": [c.case_id for c in members],
                "num_examples": len(members),
            }
        )
        if release is not None:
            release(members)
    return shards, records


def publish_shards(output_dir, shards):
    """Every shard is complete: retires an old manifest, makes the shards
    visible, drops stale ones and records each shard's size."""
    manifest_path = os.path.join(output_dir, MANIFEST)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)
    names = {s["file"] for s in shards}
    for name in shard_files(output_dir):  # an earlier conversion's (overwrite, checked above)
        if name not in names:
            os.remove(os.path.join(output_dir, name))
    for name in sorted(names):
        os.replace(os.path.join(output_dir, tmp_name(name)), os.path.join(output_dir, name))
    for shard in shards:  # lets readers spot a truncated or replaced shard without reading it
        shard["bytes"] = os.path.getsize(os.path.join(output_dir, shard["file"]))
