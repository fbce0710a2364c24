"""BraTS as a TensorFlow Datasets builder, for users who prefer `tfds.load`.

    import data_pipeline.tfds_brats  # registers "brats"
    ds = tfds.load("brats", split="train", data_dir="~/tensorflow_datasets",
                   download_and_prepare_kwargs={"download_config": tfds.download.DownloadConfig(
                       manual_dir="/data/MICCAI_BraTS_2018_Data_Training")})

Works offline: nothing is downloaded; the NIfTI cases are read from manual_dir
(any layout data_pipeline.layouts finds) and checked exactly as by the
converter (data_pipeline.cases.load_case, which raises a one-line error
naming the case and the file). One split, "train", with every case, sorted by
case id; use TFDS slicing for validation (e.g. "train[:80%]", "train[80%:]") or
the converter's folds. Examples are the converter's: the brain's bounding box,
channels in data_pipeline.constants.MODALITIES order, and what pasting them back
into the NIfTI grid needs (data_pipeline.volume.paste_crop). The project's own
input pipeline reads the converter's TFRecords (data_pipeline.input), not this
dataset.
"""

import numpy as np
import tensorflow_datasets as tfds

from data_pipeline import layouts
from data_pipeline.cases import BadCaseError, load_case
from data_pipeline.constants import MODALITIES, NUM_MODALITIES
from data_pipeline.volume import nonzero_stats

_ZLIB = tfds.features.Encoding.ZLIB


class Brats(tfds.core.GeneratorBasedBuilder):
    """BraTS multimodal brain tumour MRI (2018-2021 naming, or 2023 with ET 3 -> 4)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Brain bounding box crops, int16 images, uint8 labels {0,1,2,4}."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    BraTS data needs a registration: request it from the organisers (e.g. the
    BraTS 2018 page of CBICA, https://www.med.upenn.edu/sbia/brats2018.html, or
    the Synapse pages of BraTS 2021/2023), unpack it, and pass the folder as
    manual_dir (tfds.download.DownloadConfig(manual_dir=...)). Supported
    layouts: HGG/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz and LGG/ (2018,
    2019), <case>/<case>_{...}.nii.gz (2020, 2021), <case>/<case>-{t1n,t1c,t2w,
    t2f,seg}.nii.gz (2023). Sets without seg files (validation) are accepted:
    has_label is then False and label is all zeros. For a synthetic stand-in:
    python -m data_pipeline.synthetic --output_dir DIR.
    """

    def _info(self):
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "case_id": tfds.features.Text(),
                    "grade": tfds.features.Text(),  # HGG, LGG or "" when unknown
                    "image": tfds.features.Tensor(
                        shape=(None, None, None, NUM_MODALITIES), dtype=np.int16, encoding=_ZLIB
                    ),
                    "label": tfds.features.Tensor(
                        shape=(None, None, None), dtype=np.uint8, encoding=_ZLIB
                    ),
                    "has_label": np.bool_,
                    "original_shape": tfds.features.Tensor(shape=(3,), dtype=np.int32),
                    "box_start": tfds.features.Tensor(shape=(3,), dtype=np.int32),
                    "affine": tfds.features.Tensor(shape=(4, 4), dtype=np.float64),
                    "nonzero_mean": tfds.features.Tensor(shape=(NUM_MODALITIES,), dtype=np.float32),
                    "nonzero_std": tfds.features.Tensor(shape=(NUM_MODALITIES,), dtype=np.float32),
                }
            ),
            homepage="https://www.med.upenn.edu/sbia/brats2018.html",
            citation="""@article{menze2015brats, title={The Multimodal Brain Tumor Image
            Segmentation Benchmark (BRATS)}, author={Menze, Bjoern H. and others},
            journal={IEEE Transactions on Medical Imaging}, volume={34}, number={10},
            pages={1993--2024}, year={2015}}""",
        )

    def _split_generators(self, dl_manager):
        cases = layouts.find_cases(str(dl_manager.manual_dir))
        return {"train": self._generate_examples(cases)}

    def _generate_examples(self, cases):
        require_label = any(c.label is not None for c in cases)
        for case in cases:
            loaded = load_case(case, require_label)
            if loaded.image.dtype != np.int16:
                raise BadCaseError(
                    case.case_id,
                    case.images[MODALITIES[0]],
                    "non-integer intensities: this builder stores int16; use "
                    "python -m data_pipeline.convert (float32 storage) instead",
                )
            mean, std = nonzero_stats(loaded.image)
            label = (
                loaded.label
                if loaded.label is not None
                else np.zeros(loaded.image.shape[:3], np.uint8)
            )
            yield (
                case.case_id,
                {
                    "case_id": case.case_id,
                    "grade": case.grade or "",
                    "image": loaded.image,
                    "label": label,
                    "has_label": loaded.label is not None,
                    "original_shape": np.array(loaded.original_shape, np.int32),
                    "box_start": np.array(loaded.box_start, np.int32),
                    "affine": loaded.affine,
                    "nonzero_mean": mean.astype(np.float32),
                    "nonzero_std": std.astype(np.float32),
                },
            )
