"""What the tf.data input pipeline (data_pipeline.input) builds: InputConfig,
checked when made, without TensorFlow, so that train.py defines its flags
from the fields declared ``flagged`` (augment, input_cache, crop_from)
before it loads TensorFlow."""

import dataclasses

from data_pipeline.checks import positive_int
from data_pipeline.constants import CROP_FROM, PAPER_CROP
from data_pipeline.flag_fields import flagged

MODES = ("train", "eval")


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """What make_dataset builds.

    Attributes:
      files: a glob pattern (str) or a sequence of shard paths.
      mode: 'train' (random crops, augmentation, shuffling) or 'eval' (whole volumes).
      crop_shape: training crop D, H, W (paper: 160, 192, 128).
      batch_size: global batch size (divided among input pipelines under
        tf.distribute); must be 1 in eval mode (volumes differ in size).
      augment: master switch of flips and intensity augmentation (train mode).
      flip: random mirror flips; flip_probability: per axis.
      intensity: random intensity scale and shift; intensity_shift: max |shift|
        in channel stds; intensity_scale: (min, max) scale.
      has_labels: examples carry label maps (required in train mode).
      seed: seed of shuffling and of the per-example augmentation seeds.
      deterministic: same seed -> same batches, in the same order (stateless
        random ops throughout, ordered parallelism; may be slower).
      shuffle: shuffle shards and examples (train mode).
      shuffle_buffer: examples buffered for shuffling (each holds a decompressed
        serialized case, ~30 MB at BraTS size); shards are shuffled too.
      cycle_length: shards read at once (interleaved).
      num_parallel_calls: parallelism of reading and mapping (-1 = AUTOTUNE).
      prefetch: batches prefetched (-1 = AUTOTUNE).
      drop_remainder: drop a last incomplete batch (train mode).
      jit: XLA-compile the per-voxel part of the transforms (the whole train
        pipeline then needs half the CPU); False runs the same ops without XLA.
      cache: keep the decompressed examples in memory after the first epoch
        (~30 MB per BraTS case) and shuffle over all of them: later epochs skip
        reading and decompression, and the case order is uniformly random.
      crop_from: where train mode draws the random crop window: 'grid', uniformly
        in the original NIfTI grid (the paper's 240 x 240 x 155, where its
        160 x 192 x 128 crop holds nearly all of the brain); 'brain_box',
        uniformly in the stored brain bounding box (a box smaller than the
        crop is padded, placed at random), so that a crop much smaller than the
        paper's is still mostly brain (docs/deviations.md).
      eval_brain_box: eval mode yields the stored brain bounding box (smaller,
        faster) instead of the whole original grid (as the paper infers on; the
        network's group norms see the same background as in training crops).
    """

    files: str | tuple
    mode: str = "train"
    crop_shape: tuple = PAPER_CROP
    batch_size: int = 1
    augment: bool = flagged(True, "Random flips and intensity augmentation (§3.7).")
    flip: bool = True
    flip_probability: float = 0.5
    intensity: bool = True
    intensity_shift: float = 0.1
    intensity_scale: tuple = (0.9, 1.1)
    has_labels: bool = True
    seed: int = 0
    deterministic: bool = False
    shuffle: bool = True
    shuffle_buffer: int = 8
    cycle_length: int = 4
    num_parallel_calls: int = -1
    prefetch: int = -1
    drop_remainder: bool = False
    jit: bool = True
    cache: bool = flagged(
        False,
        "Shuffle over all training cases each epoch (a uniform order) instead of shard "
        "order plus an 8-case buffer; holds the epoch's decompressed cases in memory (~30 MB "
        "per BraTS case). The data are read again every epoch.",
        name="input_cache",
    )
    crop_from: str = flagged(
        "grid",
        "Where the random training crop is drawn: uniformly in the original grid (the "
        "paper), or in the brain's bounding box, so that crops smaller than the paper's are "
        "still mostly brain (docs/deviations.md).",
        choices=CROP_FROM,
    )
    eval_brain_box: bool = False

    def __post_init__(self):
        if isinstance(self.files, (list, tuple)):
            object.__setattr__(self, "files", tuple(str(f) for f in self.files))
            if not self.files:
                raise ValueError("files is empty")
        elif not isinstance(self.files, str) or not self.files:
            raise ValueError(f"files must be a glob pattern or a list of paths, got {self.files!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        object.__setattr__(self, "crop_shape", tuple(self.crop_shape))
        if len(self.crop_shape) != 3 or not all(
            isinstance(s, int) and s > 0 for s in self.crop_shape
        ):
            raise ValueError(f"crop_shape must be 3 positive ints, got {self.crop_shape!r}")
        positive_int("batch_size", self.batch_size)
        if self.mode == "eval" and self.batch_size != 1:
            raise ValueError(
                f"eval mode yields whole volumes of different sizes: batch_size "
                f"must be 1, got {self.batch_size!r}"
            )
        if self.crop_from not in CROP_FROM:
            raise ValueError(f"crop_from must be one of {CROP_FROM}, got {self.crop_from!r}")
        if self.mode == "train" and not self.has_labels:
            raise ValueError(f"train mode needs labels, got has_labels={self.has_labels!r}")
        if not 0.0 <= self.flip_probability <= 1.0:
            raise ValueError(f"flip_probability must be in [0, 1], got {self.flip_probability!r}")
        if self.intensity_shift < 0:
            raise ValueError(f"intensity_shift must be >= 0, got {self.intensity_shift!r}")
        object.__setattr__(self, "intensity_scale", tuple(self.intensity_scale))
        lo, hi = self.intensity_scale
        if not 0 < lo <= hi:
            raise ValueError(
                f"intensity_scale must be (min, max) with 0 < min <= max, "
                f"got {self.intensity_scale!r}"
            )
        for name in ("shuffle_buffer", "cycle_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("num_parallel_calls", "prefetch"):
            if getattr(self, name) < 1 and getattr(self, name) != -1:
                raise ValueError(
                    f"{name} must be >= 1 or -1 (AUTOTUNE), got {getattr(self, name)!r}"
                )
