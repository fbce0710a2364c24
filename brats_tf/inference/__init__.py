"""Full-volume inference (§1, §3.1, §3.7, §4): the graph (TF) volume ops,
prediction with TTA and ensembles, label maps, the protocol on record, NIfTI
output, and the SavedModel export.

Modules: ``volume_tf`` (padding, brain box, normalisation in TF ops),
``predict`` (``predict_volume`` and the pipeline it shares with the
SavedModel), ``labels`` (probabilities -> BraTS labels, ET post-processing in
the graph), ``protocol_record`` (how a prediction was made), ``saved_model``
(``export_saved_model``; the command is ``python -m brats_tf.export``), ``saving``
(``save_final``: a training run's model.keras, segmenter.keras and SavedModel).
Their public names are re-exported here, with the NIfTI writer
(``write_prediction_nifti``, in ``data_pipeline.prediction_nifti``: NumPy and
nibabel only, so a serving client writes its NIfTI without TensorFlow):
``from brats_tf import inference; inference.predict_volume(...)``.
"""

from brats_tf.inference.labels import (
    et_to_necrosis_tf,
    probabilities_to_labels,
    probabilities_to_labels_tf,
)
from brats_tf.inference.predict import (
    FLIP_AXES,
    as_inference_model,
    model_probabilities,
    padding_multiple,
    place_back_tf,
    predict_tta_loop_tf,
    predict_tta_tf,
    predict_volume,
    prepare_volume_tf,
    volume_probabilities_tf,
)
from brats_tf.inference.protocol_record import describe_protocol, protocol, region_name
from brats_tf.inference.saved_model import (
    INPUT_NAME,
    METADATA_FILE,
    SIGNATURES,
    BratsServingModule,
    export_saved_model,
)
from brats_tf.inference.saving import save_final
from brats_tf.inference.volume_tf import (
    brain_box_tf,
    crop_back_tf,
    crop_box_tf,
    normalize_nonzero_tf,
    pad_to_multiple_tf,
    paste_box_tf,
)
from data_pipeline.prediction_nifti import write_prediction_nifti

__all__ = [
    # volume_tf
    "pad_to_multiple_tf",
    "crop_back_tf",
    "brain_box_tf",
    "crop_box_tf",
    "paste_box_tf",
    "normalize_nonzero_tf",
    # predict
    "FLIP_AXES",
    "model_probabilities",
    "predict_tta_tf",
    "predict_tta_loop_tf",
    "as_inference_model",
    "padding_multiple",
    "volume_probabilities_tf",
    "prepare_volume_tf",
    "place_back_tf",
    "predict_volume",
    # labels
    "probabilities_to_labels",
    "probabilities_to_labels_tf",
    "et_to_necrosis_tf",
    # protocol_record
    "region_name",
    "protocol",
    "describe_protocol",
    # data_pipeline.prediction_nifti
    "write_prediction_nifti",
    # saved_model
    "BratsServingModule",
    "export_saved_model",
    "INPUT_NAME",
    "SIGNATURES",
    "METADATA_FILE",
    # saving
    "save_final",
]
