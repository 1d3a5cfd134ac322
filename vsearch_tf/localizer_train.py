"""Training the product localizer: a config in, a run directory out (``vsearch train-localizer``).

It learns from the training csv's own boxes: every row with a box (the shoppers' photos) is a
photo and its product's box; rows without one (catalogue photos) are left out. Validation is the
``val_queries_csv`` photos and their boxes: ``val_iou``, the mean IoU of the predicted box, each
epoch.

Run directory (like ``vsearch train``'s)::

    config.yml            the resolved config (``--resume`` continues it)
    checkpoints/          model + optimizer + epoch, every epoch
    metrics.csv           one row per epoch: loss, iou, val_loss, val_iou
    logs/                 TensorBoard
    localizer.keras       the final localizer (``vsearch export --localizer RUN_DIR``)
    localizer.weights.h5  its weights
    summary.json          val IoU, the mean-box baseline's, confidence quantiles, time; last
    curves.png            training curves

The input is the whole photo squashed to ``localizer.image_size`` square by
:func:`vsearch_tf.data.images.load_crop_resize` (the one preprocessing path; the export calls it
the same way), so a box normalised to [0, 1] of the photo's width and height is the same box in
the model's input. Augmentation moves the target with the pixels: a random window of the photo
that contains the box (``zoom``), cropped by the same decode-and-crop as a box, and a horizontal
flip; colour jitter is the embedder's (:func:`vsearch_tf.data.pipeline.colour_jitter`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from vsearch_tf import io
from vsearch_tf.callbacks import Checkpointing, MetricsLog, RichProgress
from vsearch_tf.config import LocalizerConfig, dump_config
from vsearch_tf.data.images import displayed_size, image_format, load_crop_resize
from vsearch_tf.data.pipeline import AUTOTUNE, colour_jitter
from vsearch_tf.data.tables import ImageTable, read_queries, read_training
from vsearch_tf.errors import VSearchError
from vsearch_tf.models.localizer import MeanIoU, box_iou, build_localizer, localizer_loss
from vsearch_tf.models.retrieval import WarmupCosine
from vsearch_tf.train import _check_run_dir, _previous_epochs, _readable, _restore


def boxed(table: ImageTable) -> ImageTable:
    """The rows of ``table`` that have a box (not the all -1 "no box")."""
    return table.subset(np.any(table.boxes != -1.0, axis=1))


def _window(box: tf.Tensor, height: tf.Tensor, width: tf.Tensor, zoom: float) -> tf.Tensor:
    """A random ``(x, y, w, h)`` window of the image, each side ``(1 - zoom)`` to 1 of the
    image's, that contains ``box`` wherever it can (a box larger than the window is centred)."""
    size = tf.stack([width, height])
    scale = tf.random.uniform([], 1.0 - zoom, 1.0)
    side = tf.round(size * scale)
    low = tf.maximum(box[:2] + box[2:] - side, 0.0)  # the window's x, y range keeping the box in
    high = tf.minimum(box[:2], size - side)
    low, high = tf.minimum(low, high), tf.maximum(low, high)
    origin = tf.round(low + tf.random.uniform([2]) * (high - low))
    return tf.concat([origin, side], 0)


def localizer_dataset(
    table: ImageTable,
    image_size: int,
    batch_size: int,
    *,
    train: bool,
    zoom: float = 0.0,
    flip: bool = False,
    colour: float = 0.0,
    seed: int = 0,
    max_pixels: int,
) -> tf.data.Dataset:
    """``(pixels, box)`` batches: whole photos (a random window when training) squashed to
    ``image_size``, the box normalised to that frame. Training batches are shuffled, augmented
    and full; validation is in table order."""
    ds = tf.data.Dataset.from_tensor_slices((table.paths, table.boxes))

    def load(path, box):
        data = tf.io.read_file(path)
        hw = tf.cast(displayed_size(data, image_format(data)), tf.float32)
        whole = tf.stack([0.0, 0.0, hw[1], hw[0]])
        window = _window(box, hw[0], hw[1], zoom) if train and zoom > 0 else whole
        pixels, _ = load_crop_resize(data, window, image_size, max_pixels)
        low = tf.clip_by_value(box[:2] - window[:2], 0.0, window[2:])
        high = tf.clip_by_value(box[:2] + box[2:] - window[:2], 0.0, window[2:])
        target = tf.concat([low, high - low], 0) / tf.tile(window[2:], [2])
        if train and flip:
            flipped = tf.random.uniform([]) < 0.5
            pixels = tf.where(flipped, tf.reverse(pixels, [1]), pixels)
            target = tf.where(
                flipped, tf.stack([1.0 - target[0] - target[2], *tf.unstack(target)[1:]]), target
            )
        return pixels, target

    if train:
        ds = ds.shuffle(len(table), seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(load, num_parallel_calls=AUTOTUNE, deterministic=not train).ignore_errors()
    ds = ds.batch(batch_size, drop_remainder=train)
    if train and colour > 0:

        def jitter(pixels, target):
            u = tf.random.uniform([tf.shape(pixels)[0], 4])
            return colour_jitter(pixels, u, colour), target

        ds = ds.map(jitter, num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE)


def mean_box_iou(train_table: ImageTable, val_table: ImageTable) -> float:
    """The trivial baseline: the IoU on ``val_table`` of always predicting the mean normalised
    training box (what a localizer must clearly beat)."""

    def normalised(table: ImageTable) -> np.ndarray:
        sizes = np.array(
            [
                displayed_size(data, image_format(data)).numpy()
                for data in (tf.io.read_file(p) for p in table.paths)
            ],
            np.float32,
        )
        return table.boxes / np.concatenate([sizes[:, ::-1], sizes[:, ::-1]], 1)

    mean = normalised(train_table).mean(0)
    target = normalised(val_table)
    return float(np.mean(box_iou(np.broadcast_to(mean, target.shape), target)))


def _read(cfg: LocalizerConfig) -> tuple[ImageTable, ImageTable | None]:
    root = Path(cfg.data.root)
    table = boxed(read_training(root / cfg.data.train_csv, root))
    if len(table) == 0:
        raise VSearchError(f"{root / cfg.data.train_csv}: no row has a box to learn from")
    table, _ = _readable(table, cfg)
    if cfg.data.val_queries_csv is None:
        return table, None
    return table, boxed(read_queries(root / cfg.data.val_queries_csv, root))


def train_localizer(
    cfg: LocalizerConfig, *, resume: bool = False, show_progress: bool = True
) -> dict[str, Any]:
    """Train the localizer per ``cfg`` into ``cfg.run_dir``; returns the summary."""
    start = time.time()
    loc = cfg.localizer
    _check_run_dir(cfg.run_dir, resume)
    keras.utils.set_random_seed(cfg.run.seed)
    table, val = _read(cfg)
    if len(table) < loc.batch_size:
        raise VSearchError(
            f"{cfg.data.train_csv}: {len(table)} boxed photos is fewer than one batch of "
            f"{loc.batch_size} (localizer.batch_size)"
        )
    steps = loc.steps_per_epoch or len(table) // loc.batch_size
    model = build_localizer(
        loc.backbone or cfg.model.backbone,
        loc.image_size,
        loc.weights or cfg.model.weights,
        loc.head,
        loc.hidden,
        loc.bn_momentum,
    )
    total = max(loc.epochs * steps, 1)
    schedule = WarmupCosine(loc.lr, total, int(loc.warmup_epochs * steps))
    optimizer = keras.optimizers.AdamW(schedule, weight_decay=loc.weight_decay, global_clipnorm=10)
    model.compile(
        optimizer=optimizer,
        loss=localizer_loss(loc.giou_weight, loc.l1_weight, loc.confidence_weight),
        metrics=[MeanIoU()],
    )
    model.optimizer.build(model.trainable_variables)  # its slots exist before a restore
    epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer, epoch=epoch)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    initial_epoch = _restore(checkpoint, cfg.run_dir, resume)
    io.write_text(cfg.run_dir / "config.yml", dump_config(cfg))

    metrics = MetricsLog(
        cfg.run_dir / "metrics.csv", _previous_epochs(cfg.run_dir / "metrics.csv", initial_epoch)
    )
    metrics.write()
    manager = tf.train.CheckpointManager(checkpoint, str(cfg.run_dir / "checkpoints"), 1)
    callbacks: list[keras.callbacks.Callback] = [
        metrics,
        Checkpointing(manager, epoch),
        keras.callbacks.TensorBoard(str(cfg.run_dir / "logs"), write_graph=False, profile_batch=0),
    ]
    if show_progress:
        callbacks.append(RichProgress(loc.epochs, steps))
    common = {"max_pixels": cfg.data.max_pixels}
    val_ds = (
        None
        if val is None
        else localizer_dataset(val, loc.image_size, loc.batch_size, train=False, **common)
    )
    if loc.epochs > initial_epoch:
        train_ds = localizer_dataset(
            table,
            loc.image_size,
            loc.batch_size,
            train=True,
            zoom=loc.zoom,
            flip=loc.flip,
            colour=loc.colour,
            seed=cfg.run.seed,
            **common,
        ).repeat()
        model.fit(
            train_ds,
            epochs=loc.epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=steps,
            validation_data=val_ds,
            validation_steps=None if val is None else -(-len(val) // loc.batch_size),
            callbacks=callbacks,
            verbose=0,
            shuffle=False,  # the dataset shuffles itself; Keras' flag would only warn
        )
    summary: dict[str, Any] = {
        "epochs": loc.epochs,
        "train_photos": len(table),
        "resumed_from_epoch": initial_epoch or None,
        "image_size": loc.image_size,
        "head": loc.head,
        "backbone": loc.backbone or cfg.model.backbone,
    }
    if val is not None:
        summary.update(_validation_summary(model, val_ds, table, val))
    summary["seconds"] = round(time.time() - start, 1)
    _write_artifacts(cfg.run_dir, model, summary)
    return summary


def _validation_summary(
    model: keras.Model, val_ds: tf.data.Dataset, table: ImageTable, val: ImageTable
) -> dict[str, Any]:
    """The final model's IoU on the validation photos, the mean-box baseline's, and how its
    confidence tracks its IoU (the fallback's threshold is read off these)."""
    boxes, targets = [], []
    for pixels, target in val_ds:
        boxes.append(model.predict_on_batch(pixels))
        targets.append(target.numpy())
    pred, true = np.concatenate(boxes), np.concatenate(targets)
    iou = np.asarray(box_iou(pred[:, :4], true))
    confidence = pred[:, 4]
    return {
        "val_photos": len(true),
        "val_iou": float(iou.mean()),
        "val_iou_at_0.5": float((iou >= 0.5).mean()),
        "val_mean_box_iou": mean_box_iou(table, val),
        "val_confidence_iou_corr": float(np.corrcoef(confidence, iou)[0, 1])
        if len(iou) > 1
        else None,
        "val_confidence_quantiles": {
            str(q): float(np.quantile(confidence, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)
        },
    }


def _write_artifacts(run_dir: Path, model: keras.Model, summary: dict[str, Any]) -> None:
    with io.atomic_path(run_dir / "localizer.weights.h5") as tmp:
        model.save_weights(tmp)
    with io.atomic_path(run_dir / "localizer.keras") as tmp:
        model.save(tmp)
    if (run_dir / "metrics.csv").is_file():
        from vsearch_tf.viz import training_curves

        training_curves(pd.read_csv(run_dir / "metrics.csv"), run_dir / "curves.png")
    io.write_json(run_dir / "summary.json", summary)
