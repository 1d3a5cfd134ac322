"""Data: CSV tables, in-graph image decoding and cropping, tf.data pipelines, samplers."""

#: Largest image (width x height, from its header) decoded by default: 100 MP, more than any
#: phone photo but a bound on the ~1.6 GB a float32 RGBA decode of it takes. Here, not in
#: ``images``, so the config can use it without importing TensorFlow.
DEFAULT_MAX_PIXELS = 100_000_000
