"""Training (§3.4-3.6): the train step, the distribution-aware Trainer,
validation during training; the final save (``save_final``, beside the
SavedModel export in ``brats_tf.inference``) is re-exported here.

``TrainConfig`` (from ``brats_tf.config``), ``step`` (the train step and its optimizer),
``strategies`` (tf.distribute), ``trainer`` (the epoch loop, checkpoints,
resume), ``unlearned`` (regions a run has not learned), ``validation``
(validation Dice after an epoch).
"""

from brats_tf.config import (
    ON_NONFINITE,
    PRECISIONS,
    STRATEGIES,
    TrainConfig,
    check_precision_for_model,
)
from brats_tf.inference.saving import save_final
from brats_tf.training.step import (
    NonFiniteLossError,
    make_optimizer,
    make_train_step,
)
from brats_tf.training.strategies import make_strategy, set_inter_op_threads
from brats_tf.training.trainer import DatasetFn, Trainer
from brats_tf.training.unlearned import UNLEARNED_DICE, unlearned_regions
from brats_tf.training.validation import validation_dice

__all__ = [
    "DatasetFn",
    "NonFiniteLossError",
    "ON_NONFINITE",
    "PRECISIONS",
    "STRATEGIES",
    "TrainConfig",
    "Trainer",
    "UNLEARNED_DICE",
    "check_precision_for_model",
    "make_optimizer",
    "make_strategy",
    "make_train_step",
    "save_final",
    "set_inter_op_threads",
    "unlearned_regions",
    "validation_dice",
]
