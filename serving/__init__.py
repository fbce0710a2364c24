"""TF Serving client example for the exported brats_tf SavedModel (see brats_tf/INFERENCE.md)."""
