"""Training: a config in, a run directory out.

Run directory::

    config.yml            the resolved config (re-run it with ``vsearch train --config``)
    classes.json          product id -> class index of the head
    checkpoints/          tf.train checkpoints of model + optimizers + epoch (``--resume``)
    metrics.csv           one row per epoch: loss, lr, val mAP@1000, Recall@K
    logs/                 TensorBoard
    best.json             with validation data: the best epoch N by val mAP and its metrics
    embedder_best-N.weights.h5  that epoch's embedder weights
    embedder.keras        the final embedder: best by validation mAP when there is validation data
    embedder.weights.h5   its weights (what ``init_from`` loads)
    head.weights.npz      the head's weights (reused by a next stage with the same classes)
    summary.json          best epoch and its metrics, time taken; written last
    curves.png            training curves

:func:`train` reads like a keras-hub task: the data, the model
(:func:`~vsearch_tf.models.retrieval.build_retrieval_model`), the state a resumed run restores,
the callbacks (:mod:`vsearch_tf.callbacks`), ``fit``, the artifacts. The model is built under a
``tf.distribute`` strategy, the loss is averaged over the global batch, and only the chief worker
writes, so the same code runs on one CPU or many hosts.
"""

from __future__ import annotations

import json
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
from vsearch_tf.callbacks import BestWeights, Checkpointing, MetricsLog, RichProgress, Validation
from vsearch_tf.config import Config, dump_config
from vsearch_tf.data import prepared
from vsearch_tf.data.pipeline import training_dataset, unreadable_rows, why_unreadable
from vsearch_tf.data.tables import ImageTable, read_gallery, read_queries, read_training
from vsearch_tf.errors import VSearchError, one_line
from vsearch_tf.models.backbones import check_backbone
from vsearch_tf.models.retrieval import RetrievalModel, build_retrieval_model


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


def train(cfg: Config, *, resume: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """Train per ``cfg`` and write its run directory; returns the summary."""
    start = time.time()
    _check_run_dir(cfg.run_dir, resume)
    check_backbone(cfg.model.backbone, cfg.data.image_size, cfg.model.pooling, cfg.model.weights)
    keras.utils.set_random_seed(cfg.run.seed)
    keras.mixed_precision.set_global_policy(
        "float32" if cfg.train.mixed_precision == "off" else cfg.train.mixed_precision
    )
    table, val_gallery, val_queries = _read_inputs(cfg)
    # Before any TensorFlow op (the image check runs some): collective ops are configured at
    # start-up.
    strategy = make_strategy(cfg.run.strategy)
    table, skipped = (prepared.readable if cfg.data.prepared else _readable)(table, cfg)
    labels, classes, counts = _labels(table)
    steps = _steps_per_epoch(cfg, len(table), strategy.num_replicas_in_sync)
    with strategy.scope():
        model = build_retrieval_model(cfg, counts, steps)
        init_from = cfg.run.init_from
        loaded = _load_previous(Path(init_from), model, classes) if init_from else None
        checkpoint = tf.train.Checkpoint(
            model=model,
            head_optimizer=model.optimizer,
            backbone_optimizer=model.backbone_optimizer,
            epoch=tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch"),
        )

    # Every worker saves checkpoints (saving may run collective ops) and logs, non-chief workers
    # into a scratch folder deleted at the end; every worker resumes from the chief's checkpoints
    # (so on several hosts run_dir must be on a shared filesystem).
    chief = is_chief()
    write_dir = cfg.run_dir if chief else Path(tempfile.mkdtemp(prefix="vsearch-worker-"))
    write_dir.mkdir(parents=True, exist_ok=True)
    initial_epoch = _restore(checkpoint, cfg.run_dir, resume)
    io.write_text(write_dir / "config.yml", dump_config(cfg))
    io.write_json(write_dir / "classes.json", classes)
    best = _best_weights(cfg, model.embedder, val_gallery, val_queries, write_dir)
    callbacks = _callbacks(
        cfg, checkpoint, write_dir, initial_epoch, best, show_progress and chief, steps
    )
    if cfg.train.epochs > initial_epoch:
        model.fit(
            _dataset(cfg, table, labels),
            epochs=cfg.train.epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=steps,
            callbacks=callbacks,
            verbose=0,
            shuffle=False,  # the dataset shuffles itself; Keras' flag would only warn
        )

    summary: dict[str, Any] = {
        "epochs": cfg.train.epochs,
        "train_images": len(table),
        "skipped_images": skipped,
        "resumed_from_epoch": initial_epoch or None,
        "classes": len(classes),
        "init_from": init_from,
        "loaded": loaded,
        "replicas": strategy.num_replicas_in_sync,
        "global_batch": cfg.data.batch_size,
    }
    if best is not None:
        summary["best"] = best.finish(final_epoch=max(cfg.train.epochs, initial_epoch))
    summary["seconds"] = round(time.time() - start, 1)
    if chief:
        _write_artifacts(cfg.run_dir, model, summary)
    else:
        shutil.rmtree(write_dir, ignore_errors=True)
    return summary


def _check_run_dir(run_dir: Path, resume: bool) -> None:
    """Without ``--resume``, refuse a finished run or a folder that is not a run; an interrupted
    run (checkpoints, no summary) starts over."""
    if resume or not run_dir.exists():
        return
    if (run_dir / "summary.json").exists():
        raise VSearchError(
            f"{run_dir}: a finished run is already there; pick another run.name or delete it"
        )
    if any(run_dir.iterdir()) and not (run_dir / "checkpoints").exists():
        raise VSearchError(f"{run_dir}: folder exists and is not a run; pick another run.name")


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
    """The readable training images (decoding each JPEG at 1/8 scale) and the skipped ones."""
    bad = unreadable_rows(table, cfg.data.max_pixels)
    reasons = why_unreadable(table, bad, cfg.data.max_pixels)
    skipped = [{"path": str(table.paths[r]), "reason": why} for r, why in zip(bad, reasons)]
    return table.without(skipped, bad, cfg.data.max_bad_fraction, "are unreadable"), skipped


def _labels(table: ImageTable) -> tuple[np.ndarray, list[str], list[int]]:
    classes, labels, counts = np.unique(table.products, return_inverse=True, return_counts=True)
    return labels.astype(np.int32), classes.tolist(), counts.tolist()


def _steps_per_epoch(cfg: Config, examples: int, replicas: int) -> int:
    if cfg.data.batch_size % replicas:
        raise VSearchError(
            f"data.batch_size={cfg.data.batch_size} is the global batch and must split evenly over "
            f"{replicas} replicas"
        )
    return cfg.train.steps_per_epoch or examples // cfg.data.batch_size


def _load_previous(init_from: Path, model: RetrievalModel, classes: list[str]) -> str:
    """Start from an earlier run's embedder, and its head too if it fits; returns what loaded."""
    head = model.head
    try:
        model.embedder.load_weights(init_from / "embedder.weights.h5")
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


def _restore(checkpoint: tf.train.Checkpoint, run_dir: Path, resume: bool) -> int:
    """With ``resume``, restore the latest checkpoint in ``run_dir``; returns its epoch, 0 if
    there is none (killed before the first checkpoint: ``--resume`` starts from scratch)."""
    latest = tf.train.latest_checkpoint(str(run_dir / "checkpoints")) if resume else None
    if latest is None:
        return 0
    try:
        checkpoint.restore(latest).assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as err:
        raise VSearchError(
            f"{latest}: cannot resume from this checkpoint ({one_line(err)}); "
            f"resume with the run's own {run_dir / 'config.yml'}"
        ) from None
    return int(checkpoint.epoch.numpy())


def _previous_epochs(path: Path, initial_epoch: int) -> pd.DataFrame:
    """The metrics rows of the epochs a resumed run keeps (those its checkpoint includes)."""
    if initial_epoch == 0 or not path.is_file():
        return pd.DataFrame()
    done = pd.read_csv(path)
    return done[done["epoch"] < initial_epoch]


def _best_weights(
    cfg: Config,
    embedder: keras.Model,
    gallery: ImageTable | None,
    queries: ImageTable | None,
    write_dir: Path,
) -> BestWeights | None:
    """Validation and the best weights it finds; None without validation data."""
    if gallery is None or queries is None:
        return None
    validation = Validation(
        embedder,
        gallery,
        queries,
        cfg.data.image_size,
        cfg.data.batch_size,
        cfg.train.val_every,
        cfg.data.max_pixels,
    )
    return BestWeights(validation, write_dir)


def _callbacks(
    cfg: Config,
    checkpoint: tf.train.Checkpoint,
    write_dir: Path,
    initial_epoch: int,
    best: BestWeights | None,
    progress: bool,
    steps: int,
) -> list[keras.callbacks.Callback]:
    """Validation and early stopping on it, then the writers in the order
    :mod:`vsearch_tf.callbacks` explains, each resumed at ``initial_epoch``; TensorBoard; the
    progress bar."""
    metrics = MetricsLog(
        write_dir / "metrics.csv", _previous_epochs(cfg.run_dir / "metrics.csv", initial_epoch)
    )
    metrics.write()  # without the rows of epochs the checkpoint lacks, even if none runs
    manager = tf.train.CheckpointManager(checkpoint, str(write_dir / "checkpoints"), max_to_keep=1)
    callbacks: list[keras.callbacks.Callback] = [metrics, Checkpointing(manager, checkpoint.epoch)]
    if best is not None:
        best.take_up(cfg.run_dir, initial_epoch)
        patience = cfg.train.early_stopping_patience
        stopping = [keras.callbacks.EarlyStopping("val_map", patience=patience, mode="max")]
        callbacks = [best.validation, *(stopping if patience else []), *callbacks, best]
    callbacks.append(
        keras.callbacks.TensorBoard(str(write_dir / "logs"), write_graph=False, profile_batch=0)
    )
    if progress:
        callbacks.append(RichProgress(cfg.train.epochs, steps))
    return callbacks


def _dataset(cfg: Config, table: ImageTable, labels: np.ndarray) -> tf.data.Dataset:
    """The training batches, repeated: Keras keeps one iterator across epochs when
    ``steps_per_epoch`` is given."""
    return training_dataset(
        table,
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


def _write_artifacts(run_dir: Path, model: RetrievalModel, summary: dict[str, Any]) -> None:
    """The final embedder (weights and ``.keras``), the head's weights, the curves, and last the
    summary, whose presence marks a finished run."""
    with io.atomic_path(run_dir / "embedder.weights.h5") as tmp:
        model.embedder.save_weights(tmp)
    if model.head is not None:
        with io.atomic_path(run_dir / "head.weights.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, *model.head.get_weights())
    with io.atomic_path(run_dir / "embedder.keras") as tmp:
        model.embedder.save(tmp)
    if (run_dir / "metrics.csv").is_file():
        from vsearch_tf.viz import training_curves

        training_curves(pd.read_csv(run_dir / "metrics.csv"), run_dir / "curves.png")
    io.write_json(run_dir / "summary.json", summary)
