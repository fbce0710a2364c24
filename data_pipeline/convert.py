"""BraTS NIfTI -> GZIP TFRecord shards plus manifest.json (the offline half of the data).

    python -m data_pipeline.convert --input_dir data/synthetic --output_dir data/tfrecord
    python -m data_pipeline.convert --input_dir MICCAI_BraTS_2018_Data_Training \\
        --output_dir data/brats18 --folds 5 --seed 0 --skip_bad

Finds the cases (data_pipeline.layouts), checks each one (all four modalities
present, identical shapes and affines, finite values, labels in the expected
set), crops it to the bounding box of its non-zero voxels and writes one
tf.train.Example per case (data_pipeline.features). Cases are split into
`folds` folds by case (stratified by HGG/LGG grade when known, seeded); each
shard holds cases of one fold only, so fold k's validation set is its shards:
`brats-fold<k>-<i>-of-<n>.tfrecord` (GZIP-compressed TFRecord).

Nothing half-written: shards are written under hidden temporary names and
renamed only once every case is written, then manifest.json (also renamed into
place). A bad case stops the conversion with a one-line error naming the case
and the file and removes this run's temporary files, unless --skip_bad, which
skips it and lists it at the end and in the manifest (and warns of a fold
left without cases: manifest "empty_folds"). With --skip_bad every case is
read and checked (each written to a temporary file of its own) before the
folds are dealt, so they are dealt over the cases kept: the shards are those
of a conversion of the good cases alone. A rerun, in this process or
another, writes the same bytes. Nothing it did not write is deleted: a folder
holding shards without manifest.json needs --overwrite, like a finished
conversion.

manifest.json records each shard's size; ``read_manifest`` (every reader's
way in) checks the version, the keys and the shards against it.
"""

import collections
import concurrent.futures
import dataclasses
import json
import math
import os
import re
import sys
import time

import nibabel as nib
import numpy as np
import tensorflow as tf
from absl import app, flags, logging
from tqdm import tqdm

from data_pipeline.constants import (
    LABEL_BACKGROUND, LABEL_ED, LABEL_ET, LABEL_ET_2023, LABEL_NCR_NET, LABEL_VALUES, MODALITIES)
from data_pipeline.io_utils import write_text_atomic
from data_pipeline.volume import nonzero_box
from data_pipeline import features, layouts
from data_pipeline.manifest import CONVERTER_VERSION, MANIFEST
from data_pipeline.manifest import fold_files, read_manifest  # noqa: F401  (documented as convert.* before manifest.py)

SHARD_PREFIX = "brats-fold"
COMPRESSION_LEVEL = 1  # zlib level: files ~7% larger than level 6, written ~3x faster
AFFINE_ATOL = 1e-4  # mm; "identical" affines up to header float noise
LABELS_2023 = (LABEL_BACKGROUND, LABEL_NCR_NET, LABEL_ED, LABEL_ET_2023)


class BadCaseError(ValueError):
    """A case failed a check; str() is one line naming the case and the file."""

    def __init__(self, case_id, path, problem):
        super().__init__(f"case {case_id}: file {path}: {problem}")
        self.case_id = case_id
        self.path = path


@dataclasses.dataclass
class LoadedCase:
    """A checked case, cropped to the bounding box of its non-zero voxels."""

    case: layouts.Case
    image: np.ndarray  # [d, h, w, 4] int16 or float32, MODALITIES order
    label: np.ndarray | None  # [d, h, w] uint8, LABEL_VALUES
    original_shape: tuple
    affine: np.ndarray
    box_start: tuple
    label_counts: dict | None


def _load_nifti(case_id, path):
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for broken files
        raise BadCaseError(case_id, path, f"cannot read NIfTI ({type(e).__name__}: {e})".replace("\n", " "))
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise BadCaseError(case_id, path, f"expected a 3-D volume, got shape {data.shape}")
    return data, img.affine


def check_files(case, require_label):
    """Cheap check before any data is read: every file is present."""
    for modality in case.missing:
        path = case.expected_path(modality)
        raise BadCaseError(case.case_id, path, f"missing {modality} file")
    if require_label and case.label is None:
        raise BadCaseError(case.case_id, case.expected_path(layouts.LABEL_SUFFIX),
                           "missing label file (other cases of this set have one)")


def _image_dtype(case_id, path, data):
    """int16 when lossless, else float32 (lossless for float32 NIfTI data)."""
    if np.issubdtype(data.dtype, np.integer) or np.array_equal(data, np.rint(data)):
        if data.size == 0 or (data.min() >= -32768 and data.max() <= 32767):
            return np.int16
    with np.errstate(over="ignore"):  # beyond float32's range: load_case says so
        rounded = data.dtype == np.float64 and not np.array_equal(data, data.astype(np.float32))
    if rounded:
        logging.warning("case %s: file %s: float64 intensities rounded to float32", case_id, path)
    return np.float32


def load_case(case, require_label):
    """Reads and checks one case. Raises BadCaseError (one line) on any problem."""
    check_files(case, require_label)
    cid = case.case_id
    arrays = []
    ref_path = case.images[MODALITIES[0]]
    ref_shape = ref_affine = None
    for modality in MODALITIES:
        path = case.images[modality]
        data, affine = _load_nifti(cid, path)
        if ref_shape is None:
            ref_shape, ref_affine = data.shape, affine
        elif data.shape != ref_shape:
            raise BadCaseError(cid, path, f"shape {data.shape} differs from {ref_shape} of {ref_path}")
        elif not np.allclose(affine, ref_affine, atol=AFFINE_ATOL, rtol=0):
            raise BadCaseError(cid, path, f"affine differs from that of {ref_path}: "
                               f"{np.round(affine, 4).tolist()} vs {np.round(ref_affine, 4).tolist()}")
        if not np.issubdtype(data.dtype, np.integer) and not np.isfinite(data).all():
            raise BadCaseError(cid, path, f"{int((~np.isfinite(data)).sum())} non-finite voxels")
        if not data.any():
            raise BadCaseError(cid, path, "all voxels are zero")
        arrays.append(data)
    dtypes = {_image_dtype(cid, case.images[m], a) for m, a in zip(MODALITIES, arrays)}
    dtype = np.float32 if np.float32 in dtypes else np.int16

    label = None
    if case.label is not None:
        path = case.label
        data, affine = _load_nifti(cid, path)
        if data.shape != ref_shape:
            raise BadCaseError(cid, path, f"shape {data.shape} differs from {ref_shape} of {ref_path}")
        if not np.allclose(affine, ref_affine, atol=AFFINE_ATOL, rtol=0):
            raise BadCaseError(cid, path, f"affine differs from that of {ref_path}")
        if not np.issubdtype(data.dtype, np.integer) and not np.isfinite(data).all():
            raise BadCaseError(cid, path, "non-finite label values")
        allowed = LABELS_2023 if case.naming == layouts.NAMING_2023 else LABEL_VALUES
        values = np.unique(data)
        bad = [v for v in values.tolist() if v not in allowed]
        if bad:
            raise BadCaseError(cid, path, f"label values {bad[:5]} not in {list(allowed)} "
                               f"({case.naming} naming)")
        label = data.astype(np.uint8)
        if case.naming == layouts.NAMING_2023:
            label[label == LABEL_ET_2023] = LABEL_ET

    start, stop = nonzero_box(arrays + ([label] if label is not None else []))
    box = tuple(slice(a, b) for a, b in zip(start, stop))
    channels = []
    for modality, array in zip(MODALITIES, arrays):
        with np.errstate(over="ignore"):
            channel = array[box].astype(dtype)
        if dtype == np.float32 and not np.isfinite(channel).all():
            # finite float64 values beyond float32's range become inf in the cast
            raise BadCaseError(cid, case.images[modality],
                               f"{int((~np.isfinite(channel)).sum())} voxels beyond float32's "
                               f"range (|value| > {float(np.finfo(np.float32).max):.4g})")
        channels.append(channel)
    image = np.stack(channels, axis=-1)
    counts = None
    if label is not None:
        label = np.ascontiguousarray(label[box])
        counts = {str(v): int((label == v).sum()) for v in LABEL_VALUES}
        counts[str(LABEL_BACKGROUND)] += int(np.prod(ref_shape)) - label.size  # outside the box
    return LoadedCase(case=case, image=image, label=label, original_shape=tuple(ref_shape),
                      affine=np.asarray(ref_affine, dtype=np.float64), box_start=start,
                      label_counts=counts)


def assign_folds(cases, folds, seed):
    """{case_id: fold}: cases shuffled with `seed` and dealt round-robin, grade by grade
    (HGG/LGG stay balanced across folds)."""
    rng = np.random.default_rng(seed)
    assignment = {}
    k = 0
    for grade in sorted({str(c.grade) for c in cases}):
        ids = sorted(c.case_id for c in cases if str(c.grade) == grade)
        for i in rng.permutation(len(ids)):
            assignment[ids[i]] = k % folds
            k += 1
    return assignment


def _plan_shards(cases, fold_of, cases_per_shard, seed):
    """[(shard file name, fold, [cases])], case order shuffled within each fold."""
    rng = np.random.default_rng([seed, 1])
    folds = sorted(set(fold_of.values()))
    plan = []
    for fold in folds:
        members = [c for c in cases if fold_of[c.case_id] == fold]
        members = [members[i] for i in rng.permutation(len(members))]
        n = max(1, math.ceil(len(members) / cases_per_shard))
        for i in range(n):
            name = f"{SHARD_PREFIX}{fold}-{i:03d}-of-{n:03d}{features.SHARD_SUFFIX}"
            plan.append((name, fold, members[i * cases_per_shard:(i + 1) * cases_per_shard]))
    return plan


def _tmp_name(name):
    return f".tmp-{name}.partial"  # hidden, and not matched by *.tfrecord


def _case_tmp_name(index):
    return f".tmp-case-{index:06d}.partial"  # --skip_bad: one checked case, before its shard


_SHARD_RE = re.compile(rf"^{SHARD_PREFIX}\d+-\d+-of-\d+{re.escape(features.SHARD_SUFFIX)}$")
_TMP_RE = re.compile(rf"^\.tmp-({SHARD_PREFIX}\d+-\d+-of-\d+"
                     rf"{re.escape(features.SHARD_SUFFIX)}|case-\d+)\.partial$")


def _shard_files(folder):
    """Names of the shard files (``_plan_shards``' names) in ``folder``, sorted."""
    if not os.path.isdir(folder):
        return []
    return sorted(n for n in os.listdir(folder) if _SHARD_RE.match(n))


def _ordered_parallel(fn, items, workers):
    """Yields (item, fn(item) or the exception), in order, at most 2*workers in flight."""
    if workers <= 1:
        for item in items:
            try:
                yield item, fn(item)
            except BadCaseError as e:
                yield item, e
        return
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending = []
        items = iter(items)
        while True:
            while len(pending) < 2 * workers:
                item = next(items, None)
                if item is None:
                    break
                pending.append((item, pool.submit(fn, item)))
            if not pending:
                return
            item, future = pending.pop(0)
            try:
                yield item, future.result()
            except BadCaseError as e:
                yield item, e


def _checked_cases(cases, require_label, workers):
    """Yields (case, (its serialized Example, its manifest record without
    fold and shard) or its BadCaseError), in order; `workers` threads read
    the NIfTI files."""
    for case, loaded in _ordered_parallel(lambda c: load_case(c, require_label), cases, workers):
        if isinstance(loaded, BadCaseError):
            yield case, loaded
            continue
        try:
            record = features.serialize_example(
                case.case_id, loaded.image, loaded.label, loaded.original_shape,
                loaded.affine, loaded.box_start)
        except ValueError as e:
            yield case, BadCaseError(case.case_id, case.folder,
                                     str(e).removeprefix(f"case {case.case_id}: "))
            continue
        yield case, (record, _case_record(loaded))


def _read_record(path):
    """The one record of a file _case_tmp_name names."""
    return next(iter(tf.data.TFRecordDataset(path, features.COMPRESSION))).numpy()


def convert(input_dir, output_dir, cases_per_shard=4, num_shards=None, folds=5, seed=0,
            skip_bad=False, overwrite=False, num_workers=2, progress=True):
    """Converts a folder of BraTS NIfTI cases; returns the manifest (a dict).

    Args:
      cases_per_shard: cases per shard file (within a fold).
      num_shards: if set, overrides cases_per_shard with ceil(num_cases / num_shards)
        (so about num_shards files in all).
      folds: number of cross-validation folds (1: no split).
      skip_bad: skip cases that fail a check (listed in the manifest) instead of
        stopping; the folds are dealt over the cases kept, once every case is checked.
      overwrite: replace an existing conversion (manifest.json) in output_dir.
      num_workers: threads reading NIfTI files.

    Raises:
      BadCaseError: a case failed a check (and not skip_bad); nothing is left written.
      ValueError: bad arguments, e.g. output_dir inside input_dir.
    """
    in_real = os.path.realpath(input_dir)
    out_real = os.path.realpath(output_dir)
    if out_real == in_real or out_real.startswith(in_real + os.sep):
        raise ValueError(f"output_dir {output_dir!r} is inside input_dir {input_dir!r}; "
                         "refusing to write next to the inputs")
    if cases_per_shard < 1 or (num_shards is not None and num_shards < 1) or folds < 1:
        raise ValueError(f"cases_per_shard ({cases_per_shard}), num_shards ({num_shards}) and "
                         f"folds ({folds}) must be >= 1")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"output_dir {output_dir!r} exists and is not a folder")
    manifest_path = os.path.join(output_dir, MANIFEST)
    if os.path.exists(manifest_path) and not overwrite:
        raise ValueError(f"{manifest_path} exists: a finished conversion is there "
                         "(pass overwrite / --overwrite to replace it)")
    shards_there = _shard_files(output_dir)
    if shards_there and not overwrite:
        raise ValueError(f"output_dir {output_dir!r} holds shards without {MANIFEST} "
                         f"({shards_there[0]}{', ...' if len(shards_there) > 1 else ''}): "
                         "pass overwrite / --overwrite to replace them, or choose another folder")

    start_time = time.time()
    cases = layouts.find_cases(input_dir)
    require_label = any(c.label is not None for c in cases)
    logging.info("found %d cases under %s (%s labels)", len(cases), input_dir,
                 "with" if require_label else "without")
    if folds > len(cases):
        raise ValueError(f"folds ({folds}) is more than the number of cases ({len(cases)})")

    # Cheap checks first: a missing file stops the run before any data is read.
    skipped = []
    good = []
    for case in cases:
        try:
            check_files(case, require_label)
            good.append(case)
        except BadCaseError as e:
            if not skip_bad:
                raise
            logging.warning("skipping: %s", e)
            skipped.append({"case_id": case.case_id, "error": str(e)})
    if not good:
        raise ValueError(f"every case under {input_dir!r} failed its checks (see the warnings)")

    created = not os.path.exists(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    for name in os.listdir(output_dir):  # an interrupted run's temporaries, and only those
        if _TMP_RE.match(name):
            os.remove(os.path.join(output_dir, name))
    options = tf.io.TFRecordOptions(compression_type=features.COMPRESSION,
                                    compression_level=COMPRESSION_LEVEL)
    written_tmp = []
    records = []
    shards = []
    bar = tqdm(total=len(good), desc="converting", unit="case", disable=not progress)
    try:
        if skip_bad:
            # Every case is read and checked before the folds are dealt, so that
            # they are dealt over the cases kept: each case goes to a temporary
            # file of its own first, and into its shard once the plan is made.
            kept, checked = [], {}
            for index, (case, result) in enumerate(_checked_cases(good, require_label,
                                                                  num_workers)):
                bar.update(1)
                if isinstance(result, BadCaseError):
                    logging.warning("skipping: %s", result)
                    skipped.append({"case_id": case.case_id, "error": str(result)})
                    continue
                tmp = os.path.join(output_dir, _case_tmp_name(index))
                written_tmp.append(tmp)
                with tf.io.TFRecordWriter(tmp, options) as writer:
                    writer.write(result[0])
                kept.append(case)
                checked[case.case_id] = (tmp, result[1])
            if not kept:
                raise ValueError(f"every case under {input_dir!r} failed its checks (see the "
                                 "warnings)")

            def cases_of(members):
                for case in members:
                    tmp, case_record = checked[case.case_id]
                    yield case, (_read_record(tmp), case_record)
        else:
            kept = good

            def cases_of(members):
                for case, result in _checked_cases(members, require_label, num_workers):
                    bar.update(1)
                    if isinstance(result, BadCaseError):
                        raise result
                    yield case, result
        if num_shards is not None:
            cases_per_shard = math.ceil(len(kept) / num_shards)
        plan = _plan_shards(kept, assign_folds(kept, folds, seed), cases_per_shard, seed)
        for name, fold, members in plan:
            tmp = os.path.join(output_dir, _tmp_name(name))
            written_tmp.append(tmp)
            with tf.io.TFRecordWriter(tmp, options) as writer:
                for case, (record, case_record) in cases_of(members):
                    writer.write(record)
                    records.append(dict(case_record, fold=fold, shard=name))
            shards.append({"file": name, "fold": fold, "cases": [c.case_id for c in members],
                           "num_examples": len(members)})
            if skip_bad:
                for case in members:
                    os.remove(checked[case.case_id][0])
    except BaseException:
        bar.close()
        for tmp in written_tmp:
            if os.path.exists(tmp):
                os.remove(tmp)
        if created and not os.listdir(output_dir):
            os.rmdir(output_dir)
        raise
    bar.close()

    # Every shard is complete: retire an old manifest, make the shards visible,
    # drop stale ones, then write the manifest.
    if os.path.exists(manifest_path):
        os.remove(manifest_path)
    names = {s["file"] for s in shards}
    for name in _shard_files(output_dir):  # an earlier conversion's (overwrite, checked above)
        if name not in names:
            os.remove(os.path.join(output_dir, name))
    for name in sorted(names):
        os.replace(os.path.join(output_dir, _tmp_name(name)), os.path.join(output_dir, name))
    for shard in shards:  # lets readers spot a truncated or replaced shard without reading it
        shard["bytes"] = os.path.getsize(os.path.join(output_dir, shard["file"]))
    counts = collections.Counter(r["fold"] for r in records)
    empty_folds = [k for k in range(folds) if not counts[k]]
    for k in empty_folds:
        logging.warning("fold %d has no case (its cases were skipped): train.py --fold=%d has "
                        "nothing to validate on", k, k)
    manifest = {
        "converter_version": CONVERTER_VERSION,
        "feature_spec_version": features.FEATURE_SPEC_VERSION,
        "compression": features.COMPRESSION,
        "modalities": list(MODALITIES),
        "label_values": list(LABEL_VALUES),
        "input_dir": in_real,
        "has_labels": require_label,
        "options": {"cases_per_shard": cases_per_shard, "num_shards": num_shards, "folds": folds,
                    "seed": seed, "skip_bad": skip_bad},
        "num_cases": len(records),
        "shards": shards,
        "cases": sorted(records, key=lambda r: r["case_id"]),
        "skipped": skipped,
        "empty_folds": empty_folds,
    }
    write_text_atomic(manifest_path, json.dumps(manifest, indent=1))
    elapsed = time.time() - start_time
    logging.info("wrote %d cases in %d shards + %s to %s in %.1f s (%.2f cases/s)",
                 len(records), len(shards), MANIFEST, output_dir, elapsed,
                 len(records) / max(elapsed, 1e-9))
    for s in skipped:
        logging.warning("skipped %s", s["error"])
    return manifest


def _case_record(loaded):
    """A case's entry in the manifest; its fold and shard are set once it is
    written (None until then)."""
    case = loaded.case
    return {
        "case_id": case.case_id,
        "grade": case.grade,
        "naming": case.naming,
        "fold": None,
        "shard": None,
        "original_shape": list(loaded.original_shape),
        "affine": np.asarray(loaded.affine).tolist(),
        "box_start": list(loaded.box_start),
        "box_shape": list(loaded.image.shape[:3]),
        "image_dtype": loaded.image.dtype.name,
        "label_counts": loaded.label_counts,
        "files": {m: case.images[m] for m in MODALITIES} | {"seg": case.label},
    }


FLAGS = flags.FLAGS
_FLAG_NAMES = ("input_dir", "output_dir", "cases_per_shard", "num_shards", "folds", "seed",
               "skip_bad", "overwrite", "num_workers")


def define_flags():
    """The command line's flags (defined here, not at import, so that library
    users can import several entry-point modules)."""
    flags.DEFINE_string("input_dir", None, "Folder of BraTS NIfTI cases (any supported layout).")
    flags.DEFINE_string("output_dir", None,
                        "Folder for the shards and manifest.json; not inside input_dir.")
    flags.DEFINE_integer("cases_per_shard", 4, "Cases per shard file (fewer: better shuffled "
                         "epochs).", lower_bound=1)
    flags.DEFINE_integer("num_shards", None,
                         "About this many shard files in all (overrides --cases_per_shard).",
                         lower_bound=1)
    flags.DEFINE_integer("folds", 5, "Cross-validation folds, split by case (1: no split).",
                         lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Seed of the fold split and of the order within shards.")
    flags.DEFINE_bool("skip_bad", False, "Skip cases that fail a check and report them at the end "
                      "(default: stop at the first); the folds are dealt over the cases kept.")
    flags.DEFINE_bool("overwrite", False, "Replace a finished conversion in --output_dir "
                      "(or shards left there without manifest.json).")
    flags.DEFINE_integer("num_workers", 2, "Threads reading NIfTI files.", lower_bound=1)
    flags.mark_flags_as_required(["input_dir", "output_dir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.info("flags: %s", {name: FLAGS[name].value for name in _FLAG_NAMES})
    try:
        convert(FLAGS.input_dir, FLAGS.output_dir, cases_per_shard=FLAGS.cases_per_shard,
                num_shards=FLAGS.num_shards, folds=FLAGS.folds, seed=FLAGS.seed,
                skip_bad=FLAGS.skip_bad, overwrite=FLAGS.overwrite, num_workers=FLAGS.num_workers)
    except (ValueError, OSError) as e:  # BadCaseError included: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
