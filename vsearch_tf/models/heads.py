"""Training heads: embedding (+ labels) -> float32 class logits for
``keras.losses.SparseCategoricalCrossentropy(from_logits=True)``. Dropped after training.

Both take ``(embeddings, labels=None)``, as layers do; labels only matter to ArcFace's margin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from vsearch_tf.config import HeadConfig

# Cosines are clipped to [-1 + eps, 1 - eps] so that d/dcos sqrt(1 - cos^2) stays finite.
_COS_EPS = 1e-7


@keras.saving.register_keras_serializable(package="vsearch")
class SoftmaxHead(keras.layers.Layer):
    """A plain linear classifier on the embedding: the seed's baseline stage.

    Takes ``labels`` only to share ArcFace's call signature; computes in float32 so mixed
    precision never overflows the logits.
    """

    def __init__(self, num_classes: int, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.dense = keras.layers.Dense(self.num_classes, dtype="float32", name="logits")

    def build(self, input_shape):
        self.dense.build(input_shape)

    def call(self, embeddings, labels=None):
        return self.dense(ops.cast(embeddings, "float32"))

    def get_config(self):
        """``num_classes``: number of training products."""
        return {**super().get_config(), "num_classes": self.num_classes}


def adaptive_margins(
    class_counts: Sequence[int], margin_min: float, margin_max: float, power: float = -0.25
) -> np.ndarray:
    """Per-class ArcFace margins from class frequencies (Ha et al., Google Landmark Recognition
    2020 3rd place, arXiv:2010.05350; reused in the Universal Image Embedding and MCS2023
    solutions): ``m_c = margin_min + (margin_max - margin_min) * norm(n_c ** power)``, where
    ``norm`` min-max scales over the classes to [0, 1]. With the default ``power = -1/4`` the
    rarest class gets ``margin_max`` and the most frequent ``margin_min``; this is the published
    ``a * n_c ** -0.25 + b`` with ``a`` and ``b`` fixed by that range. Counts below 1 count as 1;
    if all counts are equal every class is the rarest and gets ``margin_max``.
    """
    x = np.maximum(np.asarray(class_counts, dtype=np.float64), 1.0) ** power
    span = x.max() - x.min()
    normalised = (x - x.min()) / span if span > 0 else np.ones_like(x)
    return (margin_min + (margin_max - margin_min) * normalised).astype(np.float32)


@keras.saving.register_keras_serializable(package="vsearch")
class ArcFace(keras.layers.Layer):
    """Additive angular margin head (ArcFace, Deng et al. 2019) with optional sub-centres
    (Deng et al. 2020) and per-class adaptive margins.

    ``call(embeddings, labels=None)`` returns float32 logits ``(B, num_classes)`` for
    ``keras.losses.SparseCategoricalCrossentropy(from_logits=True)``:

    - with labels (training): ``scale * cos(theta + m_y)`` for the true class and
      ``scale * cos(theta_j)`` for the others. Where ``theta + m > pi`` the angle can no longer
      grow, so the target logit falls back to ``scale * (cos(theta) - m * sin(pi - m))``
      (insightface's "hard margin" fallback, which keeps it monotonic in theta);
    - without labels: ``scale * cos(theta_j)``, for validation and inference.

    The class weights, ``kernel`` of shape ``(num_classes * sub_centers, D)``, and the embeddings
    are L2-normalised in the layer; row ``c * sub_centers + j`` is sub-centre ``j`` of class
    ``c``, and a class's cosine is the max over its sub-centres, so noisy or multi-modal classes
    can spread. All maths is float32: the layer defaults to a float32 dtype policy (keep it as
    the model's last layer under mixed precision) and casts inside regardless.

    Args:
        num_classes: number of classes C.
        scale: logit scale s.
        margin: additive angular margin m, in radians (unless adaptive margins are given).
        sub_centers: sub-centres per class k.
        margin_min, margin_max, class_counts: all three together switch on per-class margins,
            see :func:`adaptive_margins`; ``class_counts`` is the number of training images of
            each class, in class-index order.
    """

    def __init__(
        self,
        num_classes: int,
        scale: float = 30.0,
        margin: float = 0.5,
        sub_centers: int = 1,
        margin_min: float | None = None,
        margin_max: float | None = None,
        class_counts: Sequence[int] | None = None,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if num_classes < 1 or sub_centers < 1:
            raise ValueError(
                f"num_classes and sub_centers must be >= 1, got {num_classes}, {sub_centers}"
            )
        adaptive = (margin_min, margin_max, class_counts)
        if any(v is None for v in adaptive) and any(v is not None for v in adaptive):
            raise ValueError("Adaptive margins need margin_min, margin_max and class_counts.")
        self.num_classes = int(num_classes)
        self.scale = float(scale)
        self.margin = float(margin)
        self.sub_centers = int(sub_centers)
        self.margin_min = None if margin_min is None else float(margin_min)
        self.margin_max = None if margin_max is None else float(margin_max)
        self.class_counts = None if class_counts is None else [int(c) for c in class_counts]
        if self.class_counts is None:
            self._margins = np.full([self.num_classes], self.margin, dtype=np.float32)
        else:
            if len(self.class_counts) != self.num_classes:
                raise ValueError(
                    f"class_counts has {len(self.class_counts)} entries for "
                    f"{self.num_classes} classes."
                )
            if self.margin_min > self.margin_max:
                raise ValueError(f"margin_min {margin_min} > margin_max {margin_max}.")
            self._margins = adaptive_margins(self.class_counts, self.margin_min, self.margin_max)

    @property
    def margins(self) -> np.ndarray:
        """``(num_classes,)`` float32 margin of each class, in radians."""
        return self._margins.copy()

    def build(self, input_shape):
        self.kernel = self.add_weight(
            name="kernel",
            shape=(self.num_classes * self.sub_centers, int(input_shape[-1])),
            initializer="glorot_uniform",
            dtype="float32",
            autocast=False,
        )

    def call(self, embeddings, labels=None):
        x = tf.math.l2_normalize(tf.cast(embeddings, tf.float32), axis=-1)
        w = tf.math.l2_normalize(tf.convert_to_tensor(self.kernel), axis=-1)
        cos = tf.matmul(x, w, transpose_b=True)
        if self.sub_centers > 1:
            cos = tf.reduce_max(tf.reshape(cos, [-1, self.num_classes, self.sub_centers]), axis=2)
        cos = tf.clip_by_value(cos, -1.0 + _COS_EPS, 1.0 - _COS_EPS)
        if labels is None:
            return self.scale * cos
        labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
        m = tf.gather(tf.constant(self._margins), labels)[:, None]
        sin = tf.sqrt(1.0 - tf.square(cos))
        cos_theta_plus_m = cos * tf.cos(m) - sin * tf.sin(m)
        fallback = cos - tf.sin(math.pi - m) * m
        target = tf.where(cos > tf.cos(math.pi - m), cos_theta_plus_m, fallback)
        is_target = tf.one_hot(labels, self.num_classes, on_value=True, off_value=False)
        return self.scale * tf.where(is_target, target, cos)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def get_config(self):
        """``num_classes``, ``scale``, ``margin``, ``sub_centers``; ``margin_min``,
        ``margin_max`` and ``class_counts`` (a list of ints) are None unless margins are
        adaptive."""
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "scale": self.scale,
            "margin": self.margin,
            "sub_centers": self.sub_centers,
            "margin_min": self.margin_min,
            "margin_max": self.margin_max,
            "class_counts": self.class_counts,
        }


def build_head(
    cfg: HeadConfig, num_classes: int, class_counts: list[int]
) -> keras.layers.Layer | None:
    """The head a config asks for, None for ``type: none`` (pair losses only). ``class_counts``
    feeds ArcFace's adaptive margins."""
    if cfg.type == "none":
        return None
    if cfg.type == "softmax":
        return SoftmaxHead(num_classes, name="head")
    adaptive = cfg.margin_min is not None
    return ArcFace(
        num_classes,
        scale=cfg.scale,
        margin=cfg.margin,
        sub_centers=cfg.sub_centers,
        margin_min=cfg.margin_min,
        margin_max=cfg.margin_max,
        class_counts=class_counts if adaptive else None,
        name="head",
    )
