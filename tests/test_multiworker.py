"""Training on several hosts, simulated by worker processes on localhost (CPU, gRPC collectives).

- Two ``MultiWorkerMirroredStrategy`` workers reach the weights one worker reaches on the same
  global batch (the project's ``RetrievalModel``, ArcFace head, both optimizers, active gradient
  clipping), and so do two mirrored replicas in one process.
- A run started under one strategy resumes under ``multi_worker``; only the chief writes the run
  directory and the other worker's scratch folder is removed.

Every process is started here with a timeout and killed if it outlives it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

TIMEOUT = 240  # seconds for one group of processes (~30 s each on an idle 2-core machine)

# Trains a tiny RetrievalModel on fixed in-memory data, no shuffling, the same global batch
# whatever the strategy. argv: mode and output folder. ``multi_worker``: one run under
# MultiWorkerMirroredStrategy (TF_CONFIG). ``reference``: one run on one device, then one
# mirrored over two logical CPU devices (one process: TensorFlow imports once).
_TRAIN_TINY = r"""
import pathlib, sys
import numpy as np
import tensorflow as tf
mode, out = sys.argv[1], pathlib.Path(sys.argv[2])
if mode == "reference":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from vsearch_tf.config import Config
from vsearch_tf.models.heads import build_head
from vsearch_tf.models.layers import L2Normalize
from vsearch_tf.models.retrieval import RetrievalModel, WarmupCosine, build_optimizer
from vsearch_tf.train import make_strategy

GLOBAL_BATCH, STEPS, EPOCHS, CLASSES = 16, 4, 2, 5
rng = np.random.default_rng(0)
pixels = rng.uniform(0, 255, (GLOBAL_BATCH * STEPS, 4, 4, 3)).astype("float32")
labels = rng.integers(0, CLASSES, GLOBAL_BATCH * STEPS).astype("int32")
cfg = Config()
# Clipping is active.
cfg.train.optimizer, cfg.train.clip_norm, cfg.train.weight_decay = "sgd", 0.5, 1e-3


def run(strategy, name):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        backbone = keras.Sequential(
            [keras.Input((4, 4, 3)), keras.layers.Rescaling(1 / 255), keras.layers.Flatten(),
             keras.layers.Dense(16, activation="tanh")],
            name="backbone",
        )
        inputs = keras.Input((4, 4, 3))
        projection = keras.layers.Dense(8, use_bias=False, name="projection")
        outputs = L2Normalize()(projection(backbone(inputs)))
        embedder = keras.Model(inputs, outputs, name="embedder")
        head = build_head(cfg.head, CLASSES, [1] * CLASSES)
        model = RetrievalModel(embedder, head)
        model(keras.ops.zeros((1, 4, 4, 3)))
        head(keras.ops.zeros((1, 8)), keras.ops.zeros((1,), "int32"))
        total = EPOCHS * STEPS
        model.compile_optimizers(
            build_optimizer(cfg.train, WarmupCosine(0.05, total, 2)),
            build_optimizer(cfg.train, WarmupCosine(0.5, total, 2)),
        )
    dataset = tf.data.Dataset.from_tensor_slices((pixels, labels)).batch(GLOBAL_BATCH)
    history = model.fit(dataset, epochs=EPOCHS, verbose=0)
    weights = {f"w{i}": v.numpy() for i, v in enumerate(embedder.weights + head.weights)}
    loss = np.asarray(history.history["loss"])
    np.savez(out / f"{name}.npz", replicas=strategy.num_replicas_in_sync, loss=loss, **weights)


if mode == "reference":
    run(make_strategy("auto"), "one")
    run(make_strategy("mirrored"), "mirrored")
else:
    run(make_strategy("multi_worker"), "worker" + sys.argv[3])
"""


def _free_ports(n: int) -> list[int]:
    """Ports the OS hands out now (the sockets are closed right before the workers bind them)."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _cluster_env(n: int, tmp: Path) -> list[dict[str, str]]:
    """One environment per worker: TF_CONFIG naming all workers on localhost, its own TMPDIR."""
    workers = [f"localhost:{p}" for p in _free_ports(n)]
    base = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "CUDA_VISIBLE_DEVICES": "",
        "TMPDIR": str(tmp),
    }
    return [
        {
            **base,
            "TF_CONFIG": json.dumps(
                {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}
            ),
        }
        for i in range(n)
    ]


class _Processes:
    """Commands started together; ``wait`` fails the test with the last lines of a process that
    exits non-zero or outlives the deadline, and every process still running is killed."""

    def __init__(self, commands: list[tuple[list[str], dict[str, str]]], logs: Path):
        logs.mkdir(parents=True, exist_ok=True)
        self.logs, self.deadline = logs, time.monotonic() + TIMEOUT
        self.files = [
            (open(logs / f"{i}.out", "w"), open(logs / f"{i}.err", "w"))
            for i in range(len(commands))
        ]
        self.procs = [
            subprocess.Popen(cmd, env=env, stdout=out, stderr=err, cwd=logs)
            for (cmd, env), (out, err) in zip(commands, self.files)
        ]

    def wait(self) -> list[str]:
        """Each process' stdout, once all have exited 0."""
        try:
            for i, proc in enumerate(self.procs):
                try:
                    code = proc.wait(timeout=max(self.deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    command = " ".join(map(str, proc.args[-3:]))
                    pytest.fail(f"process {i} ({command}) did not finish in {TIMEOUT} s")
                if code != 0:
                    tail = (self.logs / f"{i}.err").read_text().strip().splitlines()[-15:]
                    pytest.fail(f"process {i} exited {code}:\n" + "\n".join(tail))
        finally:
            self.kill()
        return [(self.logs / f"{i}.out").read_text() for i in range(len(self.procs))]

    def kill(self) -> None:
        for proc, files in zip(self.procs, self.files):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for f in files:
                f.close()


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """The weight-comparison processes, started before the resume test so both run at once."""
    work = tmp_path_factory.mktemp("tiny")
    script = work / "train_tiny.py"
    script.write_text(_TRAIN_TINY)
    plain = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    plain.update(TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    workers = _cluster_env(2, work)
    processes = _Processes(
        [
            ([sys.executable, str(script), "multi_worker", str(work), str(i)], env)
            for i, env in enumerate(workers)
        ]
        + [([sys.executable, str(script), "reference", str(work)], plain)],
        work / "logs",
    )
    yield work, processes
    processes.kill()


@pytest.mark.usefixtures("tiny_runs")
def test_resume_under_multi_worker_and_only_the_chief_writes(tmp_path):
    from vsearch_tf.config import load_config
    from vsearch_tf.demo import generate
    from vsearch_tf.train import train

    generate(tmp_path / "data", n_train=6, n_val=2, n_test=2, users_per_product=1, seed=3)
    config = {
        "run": {"name": "mw", "out_dir": str(tmp_path / "runs")},
        "data": {
            "root": str(tmp_path / "data"),
            "train_csv": "train.csv",
            "image_size": 32,
            "batch_size": 8,
            "augment": 0.0,
            "box_jitter": 0.0,
        },
        "model": {"backbone": "mobilenet", "weights": "none", "embedding_dim": 8},
        "head": {"type": "arcface"},
        "train": {"epochs": 1, "steps_per_epoch": 1, "optimizer": "sgd"},
    }
    path = tmp_path / "mw.yml"
    path.write_text(yaml.safe_dump(config))
    first = train(
        load_config(path), show_progress=False
    )  # one epoch in this process, default strategy
    assert first["replicas"] == 1
    run_dir = tmp_path / "runs" / "mw"

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    cli = [
        sys.executable,
        "-m",
        "vsearch_tf",
        "train",
        "--config",
        str(path),
        "--set",
        "run.strategy=multi_worker",
        "--set",
        "train.epochs=2",
        "--resume",
        "--json",
    ]
    outs = _Processes([(cli, env) for env in _cluster_env(2, scratch)], tmp_path / "logs").wait()
    summaries = [json.loads(out) for out in outs]
    assert [s["replicas"] for s in summaries] == [2, 2] and summaries[0]["global_batch"] == 8
    metrics = (run_dir / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in metrics[1:]] == [
        "0",
        "1",
    ]  # epoch 2 appended by the chief only
    assert json.loads((run_dir / "summary.json").read_text())["replicas"] == 2
    assert sorted(
        p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("ckpt-2")
    )
    assert list(scratch.iterdir()) == []  # the non-chief worker's scratch folder is gone


def test_two_workers_reach_the_weights_of_one_worker(tiny_runs):
    work, processes = tiny_runs
    processes.wait()
    one = np.load(work / "one.npz")
    weights = [k for k in one.files if k.startswith("w")]
    assert int(one["replicas"]) == 1 and len(weights) == 4
    for name in ("worker0", "worker1", "mirrored"):
        other = np.load(work / f"{name}.npz")
        assert int(other["replicas"]) == 2, name
        for k in weights:
            np.testing.assert_allclose(other[k], one[k], rtol=0, atol=2e-5, err_msg=f"{name} {k}")
        np.testing.assert_allclose(other["loss"], one["loss"], rtol=1e-4, err_msg=f"{name} loss")
