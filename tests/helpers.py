"""What several test files share: the CLI run in-process, the tiny training config and a tiny
embedder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from typer.testing import CliRunner, Result

from vsearch_tf.cli import app

runner = CliRunner()


def invoke(*args: object) -> Result:
    """``vsearch ARGS...`` in this process; exceptions propagate, so a traceback fails the test."""
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def write_tiny_config(root: Path, data: dict[str, Any], **sections: dict[str, Any]) -> Path:
    """``root/tiny.yml``: a MobileNet at 32 px that trains in seconds on generated data; ``data``
    and any ``sections`` (model=..., head=..., train=...) are merged over the defaults."""
    config: dict[str, dict[str, Any]] = {
        "run": {"name": "tiny", "out_dir": str(root / "runs")},
        "data": {"image_size": 32, "batch_size": 8, **data},
        "model": {
            "backbone": "mobilenet",
            "weights": "none",
            "embedding_dim": 8,
            "bn_momentum": 0.9,
        },
        "head": {"type": "arcface"},
        "train": {"epochs": 2, "lr": 0.001},
    }
    for name, values in sections.items():
        config[name].update(values)
    path = root / "tiny.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def tiny_embedder(size: int = 32, dim: int = 8):
    """A small untrained embedder whose vectors differ between images (an untrained MobileNet's
    saturate to one vector, which would make any comparison of embeddings vacuous)."""
    import keras

    from vsearch_tf.models.layers import L2Normalize

    keras.utils.set_random_seed(0)
    pixels = keras.Input((size, size, 3), name="pixels")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(pixels)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="tanh")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(pixels, L2Normalize()(keras.layers.Dense(dim)(x)), name="embedder")
