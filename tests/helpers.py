"""What several test files share: the CLI run in-process, the tiny training config, a tiny
embedder, a tiny real index and a live server."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
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


def tiny_index(root: Path, seed: int = 3) -> Path:
    """``root/index``: a real exact index of a generated gallery (14 catalogue images), built by
    `vsearch index` with a real export of :func:`tiny_embedder` (``root/sm/tiny``)."""
    from vsearch_tf.demo import generate
    from vsearch_tf.export import export_run

    generate(root / "data", n_train=4, n_val=1, n_test=10, users_per_product=1, seed=seed)
    run = root / "run"
    run.mkdir()
    tiny_embedder().save(run / "embedder.keras")
    export_run(run, "tiny", root=root / "sm")
    gallery = root / "data" / "gallery.csv"
    result = invoke(
        "index", "--model", root / "sm" / "tiny", "--gallery", gallery, "--out", root / "index"
    )
    assert result.exit_code == 0, result.output
    return root / "index"


@contextlib.contextmanager
def live_server(app: Any, timeout: float = 60.0) -> Iterator[str]:
    """``app`` on a real uvicorn at a free loopback port, in a thread; yields the base URL."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
