"""The product localizer: pixels of a whole photo -> one box around the product and a confidence.

A class-agnostic one-box regressor: a registry backbone (:mod:`vsearch_tf.models.backbones`),
then a small head, then :class:`BoxOutput`, which gives ``[x, y, w, h, confidence]`` with the
box normalised to [0, 1] of the photo's width and height (top-left origin, as the MCS2023 csvs
give boxes in pixels). The confidence is the model's own prediction of the IoU of its box with the
true one (trained against that IoU, gradient stopped), so it can be thresholded: "how sure".

Heads (``localizer.head``):

- ``spatial``: a 1x1 convolution to 64 channels, flattened (the feature map's layout survives:
  where on the grid the product is), then a hidden dense layer;
- ``pooled``: global average pooling, then a hidden dense layer (position only from what the
  features themselves encode).

Like the embedder it takes float32 RGB in [0, 255] (:mod:`vsearch_tf.data.images`) and owns its
pixel normalisation, so the SavedModel needs nothing else.
"""

from __future__ import annotations

import keras
from keras import ops

from vsearch_tf.errors import VSearchError
from vsearch_tf.models.backbones import build_backbone, get_spec, set_bn_momentum
from vsearch_tf.models.layers import pixel_normalization

HEADS = ("spatial", "pooled")


@keras.saving.register_keras_serializable(package="vsearch")
class BoxOutput(keras.layers.Layer):
    """Five logits -> ``[x, y, w, h, confidence]``: a sigmoid centre and size, the box clipped
    to the image (so it is always a valid crop), a sigmoid confidence; float32."""

    def __init__(self, min_size: float = 0.02, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.min_size = float(min_size)

    def call(self, logits):
        z = ops.cast(logits, "float32")
        centre = ops.sigmoid(z[:, :2])
        size = self.min_size + (1.0 - self.min_size) * ops.sigmoid(z[:, 2:4])
        low = ops.clip(centre - size / 2.0, 0.0, 1.0)
        high = ops.clip(centre + size / 2.0, 0.0, 1.0)
        return ops.concatenate([low, high - low, ops.sigmoid(z[:, 4:5])], axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 5)

    def get_config(self):
        """``min_size``: the smallest box side, a fraction of the image."""
        return {**super().get_config(), "min_size": self.min_size}


def build_localizer(
    backbone: str,
    image_size: int,
    weights: str = "imagenet",
    head: str = "spatial",
    hidden: int = 256,
    bn_momentum: float | None = None,
) -> keras.Model:
    """The localizer model: ``(image_size, image_size, 3)`` pixels -> ``(5,)`` per photo."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if get_spec(backbone).output != "map":
        raise VSearchError(
            f"config key localizer.backbone: {backbone} gives no feature map; the localizer's "
            "heads need a CNN backbone (set localizer.backbone)"
        )
    features, normalization = build_backbone(backbone, image_size, weights)
    set_bn_momentum(features, bn_momentum)
    pixels = keras.Input((image_size, image_size, 3), name="pixels", dtype="float32")
    x = features(pixel_normalization(normalization)(pixels))
    if head == "spatial":
        x = keras.layers.Conv2D(64, 1, activation="relu", name="reduce")(x)
        x = keras.layers.Flatten(name="flatten")(x)
    else:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.Dense(hidden, activation="relu", name="hidden")(x)
    logits = keras.layers.Dense(5, name="logits", kernel_initializer="zeros")(x)
    return keras.Model(pixels, BoxOutput(name="box")(logits), name="localizer")


def box_iou(a, b, generalized: bool = False):
    """IoU (or GIoU) of ``[..., 4]`` ``(x, y, w, h)`` boxes, elementwise over the batch."""
    a, b = ops.cast(a, "float32"), ops.cast(b, "float32")
    a1, a2 = a[..., :2], a[..., :2] + a[..., 2:4]
    b1, b2 = b[..., :2], b[..., :2] + b[..., 2:4]
    wh = ops.maximum(ops.minimum(a2, b2) - ops.maximum(a1, b1), 0.0)
    inter = wh[..., 0] * wh[..., 1]
    union = a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter
    iou = inter / ops.maximum(union, 1e-9)
    if not generalized:
        return iou
    hull = ops.maximum(a2, b2) - ops.minimum(a1, b1)
    hull_area = ops.maximum(hull[..., 0] * hull[..., 1], 1e-9)
    return iou - (hull_area - union) / hull_area


def localizer_loss(
    giou_weight: float = 1.0, l1_weight: float = 1.0, confidence_weight: float = 1.0
):
    """``loss(y_true boxes [n, 4], y_pred [n, 5])``: ``l1 * |box - true| + giou * (1 - GIoU)``
    on the box, and binary cross-entropy of the confidence against the box's own IoU (a soft
    target, its gradient stopped: the confidence learns to predict the IoU, not to move it)."""

    def loss(y_true, y_pred):
        box = y_pred[:, :4]
        l1 = ops.mean(ops.abs(box - ops.cast(y_true, "float32")), axis=-1)
        giou = 1.0 - box_iou(box, y_true, generalized=True)
        target = ops.stop_gradient(box_iou(box, y_true))
        confidence = ops.clip(y_pred[:, 4], 1e-6, 1.0 - 1e-6)
        bce = -(target * ops.log(confidence) + (1.0 - target) * ops.log(1.0 - confidence))
        return l1_weight * l1 + giou_weight * giou + confidence_weight * bce

    return loss


class MeanIoU(keras.metrics.Mean):
    """Mean IoU of the predicted box with the true one (``iou``; ``val_iou`` on validation)."""

    def __init__(self, name: str = "iou", **kwargs):
        super().__init__(name=name, **kwargs)

    def update_state(self, y_true, y_pred, sample_weight=None):
        return super().update_state(box_iou(y_pred[:, :4], y_true), sample_weight)
