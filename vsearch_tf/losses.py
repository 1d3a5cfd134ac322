"""Metric-learning losses: contrastive, triplet semi-hard and a cross-batch memory (XBM), and
:func:`build_pair_loss`, the one a config asks for. The heads they add to (ArcFace, softmax) are
in :mod:`vsearch_tf.models.heads`.

Conventions, chosen so everything drops into a custom Keras ``train_step`` under mixed precision
and a ``tf.distribute`` strategy:

- All maths is float32, whatever the dtype of the embeddings (bfloat16/float16 included).
- :class:`ContrastiveLoss` and :class:`TripletSemiHardLoss` are ``keras.losses.Loss`` subclasses,
  called as ``loss(labels, embeddings)`` (Keras' ``y_true, y_pred`` order). They return one value
  per anchor, so Keras' default ``"sum_over_batch_size"`` reduction gives the reference value and
  also divides by ``num_replicas_in_sync`` under a strategy, exactly like the
  ``keras.losses.SparseCategoricalCrossentropy`` used on a head's logits: the terms can be summed
  as they are. They also work in ``model.compile(loss=...)``.
- :class:`XBM` is a layer (its memory is state) and takes ``(embeddings, labels)``, as layers do.
- Labels are integer class indices; 0 is an ordinary class. ``keras.losses.Loss`` passes labels
  through float32, which is exact up to 2**24 classes.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from vsearch_tf.config import Config

# The XBM reference ignores "positives" at similarity >= 1 - 1e-5: the anchor itself (also as its
# own copy in the memory) and exact duplicates.
_SELF_SIMILARITY = 1.0 - 1e-5


def _gather_replicas(x: tf.Tensor) -> tf.Tensor:
    """Concatenate ``x`` over replicas along axis 0 when called in a multi-replica context."""
    ctx = tf.distribute.get_replica_context()
    if ctx is not None and ctx.num_replicas_in_sync > 1:
        return ctx.all_gather(x, axis=0)
    return x


def _as_embeddings(embeddings) -> tf.Tensor:
    x = tf.cast(embeddings, tf.float32)
    if x.shape.rank != 2:
        raise ValueError(
            f"Embeddings must have shape (batch, dim), got {x.shape}; "
            "losses take (labels, embeddings), layers take (embeddings, labels)."
        )
    return x


def _as_labels(labels) -> tf.Tensor:
    return tf.reshape(tf.cast(labels, tf.int64), [-1])


def contrastive_loss(
    labels,
    embeddings,
    ref_labels=None,
    ref_embeddings=None,
    margin: float = 0.5,
    ref_mask=None,
) -> tf.Tensor:
    """Cosine contrastive loss of the XBM paper (Wang et al., CVPR 2020), one value per anchor.

    For anchor ``i`` and references ``j`` (the batch itself, or e.g. a memory), with
    ``s_ij = <e_i, r_j>``::

        loss_i = sum_{j positive, s_ij < 1 - 1e-5} (1 - s_ij) + sum_{j negative, s_ij > margin} s_ij

    The mean of the result over anchors is the reference implementation's value
    (msight-tech/research-xbm ``ContrastiveLoss``: the sum over anchors divided by the number of
    anchors, not by the number of pairs). Without references the batch is its own reference and
    the anchor is never its own positive.

    Args:
        labels: ``(B,)`` integer class indices of the anchors.
        embeddings: ``(B, D)`` L2-normalised anchors.
        ref_labels: ``(M,)`` class indices of the references, with ``ref_embeddings``.
        ref_embeddings: ``(M, D)`` L2-normalised references.
        margin: negatives with a similarity at or below this cost nothing.
        ref_mask: optional ``(M,)`` booleans; references where it is False are ignored (the
            unfilled slots of a fixed-size memory, which keeps shapes static for XLA).

    Returns:
        ``(B,)`` float32 losses.
    """
    if (ref_labels is None) != (ref_embeddings is None):
        raise ValueError("Give both ref_labels and ref_embeddings, or neither.")
    labels, x = _as_labels(labels), _as_embeddings(embeddings)
    if ref_embeddings is None:
        ref_labels, ref = labels, x
    else:
        ref_labels, ref = _as_labels(ref_labels), _as_embeddings(ref_embeddings)
    sim = tf.matmul(x, ref, transpose_b=True)
    same = tf.equal(labels[:, None], ref_labels[None, :])
    positive = same & (sim < _SELF_SIMILARITY)
    if ref_embeddings is None:
        positive &= tf.logical_not(tf.eye(tf.shape(x)[0], dtype=tf.bool))
    negative = tf.logical_not(same) & (sim > margin)
    if ref_mask is not None:
        positive &= ref_mask[None, :]
        negative &= ref_mask[None, :]
    zeros = tf.zeros_like(sim)
    return tf.reduce_sum(tf.where(positive, 1.0 - sim, zeros) + tf.where(negative, sim, zeros), 1)


@keras.saving.register_keras_serializable(package="vsearch")
class ContrastiveLoss(keras.losses.Loss):
    """XBM's cosine contrastive loss on a batch; see :func:`contrastive_loss`.

    Call as ``loss(labels, embeddings)``. With the default reduction the value equals the
    research-xbm reference (sum over anchors / batch size).
    """

    def __init__(
        self,
        margin: float = 0.5,
        name: str = "contrastive_loss",
        reduction: str | None = "sum_over_batch_size",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.margin = float(margin)

    def call(self, y_true, y_pred):
        return contrastive_loss(y_true, y_pred, margin=self.margin)

    def get_config(self):
        """``margin``: similarity above which a negative pair is penalised."""
        return {**super().get_config(), "margin": self.margin}


def _squared_distances(x: tf.Tensor) -> tf.Tensor:
    """Pairwise squared L2 distances as TensorFlow Addons computes them: clamped at 0, with an
    exactly zero diagonal."""
    sq = tf.reduce_sum(tf.square(x), axis=1)
    d = tf.maximum(sq[:, None] + sq[None, :] - 2.0 * tf.matmul(x, x, transpose_b=True), 0.0)
    return tf.linalg.set_diag(d, tf.zeros_like(sq))


@keras.saving.register_keras_serializable(package="vsearch")
class TripletSemiHardLoss(keras.losses.Loss):
    """Triplet loss with semi-hard negative mining, with the semantics of TensorFlow Addons'
    ``tfa.losses.TripletSemiHardLoss`` (default ``distance_metric="L_2"``: squared Euclidean
    distance between the given embeddings), in plain TensorFlow ops because Addons is
    end-of-life and does not import with Keras 3.

    For every positive pair (a, p), a != p, the negative is the closest one farther than
    ``d(a, p)`` (semi-hard), or, if there is none, the farthest negative of ``a``; the loss is
    ``mean over positive pairs of max(margin + d(a, p) - d(a, n), 0)``.

    Differences from Addons: a batch without positive pairs gives 0, not NaN; the result is
    float32 (Addons casts back to the embeddings' dtype). To get Keras' distribution scaling,
    ``call`` returns each anchor's share of the mean (``B * sum_p loss_ap / num_positive_pairs``),
    so the default reduction yields exactly Addons' value; ``sample_weight`` weights anchors.
    """

    def __init__(
        self,
        margin: float = 1.0,
        name: str = "triplet_semihard_loss",
        reduction: str | None = "sum_over_batch_size",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.margin = float(margin)

    def call(self, y_true, y_pred):
        labels, x = _as_labels(y_true), _as_embeddings(y_pred)
        d = _squared_distances(x)
        same = tf.equal(labels[:, None], labels[None, :])
        negative = tf.logical_not(same)
        # [a, p, n]: n is a negative of a farther from a than p is.
        outside = negative[:, None, :] & (d[:, None, :] > d[:, :, None])
        d_an = tf.broadcast_to(d[:, None, :], tf.shape(outside))
        semi_hard = tf.reduce_min(tf.where(outside, d_an, tf.reduce_max(d)), axis=2)
        # Distances are >= 0, so 0 is a neutral fill; an anchor without negatives gets 0, as in
        # Addons.
        hardest_easy = tf.reduce_max(tf.where(negative, d, tf.zeros_like(d)), axis=1)
        d_neg = tf.where(tf.reduce_any(outside, axis=2), semi_hard, hardest_easy[:, None])
        positive = same & tf.logical_not(tf.eye(tf.shape(x)[0], dtype=tf.bool))
        per_pair = tf.where(positive, tf.maximum(self.margin + d - d_neg, 0.0), tf.zeros_like(d))
        batch = tf.cast(tf.shape(x)[0], tf.float32)
        num_positive = tf.reduce_sum(tf.cast(positive, tf.float32))
        return tf.math.divide_no_nan(tf.reduce_sum(per_pair, axis=1) * batch, num_positive)

    def get_config(self):
        """``margin``: the triplet margin, in squared-distance units."""
        return {**super().get_config(), "margin": self.margin}


@keras.saving.register_keras_serializable(package="vsearch")
class XBM(keras.layers.Layer):
    """Cross-batch memory (Wang et al., "Cross-Batch Memory for Embedding Learning", CVPR 2020).

    A FIFO ring buffer of the last ``memory_size`` embeddings and labels lets the contrastive
    loss see far more negatives than one batch holds; embeddings drift slowly once training has
    warmed up, so stale entries stay useful. The state is non-trainable weights of this layer
    (``embeddings``, ``labels``, ``pointer``, ``filled``), so it is checkpointed with the model
    that owns the layer; ``filled`` counts valid entries, so label 0 is never taken for "empty".

    Under a ``tf.distribute`` strategy, construct the layer inside ``strategy.scope()`` and call
    :meth:`enqueue` in replica context (inside ``train_step``): the batch is all-gathered over
    replicas first (replica 0's rows first), so every replica keeps an identical memory of the
    global batches; the weights use ``aggregation="only_first_replica"`` so the identical
    updates are allowed from replica context.

    Per step, in the reference order: ``xbm.enqueue(emb, y)`` and then
    ``xbm.loss(emb, y, step)``. The current batch is then in the memory too; its self-pairs are
    ignored by the contrastive loss's ``s < 1 - 1e-5`` rule, as in the reference.

    Args:
        memory_size: number of past embeddings kept.
        embedding_dim: embedding width D.
        weight: weight of the batch-vs-memory term.
        start_step: the memory term counts from this step on (0: from the start).
        margin: negative margin of :func:`contrastive_loss`.
    """

    def __init__(
        self,
        memory_size: int,
        embedding_dim: int,
        weight: float = 1.0,
        start_step: int = 0,
        margin: float = 0.5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if memory_size < 1 or embedding_dim < 1:
            raise ValueError(
                f"memory_size and embedding_dim must be >= 1, got {memory_size}, {embedding_dim}"
            )
        self.memory_size = int(memory_size)
        self.embedding_dim = int(embedding_dim)
        self.weight = float(weight)
        self.start_step = int(start_step)
        self.margin = float(margin)

        def state(name: str, shape: tuple[int, ...], dtype: str):
            return self.add_weight(
                name=name,
                shape=shape,
                initializer="zeros",
                dtype=dtype,
                trainable=False,
                autocast=False,
                aggregation="only_first_replica",
            )

        self.embeddings = state("embeddings", (self.memory_size, self.embedding_dim), "float32")
        self.labels = state("labels", (self.memory_size,), "int64")
        self.pointer = state("pointer", (), "int64")
        self.filled = state("filled", (), "int64")
        self.built = True

    def enqueue(self, embeddings, labels) -> None:
        """Write a batch (gathered over replicas) at the pointer, wrapping around the end; if it
        is larger than the memory only its last ``memory_size`` rows are kept."""
        x = _gather_replicas(tf.stop_gradient(_as_embeddings(embeddings)))[-self.memory_size :]
        y = _gather_replicas(_as_labels(labels))[-self.memory_size :]
        n = tf.shape(y, out_type=tf.int64)[0]
        pointer = tf.convert_to_tensor(self.pointer)
        slots = (pointer + tf.range(n)) % self.memory_size
        # tf.Variable.scatter_update, unlike scatter_nd_update, is implemented for the
        # MirroredVariables a strategy creates.
        self.embeddings.value.scatter_update(tf.IndexedSlices(x, slots))
        self.labels.value.scatter_update(tf.IndexedSlices(y, slots))
        self.pointer.assign((pointer + n) % self.memory_size)
        self.filled.assign(tf.minimum(tf.convert_to_tensor(self.filled) + n, self.memory_size))

    def memory(self) -> tuple[tf.Tensor, tf.Tensor]:
        """The filled part of the memory: ``(embeddings (M, D) float32, labels (M,) int64)``, in
        slot order (not time order, which the loss does not need). Its shape depends on a
        variable, so use it eagerly or in plain ``tf.function``, not under XLA."""
        filled = tf.convert_to_tensor(self.filled)
        return (
            tf.convert_to_tensor(self.embeddings)[:filled],
            tf.convert_to_tensor(self.labels)[:filled],
        )

    def loss(self, embeddings, labels, step) -> tf.Tensor:
        """``contrastive(batch, batch) + weight * contrastive(batch, memory)``, both averaged over
        the batch's anchors as in the reference, the memory term only once ``step >=
        start_step``. No gradient flows into the memory.

        Like a ``keras.losses.Loss`` the result is divided by ``num_replicas_in_sync`` under a
        strategy, so it can be added to Keras losses as is.
        """
        batch = contrastive_loss(labels, embeddings, margin=self.margin)
        # The whole buffer with a mask rather than memory(): static shapes, so this compiles
        # under XLA, which Keras' jit_compile="auto" turns on for a single GPU.
        cross = contrastive_loss(
            labels,
            embeddings,
            tf.convert_to_tensor(self.labels),
            tf.stop_gradient(tf.convert_to_tensor(self.embeddings)),
            margin=self.margin,
            ref_mask=tf.range(self.memory_size, dtype=tf.int64) < tf.convert_to_tensor(self.filled),
        )
        step = tf.convert_to_tensor(step)
        active = tf.cast(step >= tf.cast(self.start_step, step.dtype), tf.float32)
        value = tf.reduce_mean(batch + self.weight * active * cross)
        return value / tf.distribute.get_strategy().num_replicas_in_sync

    def get_config(self):
        """``memory_size``, ``embedding_dim``, ``weight``, ``start_step``, ``margin``."""
        return {
            **super().get_config(),
            "memory_size": self.memory_size,
            "embedding_dim": self.embedding_dim,
            "weight": self.weight,
            "start_step": self.start_step,
            "margin": self.margin,
        }


def build_pair_loss(cfg: Config) -> keras.losses.Loss | XBM | None:
    """The pair loss ``cfg.loss`` asks for, added to the head's loss in training: None, a
    contrastive or triplet loss on the batch, or (``xbm_size > 0``, contrastive only) a
    cross-batch memory whose loss includes the batch's own contrastive term."""
    loss = cfg.loss
    if loss.xbm_size:
        return XBM(
            loss.xbm_size,
            cfg.model.embedding_dim,
            weight=loss.xbm_weight,
            start_step=loss.xbm_start_step,
            margin=loss.pair_margin,
            name="xbm",
        )
    if loss.pair == "contrastive":
        return ContrastiveLoss(margin=loss.pair_margin)
    if loss.pair == "triplet":
        return TripletSemiHardLoss(margin=loss.pair_margin)
    return None
