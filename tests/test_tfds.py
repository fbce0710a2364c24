"""The TFDS builder prepares and loads a small synthetic dataset offline."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_pipeline import synthetic
from data_pipeline.constants import MODALITIES
from data_pipeline.tfds_brats import Brats
from data_pipeline.volume import paste_crop

SHAPE = (32, 36, 24)


@pytest.mark.parametrize("with_label", [True, False])
def test_builder_loads_synthetic_offline(tmp_path, with_label):
    manual = tmp_path / "manual"
    dirs = synthetic.write_synthetic_dataset(str(manual), 3, SHAPE, seed=2, progress=False)
    arrays = {}
    for n, case_dir in enumerate(dirs):
        images, label = synthetic.make_case(SHAPE, seed=(2, n), lgg="LGG" in case_dir)
        arrays[f"Brats18_SYN_{n:04d}_1"] = (images, label, "LGG" if "LGG" in case_dir else "HGG")
        if not with_label:
            (tmp_path / "manual" / case_dir / f"Brats18_SYN_{n:04d}_1_seg.nii.gz").unlink()

    builder = Brats(data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual))
    )
    assert builder.info.splits["train"].num_examples == 3
    ds = tfds.load("brats", split="train", data_dir=str(tmp_path / "tfds"), download=False)
    seen = set()
    for ex in tfds.as_numpy(ds):
        case_id = ex["case_id"].decode()
        seen.add(case_id)
        images, label, grade = arrays[case_id]
        assert ex["grade"].decode() == grade
        image = paste_crop(ex["image"], ex["original_shape"], ex["box_start"])
        for c, m in enumerate(MODALITIES):
            np.testing.assert_array_equal(image[..., c], images[m])
        assert bool(ex["has_label"]) == with_label
        expected = label if with_label else np.zeros_like(label)
        np.testing.assert_array_equal(
            paste_crop(ex["label"], ex["original_shape"], ex["box_start"]), expected
        )
        np.testing.assert_array_equal(ex["affine"], np.eye(4))
    assert seen == set(arrays)


def test_manual_download_instructions():
    assert "manual_dir" in Brats.MANUAL_DOWNLOAD_INSTRUCTIONS
