"""brats_tf: Myronenko's BraTS 2018 winning network (arXiv:1810.11654) in TensorFlow 2 / Keras 3."""

__version__ = "0.1.0"
