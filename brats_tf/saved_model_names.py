"""The exported SavedModel's names, without TensorFlow: its input, its
signatures and its metadata file. ``brats_tf.inference.saved_model`` writes
them; ``serving.client`` (which needs no TensorFlow) and ``brats_tf.export``
read them from here."""

INPUT_NAME = "image"  # the signatures' one input: raw intensities [B, D, H, W, 4]
SIGNATURES = ("serving_default", "serving_tta")  # without and with TTA (§4)
METADATA_FILE = "assets.extra/brats_tf.json"  # the export's record, beside the graph
