"""BraTS NIfTI -> GZIP TFRecord shards plus manifest.json (the offline half of the data).

    python -m data_pipeline.convert --input_dir data/synthetic --output_dir data/tfrecord
    python -m data_pipeline.convert --input_dir MICCAI_BraTS_2018_Data_Training \\
        --output_dir data/brats18 --folds 5 --seed 0 --skip_bad

Finds the cases (data_pipeline.layouts), checks each one (all four modalities
present, identical shapes and affines, finite values, labels in the expected
set), crops it to the bounding box of its non-zero voxels (data_pipeline.cases)
and writes one tf.train.Example per case (data_pipeline.records,
data_pipeline.features). Cases are split into `folds` folds by case
(stratified by HGG/LGG grade when known, seeded); each shard holds cases of
one fold only, so fold k's validation set is its shards:
`brats-fold<k>-<i>-of-<n>.tfrecord` (GZIP-compressed TFRecord;
data_pipeline.shard_plan).

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
import json
import math
import os
import sys
import time

from absl import app, flags, logging
from tqdm import tqdm

from data_pipeline import layouts, record_format
from data_pipeline.cases import BadCaseError, check_files
from data_pipeline.constants import LABEL_VALUES, MODALITIES
from data_pipeline.io_utils import write_text_atomic
from data_pipeline.manifest import CONVERTER_VERSION, MANIFEST, fold_files, read_manifest  # noqa: F401  (documented as convert.* before manifest.py)
from data_pipeline.shard_plan import assign_folds, plan_shards, shard_files

# The modules that write (data_pipeline.records, data_pipeline.shard_writer)
# import TensorFlow, a few seconds: ``convert`` imports them once the command
# line, the folders and every case's files have passed the checks, so that a
# bad one is answered at once.


def convert(
    input_dir,
    output_dir,
    cases_per_shard=4,
    num_shards=None,
    folds=5,
    seed=0,
    skip_bad=False,
    overwrite=False,
    num_workers=2,
    progress=True,
):
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
    _check_arguments(input_dir, output_dir, cases_per_shard, num_shards, folds, overwrite)
    start_time = time.time()
    cases, require_label = _find_cases(input_dir, folds)
    skipped = []  # {"case_id", "error"} of each case skipped (skip_bad)
    good = _cases_with_every_file(cases, require_label, skip_bad, skipped, input_dir)
    from data_pipeline.shard_writer import Temporaries, publish_shards, write_shards

    temporaries = Temporaries.open(output_dir)
    bar = tqdm(total=len(good), desc="converting", unit="case", disable=not progress)
    try:
        if skip_bad:
            kept, cases_of, release = _check_every_case(
                good, require_label, num_workers, temporaries, bar, skipped, input_dir
            )
        else:
            kept, cases_of, release = good, _read_in_turn(require_label, num_workers, bar), None
        if num_shards is not None:
            cases_per_shard = math.ceil(len(kept) / num_shards)
        plan = plan_shards(kept, assign_folds(kept, folds, seed), cases_per_shard, seed)
        shards, records = write_shards(plan, cases_of, release, temporaries)
    except BaseException:
        temporaries.remove()
        raise
    finally:
        bar.close()
    publish_shards(output_dir, shards)
    options = {"cases_per_shard": cases_per_shard, "num_shards": num_shards, "folds": folds}
    options.update(seed=seed, skip_bad=skip_bad)
    manifest = _manifest(input_dir, require_label, options, shards, records, skipped)
    write_text_atomic(os.path.join(output_dir, MANIFEST), json.dumps(manifest, indent=1))
    _log_done(output_dir, shards, records, skipped, time.time() - start_time)
    return manifest


def _log_done(output_dir, shards, records, skipped, elapsed):
    logging.info(
        "wrote %d cases in %d shards + %s to %s in %.1f s (%.2f cases/s)",
        len(records),
        len(shards),
        MANIFEST,
        output_dir,
        elapsed,
        len(records) / max(elapsed, 1e-9),
    )
    for s in skipped:
        logging.warning("skipped %s", s["error"])


def _check_arguments(input_dir, output_dir, cases_per_shard, num_shards, folds, overwrite):
    """ValueError for arguments ``convert`` refuses, before anything is read."""
    in_real = os.path.realpath(input_dir)
    out_real = os.path.realpath(output_dir)
    if out_real == in_real or out_real.startswith(in_real + os.sep):
        raise ValueError(
            f"output_dir {output_dir!r} is inside input_dir {input_dir!r}; "
            "refusing to write next to the inputs"
        )
    if cases_per_shard < 1 or (num_shards is not None and num_shards < 1) or folds < 1:
        raise ValueError(
            f"cases_per_shard ({cases_per_shard}), num_shards ({num_shards}) and "
            f"folds ({folds}) must be >= 1"
        )
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"output_dir {output_dir!r} exists and is not a folder")
    manifest_path = os.path.join(output_dir, MANIFEST)
    if os.path.exists(manifest_path) and not overwrite:
        raise ValueError(
            f"{manifest_path} exists: a finished conversion is there "
            "(pass overwrite / --overwrite to replace it)"
        )
    shards_there = shard_files(output_dir)
    if shards_there and not overwrite:
        raise ValueError(
            f"output_dir {output_dir!r} holds shards without {MANIFEST} "
            f"({shards_there[0]}{', ...' if len(shards_there) > 1 else ''}): "
            "pass overwrite / --overwrite to replace them, or choose another folder"
        )


def _find_cases(input_dir, folds):
    """(the cases under input_dir, whether they have labels: any one has)."""
    cases = layouts.find_cases(input_dir)
    require_label = any(c.label is not None for c in cases)
    logging.info(
        "found %d cases under %s (%s labels)",
        len(cases),
        input_dir,
        "with" if require_label else "without",
    )
    if folds > len(cases):
        raise ValueError(f"folds ({folds}) is more than the number of cases ({len(cases)})")
    return cases, require_label


def _skip(case, error, skipped):
    logging.warning("skipping: %s", error)
    skipped.append({"case_id": case.case_id, "error": str(error)})


def _every_case_failed(input_dir):
    return ValueError(f"every case under {input_dir!r} failed its checks (see the warnings)")


def _cases_with_every_file(cases, require_label, skip_bad, skipped, input_dir):
    """Cheap checks first: a missing file stops the run before any data is
    read (with skip_bad, its case is skipped)."""
    good = []
    for case in cases:
        try:
            check_files(case, require_label)
            good.append(case)
        except BadCaseError as e:
            if not skip_bad:
                raise
            _skip(case, e, skipped)
    if not good:
        raise _every_case_failed(input_dir)
    return good


def _read_in_turn(require_label, num_workers, bar):
    """cases_of(members) of a conversion that stops at the first bad case:
    each case read, checked and serialized as its shard is written."""
    from data_pipeline.records import checked_cases

    def cases_of(members):
        for case, result in checked_cases(members, require_label, num_workers):
            bar.update(1)
            if isinstance(result, BadCaseError):
                raise result
            yield case, result

    return cases_of


def _check_every_case(cases, require_label, num_workers, temporaries, bar, skipped, input_dir):
    """skip_bad: every case is read and checked before the folds are dealt,
    so that they are dealt over the cases kept: each case goes to a temporary
    file of its own first, and into its shard once the plan is made.

    Returns (the cases kept, cases_of(members), release(members): removes
    the members' temporary files once their shard is written)."""
    from data_pipeline.records import checked_cases
    from data_pipeline.shard_writer import case_tmp_name, read_record

    kept, checked = [], {}
    for index, (case, result) in enumerate(checked_cases(cases, require_label, num_workers)):
        bar.update(1)
        if isinstance(result, BadCaseError):
            _skip(case, result, skipped)
            continue
        with temporaries.writer(case_tmp_name(index)) as writer:
            writer.write(result[0])
        kept.append(case)
        checked[case.case_id] = (temporaries.paths[-1], result[1])
    if not kept:
        raise _every_case_failed(input_dir)

    def cases_of(members):
        for case in members:
            tmp, case_record = checked[case.case_id]
            yield case, (read_record(tmp), case_record)

    def release(members):
        for case in members:
            os.remove(checked[case.case_id][0])

    return kept, cases_of, release


def _manifest(input_dir, has_labels, options, shards, records, skipped):
    """manifest.json's content (data_pipeline.manifest reads it); warns of
    each fold left without a case."""
    counts = collections.Counter(r["fold"] for r in records)
    empty_folds = [k for k in range(options["folds"]) if not counts[k]]
    for k in empty_folds:
        logging.warning(
            "fold %d has no case (its cases were skipped): train.py --fold=%d has "
            "nothing to validate on",
            k,
            k,
        )
    return {
        "converter_version": CONVERTER_VERSION,
        "feature_spec_version": record_format.FEATURE_SPEC_VERSION,
        "compression": record_format.COMPRESSION,
        "modalities": list(MODALITIES),
        "label_values": list(LABEL_VALUES),
        "input_dir": os.path.realpath(input_dir),
        "has_labels": has_labels,
        "options": options,
        "num_cases": len(records),
        "shards": shards,
        "cases": sorted(records, key=lambda r: r["case_id"]),
        "skipped": skipped,
        "empty_folds": empty_folds,
    }


FLAGS = flags.FLAGS
_FLAG_NAMES = (
    "input_dir",
    "output_dir",
    "cases_per_shard",
    "num_shards",
    "folds",
    "seed",
    "skip_bad",
    "overwrite",
    "num_workers",
)


def define_flags():
    """The command line's flags (defined here, not at import, so that library
    users can import several entry-point modules)."""
    flags.DEFINE_string("input_dir", None, "Folder of BraTS NIfTI cases (any supported layout).")
    flags.DEFINE_string(
        "output_dir", None, "Folder for the shards and manifest.json; not inside input_dir."
    )
    flags.DEFINE_integer(
        "cases_per_shard", 4, "Cases per shard file (fewer: better shuffled epochs).", lower_bound=1
    )
    flags.DEFINE_integer(
        "num_shards",
        None,
        "About this many shard files in all (overrides --cases_per_shard).",
        lower_bound=1,
    )
    flags.DEFINE_integer(
        "folds", 5, "Cross-validation folds, split by case (1: no split).", lower_bound=1
    )
    flags.DEFINE_integer("seed", 0, "Seed of the fold split and of the order within shards.")
    flags.DEFINE_bool(
        "skip_bad",
        False,
        "Skip cases that fail a check and report them at the end "
        "(default: stop at the first); the folds are dealt over the cases kept.",
    )
    flags.DEFINE_bool(
        "overwrite",
        False,
        "Replace a finished conversion in --output_dir "
        "(or shards left there without manifest.json).",
    )
    flags.DEFINE_integer("num_workers", 2, "Threads reading NIfTI files.", lower_bound=1)
    flags.mark_flags_as_required(["input_dir", "output_dir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.info("flags: %s", {name: FLAGS[name].value for name in _FLAG_NAMES})
    try:
        convert(
            FLAGS.input_dir,
            FLAGS.output_dir,
            cases_per_shard=FLAGS.cases_per_shard,
            num_shards=FLAGS.num_shards,
            folds=FLAGS.folds,
            seed=FLAGS.seed,
            skip_bad=FLAGS.skip_bad,
            overwrite=FLAGS.overwrite,
            num_workers=FLAGS.num_workers,
        )
    except (ValueError, OSError) as e:  # BadCaseError included: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
