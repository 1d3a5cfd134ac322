"""Prepared training shards (``vsearch_tf.data.prepared``) on the generated demo data.

- An unjittered, unaugmented crop from the shards is the raw pipeline's crop up to JPEG
  re-encoding: its error is no larger than encoding the raw crop itself as the shards do. Stored
  raw, it is the raw pipeline's crop rounded to uint8, and JPEG and raw shards give the same crops
  up to that JPEG error.
- Training reads the encoding its manifest records; prepare refuses to mix encodings in a folder.
- Shards whose manifest does not match the config (csv, image size, margin) are refused in one
  line, and so is a margin too small for the box jitter.
- A prepare killed after its first shard resumes: finished shards are kept, the rest written.
- ``vsearch data prepare`` writes a config's shards and ``vsearch train`` runs an epoch from
  them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import write_tiny_config
from vsearch_tf.config import load_config
from vsearch_tf.data import prepared
from vsearch_tf.data.images import load_crop_resize
from vsearch_tf.data.pipeline import training_dataset
from vsearch_tf.data.tables import read_training
from vsearch_tf.demo import generate
from vsearch_tf.errors import VSearchError

SIZE = 48


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prepared") / "data"
    generate(root, n_train=12, n_val=2, n_test=2, seed=0)  # 48 rows: seller photos, user boxes
    return root


def _cfg(root: Path, out: Path, *overrides: str):
    base = [f"data.root={root}", f"data.image_size={SIZE}", f"data.prepared={out}"]
    return load_config(None, base + list(overrides))


def _prepare(data: Path, out: Path, encoding: str) -> Path:
    seen = []
    cfg = _cfg(data, out, f"data.prepared_encoding={encoding}")
    manifest = prepared.prepare(cfg, progress=lambda done, total: seen.append(done))
    assert manifest["complete"] and manifest["count"] == 48 and not manifest["skipped"]
    assert seen[-1] == 48 and len(seen) == manifest["shards"] + 1  # once up front, once a shard
    assert manifest["encoding"] == prepared.ENCODINGS[encoding]
    return out


@pytest.fixture(scope="module")
def shards(data, tmp_path_factory) -> Path:
    return _prepare(data, tmp_path_factory.mktemp("shards") / "prepared", "jpeg")


@pytest.fixture(scope="module")
def raw_shards(data, tmp_path_factory) -> Path:
    return _prepare(data, tmp_path_factory.mktemp("raw") / "prepared", "raw")


def _unjittered_crops(directory: Path, encoding: str) -> dict[int, tuple[np.ndarray, bool]]:
    """Row -> (its crop with no jitter and no augmentation, whether it has a box)."""
    files = sorted(str(p) for p in directory.glob("*.tfrecord"))
    crops = {}
    for record in tf.data.TFRecordDataset(files).map(lambda r: prepared.parse(r, encoding)):
        got = prepared.crop(record, encoding, SIZE, jitter=0.0, strength=0.0)
        crops[int(record["row"])] = (got.numpy(), bool(record["box"][0] >= 0))
    return crops


def _raw_pipeline_crop(table, row: int) -> np.ndarray:
    return load_crop_resize(tf.io.read_file(table.paths[row]), table.boxes[row], SIZE)[0].numpy()


def _jpeg_error(raw: np.ndarray) -> float:
    """What re-encoding the raw pipeline's crop alone, as prepare encodes, costs."""
    pixels = tf.cast(np.round(raw), tf.uint8)
    reencoded = tf.io.decode_jpeg(tf.io.encode_jpeg(pixels, quality=prepared.QUALITY))
    return np.abs(reencoded.numpy().astype(np.float32) - raw).mean()


def test_same_crops_as_the_raw_pipeline(data, shards):
    table = read_training(data / "train.csv", data)
    crops = _unjittered_crops(shards, "jpeg")
    for row, (got, _) in crops.items():
        raw = _raw_pipeline_crop(table, row)
        error = np.abs(got - raw).mean()
        jpeg = _jpeg_error(raw)
        assert error <= 1.25 * jpeg + 0.25, (table.paths[row], error, jpeg)
    assert set(crops) == set(range(48))
    assert sum(boxed for _, boxed in crops.values()) == 36  # seller photos have no box


def test_raw_shards_round_trip_and_match_jpeg_shards(data, shards, raw_shards):
    table = read_training(data / "train.csv", data)
    raw_crops, jpeg_crops = _unjittered_crops(raw_shards, "raw"), _unjittered_crops(shards, "jpeg")
    assert set(raw_crops) == set(jpeg_crops) == set(range(48))
    for row, (got, boxed) in raw_crops.items():
        raw = _raw_pipeline_crop(table, row)
        assert np.abs(got - raw).max() <= 0.5 + 1e-3, table.paths[row]  # rounded to uint8 only
        assert boxed == jpeg_crops[row][1]
        between = np.abs(got - jpeg_crops[row][0]).mean()
        assert between <= 1.25 * _jpeg_error(raw) + 0.25, (table.paths[row], between)
    sizes = [sum(p.stat().st_size for p in d.glob("*.tfrecord")) for d in (shards, raw_shards)]
    assert sizes[1] > 2 * sizes[0]  # what raw costs: bytes


def test_training_follows_the_manifest_encoding(data, shards, raw_shards, tmp_path):
    table = read_training(data / "train.csv", data)
    labels = np.unique(table.products, return_inverse=True)[1].astype(np.int32)
    for folder in (shards, raw_shards):  # the config's default encoding does not matter
        batches = list(training_dataset(table, labels, SIZE, 8, prepared=str(folder)))
        assert len(batches) == 6 and batches[0][0].shape == (8, SIZE, SIZE, 3)
    with pytest.raises(VSearchError, match="encoding=jpeg q95 4:2:0 where the config gives raw"):
        prepared.prepare(_cfg(data, shards, "data.prepared_encoding=raw"))
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in raw_shards.iterdir():
        (copy / p.name).symlink_to(p)
    manifest = json.loads((raw_shards / prepared.MANIFEST).read_text())
    (copy / prepared.MANIFEST).unlink()
    (copy / prepared.MANIFEST).write_text(json.dumps({**manifest, "encoding": "webp q80"}))
    with pytest.raises(VSearchError, match="encoding=webp q80, which is not read here"):
        training_dataset(table, labels, SIZE, 8, prepared=str(copy))


def test_training_batches_from_shards(data, shards):
    table = read_training(data / "train.csv", data)
    labels = np.unique(table.products, return_inverse=True)[1].astype(np.int32)
    ds = training_dataset(table, labels, SIZE, 8, prepared=str(shards), augment=0.5)
    batches = list(ds)
    assert len(batches) == 6  # 48 images, drop_remainder
    pixels, got = batches[0]
    assert pixels.shape == (8, SIZE, SIZE, 3) and pixels.dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(pixels)) and float(tf.reduce_max(pixels)) <= 255.0
    seen = np.sort(np.concatenate([y.numpy() for _, y in batches]))
    assert np.array_equal(seen, np.sort(labels))  # every image once, with its own label


def test_pk_batches_from_shards(data, raw_shards):
    """P x K from a stream: every batch is P runs of K images of one product, class-major as
    the PKSampler's, the stream is endless, and every product is drawn."""
    table = read_training(data / "train.csv", data)
    labels = np.unique(table.products, return_inverse=True)[1].astype(np.int32)
    ds = training_dataset(table, labels, SIZE, 8, prepared=str(raw_shards), pk=2)
    batches = list(ds.take(30))  # 30 batches of 8 > the 48 images: the stream repeats
    assert len(batches) == 30
    drawn = set()
    for pixels, got in batches:
        assert pixels.shape == (8, SIZE, SIZE, 3)
        pairs = got.numpy().reshape(4, 2)
        assert (pairs[:, 0] == pairs[:, 1]).all(), pairs
        drawn |= set(pairs[:, 0])
    assert drawn == set(labels)
    cfg = load_config(None, ["data.prepared=x", "data.sampler=pk", "loss.pair=contrastive"])
    assert cfg.data.sampler == "pk"  # no longer refused with prepared shards
    with pytest.raises(VSearchError, match="data.cache_dir: prepared shards are decoded"):
        load_config(None, ["data.prepared=x", "data.cache_dir=y"])


def test_stale_or_mismatched_shards_are_refused(data, shards, tmp_path):
    table = read_training(data / "train.csv", data)
    labels = np.zeros(len(table), np.int32)
    for override, expected in (
        ("data.image_size=64", "image_size=48 where the config gives 64"),
        ("data.prepared_margin=0.3", "margin=0.25 where the config gives 0.3"),
    ):
        cfg = _cfg(data, shards, override)
        with pytest.raises(VSearchError, match=expected) as err:
            prepared.readable(table, cfg)
        assert "\n" not in str(err.value)
        with pytest.raises(VSearchError, match=expected):
            training_dataset(
                table,
                labels,
                cfg.data.image_size,
                8,
                prepared=str(shards),
                margin=cfg.data.prepared_margin,
            )
    # The csv changed after prepare: another digest.
    (tmp_path / "images").symlink_to(data / "images")
    header, first, second, *rest = (data / "train.csv").read_text().splitlines()
    (tmp_path / "train.csv").write_text("\n".join([header, second, first, *rest]) + "\n")
    changed = read_training(tmp_path / "train.csv", tmp_path)
    with pytest.raises(VSearchError, match="another training csv"):
        prepared.readable(changed, _cfg(tmp_path, shards))
    with pytest.raises(VSearchError, match="another training csv"):  # nor is it prepared over
        prepared.prepare(_cfg(tmp_path, shards))
    with pytest.raises(VSearchError, match="data.prepared_margin: 0.1 is less than 2 x"):
        prepared.prepare(_cfg(data, tmp_path / "new", "data.prepared_margin=0.1"))


_SLOW_PREPARE = """
import sys, time
from vsearch_tf.config import load_config
from vsearch_tf.data.prepared import prepare
cfg = load_config(None, sys.argv[1:])
prepare(cfg, workers=1, progress=lambda done, total: time.sleep(1 if done else 0))
"""


def test_killed_prepare_resumes(data, tmp_path):
    out = tmp_path / "prepared"
    args = [f"data.root={data}", f"data.image_size={SIZE}", f"data.prepared={out}"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    child = subprocess.Popen([sys.executable, "-c", _SLOW_PREPARE, *args], env=env)
    try:
        deadline = time.time() + 120
        while not list(out.glob("*.json"))[1:] and time.time() < deadline:  # manifest + 1 shard
            assert child.poll() is None, "prepare ended before it could be killed"
            time.sleep(0.1)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("train-*")}
    manifest = json.loads((out / prepared.MANIFEST).read_text())
    assert not manifest["complete"] and 2 <= len(before) < 2 * manifest["shards"]
    with pytest.raises(VSearchError, match="an unfinished prepare"):
        prepared.checked_manifest(out, data / "train.csv", SIZE, 0.25)

    resumed = prepared.prepare(_cfg(data, out))
    assert resumed["complete"] and resumed["count"] == 48
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("train-*")}
    done = {n for n in before if n.endswith(".json")}
    assert all(after[n] == before[n] for n in done)  # finished shards were not written again
    assert len(after) == 2 * resumed["shards"] and not list(out.glob(".*tmp*"))


def test_cli_prepares_then_trains_one_epoch_from_shards(data, tmp_path):
    """``vsearch data prepare`` writes the config's shards; ``vsearch train`` then reads them."""
    from tests.helpers import invoke

    out = tmp_path / "prepared"
    config = write_tiny_config(
        tmp_path,
        {"root": str(data), "image_size": SIZE, "prepared": str(out)},
        train={"epochs": 1},
    )
    result = invoke("data", "prepare", "--config", config, "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["dir"] == str(out) and manifest["count"] == 48 and manifest["complete"]
    result = invoke("train", "--config", config, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["train_images"] == 48 and summary["skipped_images"] == []
    assert (tmp_path / "runs" / "tiny" / "embedder.keras").is_file()


def test_windows_jitter_and_zoom_inside_the_crop_and_the_flip_is_per_image():
    shape, box = tf.constant([72, 70]), tf.constant([11.0, 12.0, 48.0, 48.0])
    assert prepared.window(box, shape, 0.0, 0.0).numpy().tolist() == [12, 11, 48, 48]
    whole = prepared.window(tf.constant(prepared.NO_BOX), shape, 0.0, 0.0)
    assert whole.numpy().tolist() == [0, 0, 72, 70]
    windows = np.array([prepared.window(box, shape, 0.1, 1.0).numpy() for _ in range(200)])
    y, x, h, w = windows.T
    assert (y >= 0).all() and (x >= 0).all() and (y + h <= 72).all() and (x + w <= 70).all()
    # Size: +-20% of jitter (position and size), times the zoom (0.8-1.1 at strength 1).
    assert 48 * 0.8 * 0.8 - 1 <= w.min() < 45 and 52 < w.max() <= 48 * 1.2 * 1.1 + 1
    assert len({tuple(v) for v in windows}) > 100

    images = tf.constant(np.random.default_rng(0).uniform(60, 190, (2, 6, 8, 3)), tf.float32)
    u = tf.constant([[0.5] * 4 + [0.2], [0.5] * 4 + [0.8]])  # colour at its identity
    out = prepared._flip_and_colour(images, u, 1.0).numpy()
    np.testing.assert_allclose(out[0], images[0, :, ::-1].numpy(), atol=1e-3)
    np.testing.assert_allclose(out[1], images[1].numpy(), atol=1e-3)
