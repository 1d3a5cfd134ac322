"""The callbacks that write a run directory while it trains, and the rich progress bar.

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
from typing import TYPE_CHECKING, Any

import keras
import pandas as pd
import tensorflow as tf

from vsearch_tf import io

if TYPE_CHECKING:
    from vsearch_tf.train import Validation

BEST_RECORD = "best.json"
BEST_WEIGHTS = "embedder_best-{}.weights.h5"  # the epoch's number


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
