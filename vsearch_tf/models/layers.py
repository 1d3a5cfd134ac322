"""Small serialisable layers of the embedder: pixel normalisation, GeM pooling, L2 norm."""

from __future__ import annotations

import keras
from keras import ops

# Per-channel statistics of ImageNet, RGB order, on [0, 255] pixels.
_IMAGENET_MEAN = (123.675, 116.28, 103.53)
_IMAGENET_STD = (58.395, 57.12, 57.375)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="vsearch")
class PixelNormalization(keras.layers.Layer):
    """Map RGB pixels in [0, 255] to what a backbone was pretrained on.

    Inside the model (not in the data pipeline) so that training, indexing and TF Serving can
    never disagree. Modes follow ``keras.applications.imagenet_utils.preprocess_input``:

    - ``"tf"``: scale to [-1, 1] (MobileNet, ResNetV2, Xception);
    - ``"caffe"``: RGB -> BGR, subtract the ImageNet mean (ResNet50/101/152);
    - ``"torch"``: [0, 1] then ImageNet mean/std (keras-hub ResNet18/34);
    - ``"none"``: the backbone normalises itself (EfficientNet, ConvNeXt).
    """

    MODES = ("tf", "caffe", "torch", "none")

    def __init__(self, mode: str = "none", **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"PixelNormalization mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "caffe":
            return ops.flip(x, axis=-1) - ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype=x.dtype)
        if self.mode == "torch":
            mean = ops.convert_to_tensor(_IMAGENET_MEAN, dtype=x.dtype)
            std = ops.convert_to_tensor(_IMAGENET_STD, dtype=x.dtype)
            return (x - mean) / std
        return x

    def get_config(self):
        """``mode``: one of :attr:`MODES`."""
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="vsearch")
class GeMPooling(keras.layers.Layer):
    """Generalised-mean pooling, ``(mean(x^p))^(1/p)`` over space, with a learnable ``p``.

    p = 1 is average pooling and p -> inf max pooling; retrieval models learn p ~ 3, which
    weights the salient parts of the product (Radenovic et al., 2018).
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, trainable_p: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.initial_p = float(p)
        self.eps = float(eps)
        self.trainable_p = bool(trainable_p)

    def build(self, input_shape):
        self.p = self.add_weight(
            name="p",
            shape=(),
            initializer=keras.initializers.Constant(self.initial_p),
            trainable=self.trainable_p,
            dtype="float32",
        )

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        p = ops.maximum(self.p, 1.0)
        pooled = ops.mean(ops.power(ops.maximum(x, self.eps), p), axis=(1, 2))
        return ops.cast(ops.power(pooled, 1.0 / p), self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        """``p``: initial exponent; ``eps``: floor before the power; ``trainable_p``: learn p."""
        return {
            **super().get_config(),
            "p": self.initial_p,
            "eps": self.eps,
            "trainable_p": self.trainable_p,
        }


@keras.saving.register_keras_serializable(package="vsearch")
class L2Normalize(keras.layers.Layer):
    """Unit-length embeddings in float32, so inner product is cosine similarity everywhere
    (training losses, ScaNN's dot-product index, TF Serving clients)."""

    def __init__(self, epsilon: float = 1e-12, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        return x / ops.sqrt(
            ops.maximum(ops.sum(ops.square(x), axis=-1, keepdims=True), self.epsilon)
        )

    def get_config(self):
        """``epsilon``: floor on the squared norm, so a zero vector stays finite."""
        return {**super().get_config(), "epsilon": self.epsilon}
