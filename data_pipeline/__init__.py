"""BraTS data: layouts, NIfTI -> TFRecord conversion, synthetic cases and the tf.data input."""
