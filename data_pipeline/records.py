"""Checked cases as the converter writes them: each case's serialized
tf.train.Example (data_pipeline.features) and its entry in manifest.json,
in case order, the NIfTI files read by a few threads."""

import concurrent.futures

import numpy as np

from data_pipeline import features
from data_pipeline.cases import BadCaseError, load_case
from data_pipeline.constants import MODALITIES


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


def checked_cases(cases, require_label, workers):
    """Yields (case, (its serialized Example, its manifest record without
    fold and shard) or its BadCaseError), in order; `workers` threads read
    the NIfTI files."""
    for case, loaded in _ordered_parallel(lambda c: load_case(c, require_label), cases, workers):
        if isinstance(loaded, BadCaseError):
            yield case, loaded
            continue
        try:
            record = features.serialize_example(
                case.case_id,
                loaded.image,
                loaded.label,
                loaded.original_shape,
                loaded.affine,
                loaded.box_start,
            )
        except ValueError as e:
            yield (
                case,
                BadCaseError(
                    case.case_id, case.folder, str(e).removeprefix(f"case {case.case_id}: ")
                ),
            )
            continue
        yield case, (record, case_record(loaded))


def case_record(loaded):
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
