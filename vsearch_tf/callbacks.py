"""The callbacks of a training run: validation mAP, the files of the run directory, the
progress bar.

At the end of an epoch they run in this order, so that whatever the moment a crash comes, a
resumed run finds files that agree with its checkpoint:

1. :class:`MetricsLog` rewrites ``metrics.csv``; resume drops rows past the checkpoint;
2. :class:`Checkpointing` saves the checkpoint, the commit point of the epoch;
3. :class:`BestWeights` saves the best epoch's weights, then ``best.json`` naming them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from vsearch_tf import io
from vsearch_tf.data.tables import ImageTable
from vsearch_tf.index import ExactSearcher
from vsearch_tf.inference import embed_table, score_queries

BEST_RECORD = "best.json"
BEST_WEIGHTS = "embedder_best-{}.weights.h5"  # the epoch's number


class Validation(keras.callbacks.Callback):
    """Validation mAP@1000 / Recall@K on a held-out gallery and queries, added to the epoch logs
    (so metrics.csv, TensorBoard and early stopping see them), and the best epoch's logs in
    ``best`` (:class:`vsearch_tf.callbacks.BestWeights` saves its weights)."""

    def __init__(
        self,
        embedder: keras.Model,
        gallery: ImageTable,
        queries: ImageTable,
        image_size: int,
        batch_size: int,
        every: int,
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
        self.best: dict[str, Any] = {"val_map": -1.0}
        self._fn = tf.function(lambda x: embedder(x, training=False), reduce_retracing=True)

    def measure(self) -> dict[str, float]:
        """Scores counted as ``vsearch eval`` counts them (:func:`score_queries`): an unreadable
        query scores AP 0, an unreadable gallery image still counts as relevant."""
        g, g_report = embed_table(
            self._fn, self.gallery, self.image_size, self.batch_size, max_pixels=self.max_pixels
        )
        q, q_report = embed_table(
            self._fn, self.queries, self.image_size, self.batch_size, max_pixels=self.max_pixels
        )
        found = np.zeros((len(q), 0), np.int64)
        if len(g) and len(q):
            found = ExactSearcher(g).search(q, 1000)[0]
        result, _ = score_queries(
            found,
            q_report,
            self.queries.products,
            self.gallery.products[g_report.rows],
            self.gallery.products[g_report.skipped],
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


class MetricsLog(keras.callbacks.Callback):
    """``metrics.csv``, one row per epoch, rewritten whole and atomically each epoch (Keras'
    CSVLogger appends in place, so a kill mid-write leaves a torn last line). Runs before
    :class:`Checkpointing`: a row whose checkpoint never got written is dropped on resume."""

    def __init__(self, path: Path, previous: pd.DataFrame):
        super().__init__()
        self.path, self.rows = path, previous.to_dict("records")

    def write(self) -> None:
        """Write the rows so far; with none, remove a file an earlier attempt left."""
        if self.rows:
            io.write_text(self.path, pd.DataFrame(self.rows).to_csv(index=False))
        else:
            self.path.unlink(missing_ok=True)

    def on_epoch_end(self, epoch, logs=None):
        self.rows.append({"epoch": epoch, **{k: float(v) for k, v in sorted((logs or {}).items())}})
        self.write()


class Checkpointing(keras.callbacks.Callback):
    """Model + both optimizers + epoch, every epoch, through ``tf.train.CheckpointManager`` (whose
    index file is replaced atomically), so ``--resume`` continues the schedule where it stopped."""

    def __init__(self, manager: tf.train.CheckpointManager, epoch: tf.Variable):
        super().__init__()
        self.manager, self.epoch = manager, epoch

    def on_epoch_end(self, epoch, logs=None):
        self.epoch.assign(epoch + 1)
        self.manager.save(checkpoint_number=epoch + 1)


class BestWeights(keras.callbacks.Callback):
    """The embedder weights of the best epoch by validation mAP (``validation.best``) and
    ``best.json``, the record of that epoch and its metrics that ``summary.json`` repeats.

    The weights file is named by its epoch and the record is written after it, and both after
    the epoch's checkpoint: the record always names weights on disk, of an epoch the checkpoint
    includes, so a resumed run takes up a best that agrees with its weights.
    """

    def __init__(self, validation: Validation, folder: Path):
        super().__init__()
        self.validation, self.folder = validation, folder
        self.path: Path | None = None  # the best weights so far

    def take_up(self, run_dir: Path, initial_epoch: int) -> None:
        """Resume from the record in ``run_dir`` (the chief's). A run that starts from epoch 0
        forgets the record of an earlier attempt."""
        record = run_dir / BEST_RECORD
        if initial_epoch and record.is_file():
            best = json.loads(record.read_text())
            path = run_dir / BEST_WEIGHTS.format(best["epoch"])
            if best["epoch"] <= initial_epoch and path.is_file():
                self.validation.best, self.path = best, path
                return
        if self.folder == run_dir:
            record.unlink(missing_ok=True)

    def finish(self, final_epoch: int) -> dict[str, Any]:
        """The best epoch's record, its weights loaded into the embedder. If no epoch was
        validated (``epochs=0``, ``val_every`` past the last epoch), the record of the final
        weights, of ``final_epoch``, measured now."""
        if self.path is None:
            self.validation.best = {"epoch": final_epoch, **self.validation.measure()}
        else:
            self.validation.embedder.load_weights(self.path)
        return self.validation.best

    def on_epoch_end(self, epoch, logs=None):
        best = self.validation.best
        if best.get("epoch") != epoch + 1:  # this epoch did not improve validation mAP
            return
        path = self.folder / BEST_WEIGHTS.format(epoch + 1)
        with io.atomic_path(path) as tmp:
            self.validation.embedder.save_weights(tmp)
        io.write_json(self.folder / BEST_RECORD, best)
        for old in self.folder.glob(BEST_WEIGHTS.format("*")):
            if old != path:
                old.unlink(missing_ok=True)
        self.path = path


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
