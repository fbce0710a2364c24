"""Synthetic BraTS-like cases and their conversion, for the command-line tests."""

from pathlib import Path

from data_pipeline.convert import convert
from data_pipeline.synthetic import write_synthetic_dataset


def synthetic_tfrecords(root: Path, num_cases: int, shape: tuple, folds: int) -> Path:
    """``num_cases`` synthetic NIfTI cases of ``shape`` in root/nii (seed 0)
    and their conversion, one case a shard, in ``folds`` folds in root/tfr;
    returns root/tfr."""
    write_synthetic_dataset(str(root / "nii"), num_cases, shape=shape, seed=0, progress=False)
    convert(
        str(root / "nii"), str(root / "tfr"), cases_per_shard=1, folds=folds, seed=0, progress=False
    )
    return root / "tfr"
