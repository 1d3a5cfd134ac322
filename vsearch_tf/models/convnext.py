"""ConvNeXt (tiny ... xlarge) with a real ``DepthwiseConv2D``, loading keras.applications' weights.

Why: ``keras.applications.ConvNeXt*`` builds each 7x7 depthwise convolution as
``Conv2D(groups=channels)``; TensorFlow on CPU runs that as a grouped convolution several times
slower than its ``DepthwiseConv2dNative`` kernel (see ``tools/bench_throughput.py``). This module
builds the same network layer for layer, under the same layer names, with ``DepthwiseConv2D`` in
their place, and copies keras.applications' weights into it: the grouped kernel ``(7, 7, 1, C)``
is the depthwise kernel ``(7, 7, C, 1)`` reshaped (same element order).

Keras' own ``LayerScale`` and ``StochasticDepth`` classes are reused, so the maths is the
checkpoints' by construction and ``keras.saving.load_model`` finds them by their ``keras.*``
module path even in a process that never imports this module (``vsearch export``). As in Keras,
the model takes RGB pixels in [0, 255] (its first layer is the ImageNet normalisation) and ends
with a LayerNormalization of the feature map (keras.applications' ``include_top=False`` output).
"""

from __future__ import annotations

from collections.abc import Callable

import h5py
import keras
import numpy as np
from keras.src.applications.convnext import LayerScale, StochasticDepth

#: variant -> (blocks per stage, channels per stage), as keras.applications.convnext.
VARIANTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048)),
}

_KERAS_FACTORIES: dict[str, Callable[..., keras.Model]] = {
    "tiny": keras.applications.ConvNeXtTiny,
    "small": keras.applications.ConvNeXtSmall,
    "base": keras.applications.ConvNeXtBase,
    "large": keras.applications.ConvNeXtLarge,
    "xlarge": keras.applications.ConvNeXtXLarge,
}

_IMAGENET_MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
_IMAGENET_VAR = [(0.229 * 255) ** 2, (0.224 * 255) ** 2, (0.225 * 255) ** 2]


def convnext(
    variant: str, input_shape: tuple[int, int, int], drop_path_rate: float = 0.0
) -> keras.Model:
    """A randomly initialised ConvNeXt feature extractor (keras.applications' ``include_top=False``,
    ``include_preprocessing=True``) whose depthwise convolutions are ``DepthwiseConv2D``.

    ``drop_path_rate`` is the stochastic depth of the last block (linear from 0 over the blocks,
    as in Keras and the paper); it only acts in training.
    """
    depths, dims = VARIANTS[variant]
    name = f"convnext_{variant}"
    ln = dict(epsilon=1e-6)
    inputs = keras.Input(input_shape)
    x = keras.layers.Normalization(
        mean=_IMAGENET_MEAN, variance=_IMAGENET_VAR, name=f"{name}_prestem_normalization"
    )(inputs)
    x = keras.layers.Conv2D(dims[0], 4, strides=4, name=f"{name}_stem_conv")(x)
    x = keras.layers.LayerNormalization(**ln, name=f"{name}_stem_layernorm")(x)
    drop_rates = np.linspace(0.0, drop_path_rate, sum(depths)).tolist()
    block = 0
    for stage, (depth, dim) in enumerate(zip(depths, dims)):
        if stage > 0:
            x = keras.layers.LayerNormalization(
                **ln, name=f"{name}_downsampling_layernorm_{stage - 1}"
            )(x)
            x = keras.layers.Conv2D(
                dim, 2, strides=2, name=f"{name}_downsampling_conv_{stage - 1}"
            )(x)
        for j in range(depth):
            prefix = f"{name}_stage_{stage}_block_{j}"
            y = keras.layers.DepthwiseConv2D(7, padding="same", name=f"{prefix}_depthwise_conv")(x)
            y = keras.layers.LayerNormalization(**ln, name=f"{prefix}_layernorm")(y)
            y = keras.layers.Dense(4 * dim, name=f"{prefix}_pointwise_conv_1")(y)
            y = keras.layers.Activation("gelu", name=f"{prefix}_gelu")(y)
            y = keras.layers.Dense(dim, name=f"{prefix}_pointwise_conv_2")(y)
            y = LayerScale(1e-6, dim, name=f"{prefix}_layer_scale")(y)
            if drop_rates[block]:
                y = StochasticDepth(drop_rates[block], name=f"{prefix}_stochastic_depth")(y)
            x = keras.layers.Add(name=f"{prefix}_add")([x, y])
            block += 1
    x = keras.layers.LayerNormalization(**ln, name=f"{name}_final_layernorm")(x)
    return keras.Model(inputs, x, name=name)


def keras_convnext(
    variant: str, input_shape: tuple[int, int, int], weights: str | None = None
) -> keras.Model:
    """keras.applications' own ConvNeXt feature extractor (grouped ``Conv2D``): the reference for
    parity and speed, and the loader of its weight files."""
    return _KERAS_FACTORIES[variant](
        include_top=False, include_preprocessing=True, weights=weights, input_shape=input_shape
    )


def _leaf_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Layers that own weights, in topological order, looking inside nested models (Keras puts
    the stem and the downsampling blocks in ``Sequential`` sub-models)."""
    leaves: list[keras.layers.Layer] = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            leaves += _leaf_layers(layer)
        elif layer.weights:
            leaves.append(layer)
    return leaves


def copy_keras_weights(source: keras.Model, target: keras.Model) -> None:
    """Copy a keras.applications ConvNeXt's weights into :func:`convnext`'s model of the same
    variant, reshaping each grouped kernel ``(k, k, 1, C)`` to the depthwise ``(k, k, C, 1)``.

    Layers are paired in order and checked by name (all but Keras' unnamed final
    LayerNormalization) and shape, so a wrong variant fails loudly instead of loading half.
    """
    src, dst = _leaf_layers(source), _leaf_layers(target)
    if len(src) != len(dst):
        raise ValueError(
            f"{source.name} has {len(src)} layers with weights, {target.name} has {len(dst)}"
        )
    for i, (s, t) in enumerate(zip(src, dst)):
        if i < len(src) - 1 and s.name != t.name:
            raise ValueError(f"layer {i}: {s.name} does not match {t.name}")
        values = [np.asarray(v) for v in s.get_weights()]
        if isinstance(t, keras.layers.DepthwiseConv2D):
            values[0] = values[0].reshape(t.kernel.shape)
        t.set_weights(values)


def build(variant: str) -> Callable[[tuple[int, int, int], str | None], keras.Model]:
    """The registry builder: ``weights`` None (random init) or "imagenet" (Keras' ImageNet
    checkpoint, downloaded and cached by Keras on first use)."""

    def builder(input_shape: tuple[int, int, int], weights: str | None) -> keras.Model:
        model = convnext(variant, input_shape)
        if weights is not None:
            copy_keras_weights(keras_convnext(variant, input_shape, weights), model)
        return model

    return builder


def _has_grouped_kernels(path: str) -> bool:
    """Whether an HDF5 weights file holds grouped-Conv2D kernels ``(7, 7, 1, C)``, i.e. was saved
    from keras.applications' build (in either the Keras 3 or the legacy layout)."""
    if not h5py.is_hdf5(path):
        return False
    shapes: list[tuple[int, ...]] = []
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda _, item: shapes.append(item.shape) if isinstance(item, h5py.Dataset) else None
        )
    return any(shape[:3] == (7, 7, 1) and len(shape) == 4 and shape[3] > 1 for shape in shapes)


def weights_loader(variant: str) -> Callable[[keras.Model, str], None]:
    """The registry's weights-file loader: a file saved from keras.applications' ConvNeXt
    (``.weights.h5`` or legacy ``.h5``, e.g. its ImageNet download for offline machines) loads
    into Keras' model and is copied over; any other file loads directly (e.g. one saved from this
    model)."""

    def load(model: keras.Model, path: str) -> None:
        if not _has_grouped_kernels(path):
            model.load_weights(path)
            return
        reference = keras_convnext(variant, tuple(model.input_shape[1:]))
        reference.load_weights(path)
        copy_keras_weights(reference, model)

    return load
