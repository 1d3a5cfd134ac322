"""The training model: the embedder plus what only training needs (head, pair loss, two
optimizers and their schedules), with its own ``train_step``.

As in a keras-hub task, the embedder is the part that is kept and exported; :class:`RetrievalModel`
wraps it for ``fit`` and :func:`build_retrieval_model` builds the whole of it from a config.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from vsearch_tf.config import Config, TrainConfig
from vsearch_tf.losses import XBM, build_pair_loss
from vsearch_tf.models.embedder import backbone_of, build_embedder
from vsearch_tf.models.heads import build_head


@keras.saving.register_keras_serializable(package="vsearch")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Zero for ``hold`` steps (a frozen backbone), linear warm-up, then cosine decay to zero."""

    def __init__(
        self, base_lr: float, total_steps: int, warmup_steps: int = 0, hold_steps: int = 0
    ):
        self.base_lr = float(base_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.hold_steps = int(hold_steps)

    def __call__(self, step):
        step = tf.cast(step, tf.float32) - self.hold_steps
        warm = max(self.warmup_steps, 1)
        decay = max(self.total_steps - self.hold_steps - self.warmup_steps, 1)
        warmup = self.base_lr * (step + 1.0) / warm
        progress = tf.clip_by_value((step - self.warmup_steps) / decay, 0.0, 1.0)
        cosine = 0.5 * self.base_lr * (1.0 + tf.cos(math.pi * progress))
        lr = tf.where(step < self.warmup_steps, warmup, cosine)
        return tf.where(step < 0, 0.0, lr)

    def get_config(self):
        return {
            "base_lr": self.base_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "hold_steps": self.hold_steps,
        }


def build_optimizer(
    cfg: TrainConfig, schedule: keras.optimizers.schedules.LearningRateSchedule
) -> keras.optimizers.Optimizer:
    """``cfg.optimizer`` with weight decay and clipping, loss-scaled under ``mixed_float16``."""
    if cfg.optimizer == "sgd":
        opt = keras.optimizers.SGD(
            schedule,
            momentum=0.9,
            weight_decay=cfg.weight_decay or None,
            global_clipnorm=cfg.clip_norm,
        )
    else:
        opt = keras.optimizers.AdamW(
            schedule, weight_decay=cfg.weight_decay, global_clipnorm=cfg.clip_norm
        )
    if cfg.mixed_precision == "mixed_float16":
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt


class RetrievalModel(keras.Model):
    """Embedder + training head + pair loss, with its own ``train_step``.

    Two optimizers, because the pretrained backbone wants a smaller learning rate than the fresh
    projection and head (Keras optimizers have one rate each). Keras losses divide the per-replica
    mean by the number of replicas, so summed gradients are those of the global-batch mean.
    ``pair_loss`` is a ``keras.losses.Loss`` called as ``loss(labels, embeddings)``, or an
    :class:`~vsearch_tf.losses.XBM`, whose memory is state of this model (checkpointed with it).
    """

    def __init__(
        self,
        embedder: keras.Model,
        head: keras.layers.Layer | None,
        pair_loss: keras.losses.Loss | XBM | None = None,
        pair_weight: float = 1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.embedder = embedder
        self.head = head
        # Two attributes: the memory is tracked (and checkpointed) under the name "xbm".
        self.xbm = pair_loss if isinstance(pair_loss, XBM) else None
        self.pair_loss = None if self.xbm is not None else pair_loss
        self.pair_weight = float(pair_weight)
        self.loss_fn = keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="sum_over_batch_size"
        )
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.acc_tracker = keras.metrics.SparseCategoricalAccuracy(name="accuracy")

    def build(self, input_shape):
        # The embedder is a built functional model; build_retrieval_model builds the head.
        self.built = True

    def call(self, inputs, training=False):
        return self.embedder(inputs, training=training)

    @property
    def metrics(self):
        return [self.loss_tracker] + ([self.acc_tracker] if self.head is not None else [])

    def compile_optimizers(
        self,
        backbone_opt: keras.optimizers.Optimizer,
        head_opt: keras.optimizers.Optimizer,
        jit_compile: bool = False,
    ):
        self.compile(optimizer=head_opt, jit_compile=jit_compile)
        backbone_ids = {id(v) for v in backbone_of(self.embedder).trainable_variables}
        # object.__setattr__: plain references, not new state for Keras' layer tracking.
        object.__setattr__(self, "backbone_optimizer", backbone_opt)
        object.__setattr__(
            self, "backbone_vars", [v for v in self.trainable_variables if id(v) in backbone_ids]
        )
        object.__setattr__(
            self, "head_vars", [v for v in self.trainable_variables if id(v) not in backbone_ids]
        )
        self.optimizer.build(self.head_vars)
        self.backbone_optimizer.build(self.backbone_vars)
        # Keras clips each replica's gradient before the all-reduce: with N replicas that is an
        # N times looser threshold. With several replicas, train_step clips the summed gradient.
        strategy = tf.distribute.get_strategy()
        norms = []
        for opt in (head_opt, backbone_opt):
            inner = getattr(opt, "inner_optimizer", opt)  # a LossScaleOptimizer's wrapped optimizer
            norms.append(inner.global_clipnorm if strategy.num_replicas_in_sync > 1 else None)
            if strategy.num_replicas_in_sync > 1:
                inner.global_clipnorm = None
        object.__setattr__(self, "clip_norms", tuple(norms))
        # More replicas than local devices: replicas on other hosts.
        object.__setattr__(
            self,
            "multi_worker",
            isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and strategy.num_replicas_in_sync > len(strategy.extended.worker_devices),
        )

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras' version reduces a first batch with ``strategy.reduce`` on a tuple, which
        # MultiWorkerMirroredStrategy rejects (keras-team/keras#20585); build_retrieval_model
        # has built every weight and optimizer before fit, so there is nothing to build.
        return None

    def train_step(self, data):
        images, labels = data
        with tf.GradientTape() as tape:
            embeddings = self.embedder(images, training=True)
            # Keras losses (and XBM's) divide by the replica count: summed gradients are exact.
            loss = tf.constant(0.0)
            if self.head is not None:
                logits = self.head(embeddings, labels, training=True)
                loss += self.loss_fn(labels, logits)
            if self.xbm is not None:  # batch contrastive + batch-vs-memory contrastive
                self.xbm.enqueue(embeddings, labels)
                loss += self.pair_weight * self.xbm.loss(
                    embeddings, labels, self.optimizer.iterations
                )
            elif self.pair_loss is not None:
                loss += self.pair_weight * self.pair_loss(labels, embeddings)
            scaled = self.optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, self.head_vars + self.backbone_vars)
        head_grads, backbone_grads = grads[: len(self.head_vars)], grads[len(self.head_vars) :]
        head_clip, backbone_clip = self.clip_norms
        if head_clip:
            head_grads = _clip_summed(head_grads, head_clip, _loss_scale(self.optimizer))
        if backbone_clip:
            backbone_grads = _clip_summed(
                backbone_grads, backbone_clip, _loss_scale(self.optimizer)
            )
        # Gradients carry the head optimizer's loss scale (1 unless mixed_float16); re-express
        # them in the backbone optimizer's scale so each LossScaleOptimizer unscales its own.
        ratio = _loss_scale(self.backbone_optimizer) / _loss_scale(self.optimizer)
        self.optimizer.apply(head_grads, self.head_vars)
        self.backbone_optimizer.apply(
            [_scaled(g, ratio) for g in backbone_grads], self.backbone_vars
        )
        self.loss_tracker.update_state(loss * tf.distribute.get_strategy().num_replicas_in_sync)
        logs = {"loss": self.loss_tracker.result()}
        if self.head is not None:
            self.acc_tracker.update_state(labels, logits)
            logs["accuracy"] = self.acc_tracker.result()
        if self.multi_worker:
            # Keras averages logs over workers with reduce(MEAN, axis=0): give them an axis.
            logs = {key: tf.reshape(value, [1]) for key, value in logs.items()}
        return logs


def _scaled(grad, factor):
    """``grad * factor`` for dense and sparse (embedding lookup) gradients; None (a variable the
    loss does not reach, e.g. DINOv2's mask token) stays None."""
    if grad is None:
        return None
    if isinstance(grad, tf.IndexedSlices):
        return tf.IndexedSlices(grad.values * factor, grad.indices, grad.dense_shape)
    return grad * factor


def _loss_scale(opt: keras.optimizers.Optimizer):
    return tf.cast(opt.dynamic_scale, tf.float32) if hasattr(opt, "dynamic_scale") else 1.0


def _clip_summed(grads: list, clip_norm: float, loss_scale) -> list:
    """Scale this replica's gradients so that their sum over all replicas (what the optimizer
    applies) has global norm <= ``clip_norm``, as one replica's clipping would. Costs one extra
    all-reduce per step. A non-finite norm (float16 overflow) is left to the loss-scale
    optimizer."""
    present = [g for g in grads if g is not None]
    total = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, present)
    norm = tf.linalg.global_norm(total) / loss_scale
    factor = tf.where(
        tf.math.is_finite(norm), tf.minimum(1.0, clip_norm / tf.maximum(norm, 1e-12)), 1.0
    )
    return [None if g is None else g * tf.cast(factor, g.dtype) for g in grads]


def build_retrieval_model(
    cfg: Config, class_counts: list[int], steps_per_epoch: int
) -> RetrievalModel:
    """The model ``cfg`` describes, every weight and optimizer slot built (call it inside the
    strategy's scope). ``class_counts``: training images per class, in class-index order (the
    head's size and ArcFace's adaptive margins); ``steps_per_epoch`` places the schedules."""
    m = cfg.model
    embedder = build_embedder(
        m.backbone,
        cfg.data.image_size,
        m.embedding_dim,
        pooling=m.pooling,
        weights=m.weights,
        dropout=m.dropout,
        bn_momentum=m.bn_momentum,
    )
    head = build_head(cfg.head, len(class_counts), class_counts)
    model = RetrievalModel(
        embedder, head, build_pair_loss(cfg), cfg.loss.pair_weight, name="retrieval"
    )
    model(keras.ops.zeros((1, cfg.data.image_size, cfg.data.image_size, 3)))
    if head is not None:
        head(keras.ops.zeros((1, embedder.output.shape[-1])), keras.ops.zeros((1,), "int32"))
    t = cfg.train
    total = max(t.epochs * steps_per_epoch, 1)
    warmup = int(t.warmup_epochs * steps_per_epoch)
    hold = t.freeze_backbone_epochs * steps_per_epoch
    head_opt = build_optimizer(t, WarmupCosine(t.lr, total, warmup))
    backbone_lr = WarmupCosine(t.lr * t.backbone_lr_mult, total, warmup, hold)
    model.compile_optimizers(build_optimizer(t, backbone_lr), head_opt, t.jit_compile)
    return model
