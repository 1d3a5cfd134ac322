"""Training on tiny generated data: what a crash leaves on disk, how ``--resume`` reads it, and
what the summary names."""

from __future__ import annotations

import contextlib
import io as text_io
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from helpers import write_tiny_config

from vsearch_tf import io
from vsearch_tf.callbacks import Validation
from vsearch_tf.config import load_config
from vsearch_tf.demo import generate
from vsearch_tf.train import train


class Crash(Exception):
    """The process dies here."""


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    generate(root / "data", n_train=8, n_val=12, n_test=1, users_per_product=2, seed=1)
    return write_tiny_config(
        root,
        {
            "root": str(root / "data"),
            "val_gallery_csv": "val_gallery.csv",
            "val_queries_csv": "val_queries.csv",
        },
        train={"epochs": 4, "lr": 0.01},
    )


#: Validation mAP of epochs 1, 2, 3, 4: epoch 3 is the first to beat epoch 1.
#: Scripted because a few steps of a tiny model move its real mAP by noise alone, so which
#: epoch first improves (if any does) was left to chance.
SCRIPTED_VAL_MAP = [0.3, 0.2, 0.5, 0.4]


def script_validation(monkeypatch) -> None:
    """Validation runs for real (embeds, searches, scores), then reports the scripted mAP."""
    measure, scores = Validation.measure, iter(SCRIPTED_VAL_MAP)

    def scripted(self):
        return {**measure(self), "val_map": next(scores)}

    monkeypatch.setattr(Validation, "measure", scripted)


@pytest.mark.parametrize("crash_at", ["metrics.csv", "checkpoint"])
def test_resume_after_a_crash_keeps_the_weights_summary_names(config, crash_at, monkeypatch):
    """The process dies at the end of the first epoch but the first that improves validation
    mAP (so its weights are the best so far), while writing ``metrics.csv`` or the epoch's
    checkpoint. ``--resume`` up to the last checkpointed epoch must then keep the weights of the
    epoch its summary names as best, not those of the epoch that died."""
    cfg = load_config(config, [f"run.name=crash-{crash_at.replace('.', '-')}"])
    script_validation(monkeypatch)
    weights: dict[int, list[np.ndarray]] = {}  # epoch -> embedder weights, as checkpointed
    crashed: list[int] = []
    save_checkpoint, write_text = tf.train.CheckpointManager.save, io.write_text

    def improved(csv: str) -> int | None:
        """The epoch of the last row if it is not the first and beats all before it."""
        val = pd.read_csv(text_io.StringIO(csv))["val_map"]
        return len(val) if len(val) > 1 and val.iloc[-1] > val.iloc[:-1].max() else None

    def crashing_write(path, text):
        if Path(path).name == "metrics.csv" and crash_at == "metrics.csv" and improved(text):
            crashed.append(improved(text))
            raise Crash
        write_text(path, text)

    def crashing_save(manager, checkpoint_number=None, **kwargs):
        metrics = cfg.run_dir / "metrics.csv"
        if crash_at == "checkpoint" and improved(metrics.read_text()):
            crashed.append(checkpoint_number)
            raise Crash
        weights[checkpoint_number] = manager.checkpoint.model.embedder.get_weights()
        return save_checkpoint(manager, checkpoint_number=checkpoint_number, **kwargs)

    monkeypatch.setattr(io, "write_text", crashing_write)
    monkeypatch.setattr(tf.train.CheckpointManager, "save", crashing_save)
    with contextlib.suppress(Crash):
        train(cfg, show_progress=False)
    assert crashed == [3]
    last_checkpointed = crashed[0] - 1

    monkeypatch.undo()
    resumed = load_config(config, [f"run.name={cfg.run.name}", f"train.epochs={last_checkpointed}"])
    summary = train(resumed, resume=True, show_progress=False)
    best = summary["best"]["epoch"]
    assert best == 1
    metrics = pd.read_csv(cfg.run_dir / "metrics.csv")
    assert metrics["epoch"].tolist() == list(range(last_checkpointed))
    assert summary["best"]["val_map"] == pytest.approx(metrics["val_map"].max())
    kept = keras.saving.load_model(cfg.run_dir / "embedder.keras", compile=False).get_weights()
    for have, want in zip(kept, weights[best], strict=True):
        np.testing.assert_array_equal(have, want)


def test_without_a_validated_epoch_the_summary_names_the_final_one(config):
    """With ``val_every`` past the last epoch, the final weights are measured at the end, and the
    summary names their epoch."""
    cfg = load_config(config, ["run.name=late", "train.epochs=1", "train.val_every=2"])
    summary = train(cfg, show_progress=False)
    assert summary["best"]["epoch"] == 1
    assert "val_map" not in pd.read_csv(cfg.run_dir / "metrics.csv")
