"""Small serialisable layers of the embedder: pixel normalisation, GeM and token pooling, L2
norm."""

from __future__ import annotations

import keras
from keras import ops

# Per-channel statistics of ImageNet, RGB order, on [0, 255] pixels.
_IMAGENET_MEAN = (123.675, 116.28, 103.53)
_IMAGENET_STD = (58.395, 57.12, 57.375)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
# OpenAI CLIP's (the keras-hub CLIP presets' image converter), RGB, on [0, 255] pixels.
_CLIP_MEAN = (122.7709383, 116.7460125, 104.09373615)
_CLIP_STD = (68.5005327, 66.6321579, 70.32316305)


@keras.saving.register_keras_serializable(package="vsearch")
class PixelNormalization(keras.layers.Layer):
    """Map RGB pixels in [0, 255] to what a backbone was pretrained on.

    Inside the model (not in the data pipeline) so that training, indexing and TF Serving can
    never disagree. Modes follow ``keras.applications.imagenet_utils.preprocess_input``:

    - ``"tf"``: scale to [-1, 1] (MobileNet, ResNetV2, Xception);
    - ``"caffe"``: RGB -> BGR, subtract the ImageNet mean (ResNet50/101/152);
    - ``"torch"``: [0, 1] then ImageNet mean/std (keras-hub ResNet18/34, DINOv2);
    - ``"clip"``: [0, 1] then OpenAI CLIP's mean/std (CLIP);
    - ``"affine"``: ``x * scale + offset`` per channel, as a keras-hub preset's image converter
      does (its ``scale`` and ``offset``, read from the preset when it is downloaded);
    - ``"none"``: the backbone normalises itself (EfficientNet, ConvNeXt).
    """

    MODES = ("tf", "caffe", "torch", "clip", "affine", "none")

    def __init__(
        self,
        mode: str = "none",
        scale: float | list[float] | None = None,
        offset: float | list[float] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"PixelNormalization mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        self.scale = _floats(scale)
        self.offset = _floats(offset)

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
        if self.mode == "clip":
            mean = ops.convert_to_tensor(_CLIP_MEAN, dtype=x.dtype)
            std = ops.convert_to_tensor(_CLIP_STD, dtype=x.dtype)
            return (x - mean) / std
        if self.mode == "affine":
            if self.scale is not None:
                x = x * ops.convert_to_tensor(self.scale, dtype=x.dtype)
            if self.offset is not None:
                x = x + ops.convert_to_tensor(self.offset, dtype=x.dtype)
        return x

    def get_config(self):
        """``mode``: one of :attr:`MODES`; ``scale``, ``offset``: the ``"affine"`` mode's."""
        return {
            **super().get_config(),
            "mode": self.mode,
            "scale": self.scale,
            "offset": self.offset,
        }


def pixel_normalization(normalization: str | dict, name: str = "normalize") -> PixelNormalization:
    """The layer for what :func:`~vsearch_tf.models.backbones.build_backbone` returns: a mode, or
    a preset's ``PixelNormalization`` arguments."""
    kwargs = normalization if isinstance(normalization, dict) else {"mode": normalization}
    return PixelNormalization(**kwargs, name=name)


def _floats(value):
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return [float(v) for v in value]


@keras.saving.register_keras_serializable(package="vsearch")
class TokenPooling(keras.layers.Layer):
    """A transformer's token sequence ``[batch, tokens, dim]`` -> one vector per image.

    ``"cls"``: the first (class) token; ``"mean"``: the mean of the patch tokens, the
    ``prefix_tokens`` leading ones (CLS, DINOv2's registers) left out. GeM needs non-negative
    feature-map activations and does not apply to tokens.
    """

    MODES = ("cls", "mean")

    def __init__(self, mode: str = "cls", prefix_tokens: int = 1, **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"TokenPooling mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        self.prefix_tokens = int(prefix_tokens)

    def call(self, inputs):
        if self.mode == "cls":
            return inputs[:, 0, :]
        return ops.mean(inputs[:, self.prefix_tokens :, :], axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        """``mode``: cls or mean; ``prefix_tokens``: leading non-patch tokens."""
        return {**super().get_config(), "mode": self.mode, "prefix_tokens": self.prefix_tokens}


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
