"""Data: the supported data sets and their defaults (`datasets`, free of TensorFlow) and
the per-host input pipeline that reads them (`pipeline`, tf.data)."""
