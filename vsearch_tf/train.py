"""Training: a config in, a run directory out.

Run directory::

    config.yml            the resolved config (re-run it with ``vsearch train --config``)
    classes.json          product id -> class index of the head
    checkpoints/          tf.train checkpoints of model + optimizers + epoch (``--resume``)
    metrics.csv           one row per epoch: loss, lr, val mAP@1000, Recall@K
    logs/                 TensorBoard
    embedder.keras        the final embedder: best by validation mAP when there is validation data
    embedder.weights.h5   its weights (what ``init_from`` loads)
    head.weights.npz      the head's weights (reused by a next stage with the same classes)
    summary.json          best epoch and its metrics, time taken
    curves.png            training curves

The model is built under a ``tf.distribute`` strategy, the loss is averaged over the global
batch, and only the chief worker writes, so the same code runs on one CPU or many hosts.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from vsearch_tf import io
from vsearch_tf.config import Config, dump_config
from vsearch_tf.data import prepared
from vsearch_tf.data.pipeline import training_dataset, unreadable_rows, why_unreadable
from vsearch_tf.data.tables import ImageTable, read_gallery, read_queries, read_training
from vsearch_tf.errors import VSearchError, one_line
from vsearch_tf.index import ExactSearcher
from vsearch_tf.inference import embed_table
from vsearch_tf.losses import XBM, ContrastiveLoss, TripletSemiHardLoss
from vsearch_tf.metrics import evaluate
from vsearch_tf.models.embedder import backbone_of, build_embedder
from vsearch_tf.models.heads import build_head


def make_strategy(name: str) -> tf.distribute.Strategy:
    """``auto`` mirrors over all local GPUs when there are several, else uses the default."""
    if name == "multi_worker":  # first: listing devices starts the runtime, after which collective
        return tf.distribute.MultiWorkerMirroredStrategy()  # ops can no longer be configured
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise VSearchError(f"unknown strategy {name!r}")


def is_chief() -> bool:
    """True unless TF_CONFIG names this process as a non-chief worker."""
    task = json.loads(os.environ.get("TF_CONFIG", "{}")).get("task", {})
    cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    if not task:
        return True
    if "chief" in cluster:
        return task.get("type") == "chief"
    return task.get("type") == "worker" and int(task.get("index", 0)) == 0


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
        cosine = (
            0.5
            * self.base_lr
            * (
                1.0
                + tf.cos(math.pi * tf.clip_by_value((step - self.warmup_steps) / decay, 0.0, 1.0))
            )
        )
        lr = tf.where(step < self.warmup_steps, warmup, cosine)
        return tf.where(step < 0, 0.0, lr)

    def get_config(self):
        return {
            "base_lr": self.base_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "hold_steps": self.hold_steps,
        }


def _optimizer(cfg: Config, schedule: WarmupCosine) -> keras.optimizers.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        opt = keras.optimizers.SGD(
            schedule, momentum=0.9, weight_decay=t.weight_decay or None, global_clipnorm=t.clip_norm
        )
    else:
        opt = keras.optimizers.AdamW(
            schedule, weight_decay=t.weight_decay, global_clipnorm=t.clip_norm
        )
    if t.mixed_precision == "mixed_float16":
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt


class RetrievalModel(keras.Model):
    """Embedder + training head, with its own ``train_step``.

    Two optimizers, because the pretrained backbone wants a smaller learning rate than the fresh
    projection and head (Keras optimizers have one rate each). Keras losses divide the per-replica
    mean by the number of replicas, so summed gradients are those of the global-batch mean.
    """

    def __init__(
        self,
        embedder: keras.Model,
        head: keras.layers.Layer | None,
        pair_loss: keras.losses.Loss | None = None,
        pair_weight: float = 1.0,
        xbm: XBM | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.embedder = embedder
        self.head = head
        self.xbm = xbm
        self.pair_loss = pair_loss
        self.pair_weight = float(pair_weight)
        self.loss_fn = keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="sum_over_batch_size"
        )
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.acc_tracker = keras.metrics.SparseCategoricalAccuracy(name="accuracy")

    def build(self, input_shape):
        # The embedder is a built functional model; the head and memory are built in train().
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
        # MultiWorkerMirroredStrategy rejects (keras-team/keras#20585); train() has built every
        # weight and optimizer before fit, so there is nothing to build.
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
        self.backbone_optimizer.apply([g * ratio for g in backbone_grads], self.backbone_vars)
        self.loss_tracker.update_state(loss * tf.distribute.get_strategy().num_replicas_in_sync)
        logs = {"loss": self.loss_tracker.result()}
        if self.head is not None:
            self.acc_tracker.update_state(labels, logits)
            logs["accuracy"] = self.acc_tracker.result()
        if (
            self.multi_worker
        ):  # Keras averages logs over workers with reduce(MEAN, axis=0): give them an axis
            logs = {key: tf.reshape(value, [1]) for key, value in logs.items()}
        return logs


def _loss_scale(opt: keras.optimizers.Optimizer):
    return tf.cast(opt.dynamic_scale, tf.float32) if hasattr(opt, "dynamic_scale") else 1.0


def _clip_summed(grads: list, clip_norm: float, loss_scale) -> list:
    """Scale this replica's gradients so that their sum over all replicas (what the optimizer
    applies) has global norm <= ``clip_norm``, as one replica's clipping would. Costs one extra
    all-reduce per step. A non-finite norm (float16 overflow) is left to the loss-scale optimizer."""
    present = [g for g in grads if g is not None]
    total = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, present)
    norm = tf.linalg.global_norm(total) / loss_scale
    factor = tf.where(
        tf.math.is_finite(norm), tf.minimum(1.0, clip_norm / tf.maximum(norm, 1e-12)), 1.0
    )
    return [None if g is None else g * tf.cast(factor, g.dtype) for g in grads]


class Validation(keras.callbacks.Callback):
    """Validation mAP@1000 / Recall@K on a held-out gallery and queries, added to the epoch logs
    (so metrics.csv, TensorBoard and early stopping see them); keeps the best embedder weights."""

    def __init__(
        self,
        embedder: keras.Model,
        gallery: ImageTable,
        queries: ImageTable,
        image_size: int,
        batch_size: int,
        every: int,
        best_path: Path | None,
        max_pixels: int,
    ):
        super().__init__()
        self.embedder, self.gallery, self.queries = embedder, gallery, queries
        self.image_size, self.batch_size, self.every, self.max_pixels = (
            image_size,
            batch_size,
            every,
            max_pixels,
        )
        self.best_path = best_path
        self.best: dict[str, Any] = {"val_map": -1.0}
        self._fn = tf.function(lambda x: embedder(x, training=False), reduce_retracing=True)

    def measure(self) -> dict[str, float]:
        g, g_report = embed_table(
            self._fn, self.gallery, self.image_size, self.batch_size, max_pixels=self.max_pixels
        )
        q, q_report = embed_table(
            self._fn, self.queries, self.image_size, self.batch_size, max_pixels=self.max_pixels
        )
        idx, _ = ExactSearcher(g).search(q, 1000)
        result = evaluate(
            self.gallery.products[g_report.rows][idx],
            self.queries.products[q_report.rows],
            self.gallery.products[g_report.rows],
            k=1000,
        )
        return {
            "val_map": result.map_at_k,
            **{f"val_recall@{k}": v for k, v in result.recall.items()},
        }

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or (epoch + 1) % self.every:
            return
        logs.update(self.measure())
        if logs["val_map"] > self.best["val_map"]:
            self.best = {"epoch": epoch + 1, **{k: float(v) for k, v in logs.items()}}
            if self.best_path is not None:
                with io.atomic_path(self.best_path) as tmp:
                    self.embedder.save_weights(tmp)


class MetricsLog(keras.callbacks.Callback):
    """``metrics.csv``, one row per epoch, rewritten whole and atomically each epoch (Keras'
    CSVLogger appends in place, so a kill mid-write leaves a torn last line). Runs before
    :class:`Checkpointing`: a row whose checkpoint never got written is dropped on resume."""

    def __init__(self, path: Path, previous: pd.DataFrame):
        super().__init__()
        self.path, self.rows = path, previous.to_dict("records")

    def on_epoch_end(self, epoch, logs=None):
        self.rows.append({"epoch": epoch, **{k: float(v) for k, v in sorted((logs or {}).items())}})
        io.write_text(self.path, pd.DataFrame(self.rows).to_csv(index=False))


class Checkpointing(keras.callbacks.Callback):
    """Model + both optimizers + epoch, every epoch, through ``tf.train.CheckpointManager`` (whose
    index file is replaced atomically), so ``--resume`` continues the schedule where it stopped."""

    def __init__(self, manager: tf.train.CheckpointManager, epoch: tf.Variable):
        super().__init__()
        self.manager, self.epoch = manager, epoch

    def on_epoch_end(self, epoch, logs=None):
        self.epoch.assign(epoch + 1)
        self.manager.save(checkpoint_number=epoch + 1)


class RichProgress(keras.callbacks.Callback):
    """A rich progress bar per epoch with the running loss; the bar is the CLI's only output."""

    def __init__(self, epochs: int, steps: int):
        super().__init__()
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.epochs, self.steps = epochs, steps
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        )

    def on_train_begin(self, logs=None):
        self.progress.start()

    def on_epoch_begin(self, epoch, logs=None):
        self.task = self.progress.add_task(
            "", total=self.steps, epoch=f"{epoch + 1}/{self.epochs}", info=""
        )

    def on_train_batch_end(self, batch, logs=None):
        self.progress.update(
            self.task, advance=1, info=f"loss {float(logs.get('loss', math.nan)):.4f}"
        )

    def on_epoch_end(self, epoch, logs=None):
        shown = {
            k: v
            for k, v in (logs or {}).items()
            if k in ("loss", "accuracy", "val_map", "val_recall@1")
        }
        self.progress.update(
            self.task, info="  ".join(f"{k} {float(v):.4f}" for k, v in shown.items())
        )

    def on_train_end(self, logs=None):
        self.progress.stop()


def _labels(table: ImageTable) -> tuple[np.ndarray, list[str], list[int]]:
    classes, labels, counts = np.unique(table.products, return_inverse=True, return_counts=True)
    return labels.astype(np.int32), classes.tolist(), counts.tolist()


def _load_previous(
    init_from: Path, embedder: keras.Model, head: keras.layers.Layer | None, classes: list[str]
) -> str:
    try:
        embedder.load_weights(init_from / "embedder.weights.h5")
    except Exception as err:
        raise VSearchError(
            f"run.init_from: {init_from} holds a different embedder "
            f"(backbone, pooling or embedding_dim changed): {one_line(err)}"
        ) from None
    prev_classes = json.loads((init_from / "classes.json").read_text())
    head_path = init_from / "head.weights.npz"
    if head is not None and prev_classes == classes and head_path.is_file():
        with np.load(head_path) as saved:
            weights = [saved[f"arr_{i}"] for i in range(len(saved.files))]
        if [w.shape for w in weights] == [tuple(v.shape) for v in head.weights]:
            head.set_weights(weights)
            return "embedder and head"
    return "embedder"  # other classes or another head type: the head starts fresh


def _read_inputs(cfg: Config) -> tuple[ImageTable, ImageTable | None, ImageTable | None]:
    root = Path(cfg.data.root)
    train = read_training(root / cfg.data.train_csv, root)
    if cfg.data.val_gallery_csv is None:
        return train, None, None
    return (
        train,
        read_gallery(root / cfg.data.val_gallery_csv, root),
        read_queries(root / cfg.data.val_queries_csv, root),
    )


def _readable(table: ImageTable, cfg: Config) -> tuple[ImageTable, list[dict[str, str]]]:
    """Drop unreadable training images, or fail if more than ``data.max_bad_fraction`` of them are:
    a few broken files should not stop a long run, a broken dataset should not train quietly."""
    bad = unreadable_rows(table, cfg.data.max_pixels)
    reasons = why_unreadable(table, bad, cfg.data.max_pixels)
    skipped = [{"path": str(table.paths[r]), "reason": why} for r, why in zip(bad, reasons)]
    if len(bad) > cfg.data.max_bad_fraction * len(table):
        raise VSearchError(
            f"{table.source}: {len(bad)} of {len(table)} training images are unreadable "
            f"({len(bad) / len(table):.1%} > data.max_bad_fraction={cfg.data.max_bad_fraction:g}); "
            f"first: {skipped[0]['path']}: {skipped[0]['reason']}"
        )
    keep = np.ones(len(table), bool)
    keep[bad] = False
    return table.subset(keep), skipped


def _previous_epochs(path: Path, initial_epoch: int) -> pd.DataFrame:
    """The metrics rows of the epochs a resumed run keeps (those its checkpoint includes)."""
    if initial_epoch == 0 or not path.is_file() or not path.stat().st_size:
        return pd.DataFrame()
    done = pd.read_csv(path)
    return done[done["epoch"] < initial_epoch]


def train(cfg: Config, *, resume: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """Train per ``cfg`` and write its run directory; returns the summary."""
    start = time.time()
    run_dir = cfg.run_dir
    if run_dir.exists() and (run_dir / "summary.json").exists() and not resume:
        raise VSearchError(
            f"{run_dir}: a finished run is already there; pick another run.name or delete it"
        )
    if (
        run_dir.exists()
        and any(run_dir.iterdir())
        and not resume
        and not (run_dir / "checkpoints").exists()
    ):
        raise VSearchError(f"{run_dir}: folder exists and is not a run; pick another run.name")
    keras.utils.set_random_seed(cfg.run.seed)
    keras.mixed_precision.set_global_policy(
        "float32" if cfg.train.mixed_precision == "off" else cfg.train.mixed_precision
    )
    chief = is_chief()
    train_table, val_gallery, val_queries = _read_inputs(cfg)
    # Before any TensorFlow op (the image check runs some): collective ops are configured at start-up.
    strategy = make_strategy(cfg.run.strategy)
    train_table, skipped = (prepared.readable if cfg.data.prepared else _readable)(train_table, cfg)
    labels, classes, counts = _labels(train_table)
    replicas = strategy.num_replicas_in_sync
    if cfg.data.batch_size % replicas:
        raise VSearchError(
            f"data.batch_size={cfg.data.batch_size} is the global batch and must split evenly over "
            f"{replicas} replicas"
        )

    epochs = cfg.train.epochs
    steps = cfg.train.steps_per_epoch or len(train_table) // cfg.data.batch_size
    total_steps = max(epochs * steps, 1)
    with strategy.scope():
        embedder = build_embedder(
            cfg.model.backbone,
            cfg.data.image_size,
            cfg.model.embedding_dim,
            cfg.model.pooling,
            cfg.model.weights,
            cfg.model.dropout,
            cfg.model.bn_momentum,
        )
        dim = embedder.output.shape[-1]
        head = build_head(cfg.head, len(classes), counts) if cfg.head.type != "none" else None
        pair = {
            "contrastive": ContrastiveLoss(margin=cfg.loss.pair_margin),
            "triplet": TripletSemiHardLoss(margin=cfg.loss.pair_margin),
        }.get(cfg.loss.pair)
        xbm = (
            XBM(
                cfg.loss.xbm_size,
                dim,
                weight=cfg.loss.xbm_weight,
                start_step=cfg.loss.xbm_start_step,
                margin=cfg.loss.pair_margin,
                name="xbm",
            )
            if cfg.loss.xbm_size
            else None
        )
        model = RetrievalModel(embedder, head, pair, cfg.loss.pair_weight, xbm, name="retrieval")
        model(keras.ops.zeros((1, cfg.data.image_size, cfg.data.image_size, 3)))
        if head is not None:  # build the head's weights inside the strategy scope
            head(keras.ops.zeros((1, dim)), keras.ops.zeros((1,), "int32"))
        loaded = (
            _load_previous(Path(cfg.run.init_from), embedder, head, classes)
            if cfg.run.init_from
            else None
        )
        warmup = int(cfg.train.warmup_epochs * steps)
        hold = cfg.train.freeze_backbone_epochs * steps
        head_opt = _optimizer(cfg, WarmupCosine(cfg.train.lr, total_steps, warmup))
        backbone_opt = _optimizer(
            cfg, WarmupCosine(cfg.train.lr * cfg.train.backbone_lr_mult, total_steps, warmup, hold)
        )
        model.compile_optimizers(backbone_opt, head_opt, cfg.train.jit_compile)
        epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")

    # Every worker saves checkpoints (saving may run collective ops) and logs, non-chief workers
    # into a scratch folder deleted at the end; every worker resumes from the chief's checkpoints
    # (so on several hosts run_dir must be on a shared filesystem).
    write_dir = run_dir if chief else Path(tempfile.mkdtemp(prefix="vsearch-worker-"))
    write_dir.mkdir(parents=True, exist_ok=True)
    ckpt = tf.train.Checkpoint(
        model=model, head_optimizer=head_opt, backbone_optimizer=backbone_opt, epoch=epoch_var
    )
    manager = tf.train.CheckpointManager(ckpt, str(write_dir / "checkpoints"), max_to_keep=1)
    initial_epoch = 0
    latest = tf.train.latest_checkpoint(str(run_dir / "checkpoints")) if resume else None
    if latest is not None:  # killed before the first checkpoint: --resume starts from scratch
        try:
            ckpt.restore(latest).assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as err:
            raise VSearchError(
                f"{latest}: cannot resume from this checkpoint ({one_line(err)}); "
                f"resume with the run's own {run_dir / 'config.yml'}"
            ) from None
        initial_epoch = int(epoch_var.numpy())
    io.write_text(write_dir / "config.yml", dump_config(cfg))
    io.write_json(write_dir / "classes.json", classes)

    callbacks: list[keras.callbacks.Callback] = []
    validation = None
    done = _previous_epochs(run_dir / "metrics.csv", initial_epoch)
    if val_gallery is not None:
        validation = Validation(
            embedder,
            val_gallery,
            val_queries,
            cfg.data.image_size,
            cfg.data.batch_size,
            cfg.train.val_every,
            write_dir / "embedder_best.weights.h5",
            cfg.data.max_pixels,
        )
        callbacks.append(validation)
        if len(done):  # the best epoch before the interruption still counts
            if "val_map" in done and done["val_map"].notna().any():
                row = done.loc[done["val_map"].idxmax()]
                validation.best = {
                    "epoch": int(row["epoch"]) + 1,
                    **{k: float(v) for k, v in row.items() if k != "epoch"},
                }
        if cfg.train.early_stopping_patience:
            callbacks.append(
                keras.callbacks.EarlyStopping(
                    "val_map", patience=cfg.train.early_stopping_patience, mode="max"
                )
            )
    callbacks += [
        MetricsLog(write_dir / "metrics.csv", done),
        Checkpointing(manager, epoch_var),
        keras.callbacks.TensorBoard(str(write_dir / "logs"), write_graph=False, profile_batch=0),
    ]
    if show_progress and chief:
        callbacks.append(RichProgress(epochs, steps))

    if epochs > initial_epoch:
        ds = training_dataset(
            train_table,
            labels,
            cfg.data.image_size,
            cfg.data.batch_size,
            seed=cfg.run.seed,
            augment=cfg.data.augment,
            box_jitter=cfg.data.box_jitter,
            cache_dir=cfg.data.cache_dir,
            pk=cfg.data.pk_k if cfg.data.sampler == "pk" else None,
            max_pixels=cfg.data.max_pixels,
            prepared=cfg.data.prepared,
            margin=cfg.data.prepared_margin,
        ).repeat()
        # Keras keeps one iterator across epochs when steps_per_epoch is given: repeat the data.
        model.fit(
            ds,
            epochs=epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=steps,
            callbacks=callbacks,
            verbose=0,
        )

    summary: dict[str, Any] = {
        "epochs": epochs,
        "train_images": len(train_table),
        "skipped_images": skipped,
        "resumed_from_epoch": initial_epoch if latest else None,
        "classes": len(classes),
        "init_from": cfg.run.init_from,
        "loaded": loaded,
        "replicas": replicas,
        "global_batch": cfg.data.batch_size,
    }
    if validation is not None:
        if validation.best["val_map"] < 0:  # no epoch ran validation (epochs=0): measure once
            validation.best = {"epoch": initial_epoch, **validation.measure()}
        elif (write_dir / "embedder_best.weights.h5").is_file():
            embedder.load_weights(write_dir / "embedder_best.weights.h5")
        summary["best"] = validation.best
    summary["seconds"] = round(time.time() - start, 1)
    if chief:
        with io.atomic_path(run_dir / "embedder.weights.h5") as tmp:
            embedder.save_weights(tmp)
        if head is not None:
            with io.atomic_path(run_dir / "head.weights.npz") as tmp, open(tmp, "wb") as f:
                np.savez(f, *head.get_weights())
        with io.atomic_path(run_dir / "embedder.keras") as tmp:
            embedder.save(tmp)
        if (run_dir / "metrics.csv").is_file() and (run_dir / "metrics.csv").stat().st_size:
            from vsearch_tf.viz import training_curves

            training_curves(pd.read_csv(run_dir / "metrics.csv"), run_dir / "curves.png")
        io.write_json(run_dir / "summary.json", summary)
    else:
        shutil.rmtree(write_dir, ignore_errors=True)
    return summary
