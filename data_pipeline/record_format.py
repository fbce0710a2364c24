"""The TFRecord shards' format in names and numbers, without TensorFlow.

What the manifest, the shard plan and the readers check a folder against
(the feature spec's version, the compression, the shard files' suffix);
``data_pipeline.features`` writes and parses the examples themselves. Kept
apart so that the manifest can be read and checked without TensorFlow:
train.py refuses a folder of another format in a fraction of a second,
before TensorFlow is imported.
"""

FEATURE_SPEC_VERSION = 2  # 2: image as byte planes
COMPRESSION = "GZIP"  # TFRecord compression of the shards (deflate, lossless)
SHARD_SUFFIX = ".tfrecord"  # GZIP-compressed inside (COMPRESSION)
IMAGE_DTYPES = ("int16", "float32")  # a case's image as stored (the image_dtype field)
