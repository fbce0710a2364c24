"""TFDS builder of BraTS from a manual_dir of NIfTI cases: `tfds.load("brats")` after
`import data_pipeline.tfds_brats`."""

from data_pipeline.tfds_brats.brats import Brats  # noqa: F401  (registers "brats")
