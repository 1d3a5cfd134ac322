"""Prepared training shards: every training photo decoded once, not once per epoch.

Decoding a phone photo costs more CPU than a GPU's training step on it, so a pipeline that decodes
full photos every epoch starves a GPU however good it is (docs/throughput.md). :func:`prepare`
makes one pass over the training csv: each box is cropped with a context margin (room for the
train-time box jitter), shrunk so the box is at most ``image_size`` on each side, JPEG-encoded and
written to sharded TFRecords with its box position inside the crop and its product id, plus a
manifest (csv digest, image size, margin, count, skipped images with reasons).

Rows go to shards by a fixed permutation, so every shard is a random sample of the csv and a few
interleaved shards plus a shuffle buffer mix products well. Each shard is written atomically,
then its ``.json`` (count, skipped rows): a shard is done when both exist, so a killed prepare
resumes shard by shard. There are at least ``_MIN_SHARDS`` shards, so that ``tf.distribute``
can give every worker its own files.

:func:`training_dataset` reads them (``data.prepared``): box jitter, zoom and flip are one
bilinear resampling of the small crop (``crop_and_resize``, real context instead of reflected
borders), colour jitter as :func:`vsearch_tf.data.pipeline.colour_jitter`. Rotation, the one
transform of :func:`vsearch_tf.data.pipeline.augmenter` not applied here, costs 1.9 ms per 224 px
image on CPU (``ImageProjectiveTransformV3``), more than the whole prepared pipeline.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from vsearch_tf import io
from vsearch_tf.config import Config
from vsearch_tf.data.images import (
    NO_BOX,
    check_image,
    crop_window,
    decode_and_crop,
    displayed_size,
    load_crop_resize,
    resize_crop,
)
from vsearch_tf.data.pipeline import (
    AUTOTUNE,
    _options,
    colour_jitter,
    jitter_boxes,
    why_unreadable,
    zoom_factor,
)
from vsearch_tf.data.tables import ImageTable, read_training
from vsearch_tf.errors import VSearchError

FORMAT = "vsearch-prepared/1"
MANIFEST = "manifest.json"
QUALITY = 95  # JPEG quality of the stored crops, 4:2:0 (docs/throughput.md: cost vs error)
ENCODING = f"jpeg q{QUALITY} 4:2:0"
_SHARD_ROWS = 1024  # ~50 MB of crops per shard
_MIN_SHARDS = 16
_SHUFFLE_BUFFER = 4096  # encoded crops (~50 KB each), not pixels
_SETTINGS = ("format", "csv_sha256", "image_size", "margin", "encoding", "rows", "shards")
_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "box": tf.io.FixedLenFeature([4], tf.float32),
    "product": tf.io.FixedLenFeature([], tf.string),
    "row": tf.io.FixedLenFeature([], tf.int64),
}


def csv_sha256(path: str | Path) -> str:
    """The digest of the csv's bytes: the same csv moved to another machine still matches."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_margin(margin: float, box_jitter: float) -> None:
    """The jittered box must stay inside the stored context: its right (bottom) edge moves by up
    to twice ``box_jitter`` (position plus size)."""
    if margin < 2 * box_jitter:
        raise VSearchError(
            f"config key data.prepared_margin: {margin:g} is less than 2 x data.box_jitter="
            f"{box_jitter:g}, so jittered boxes would leave the prepared crops"
        )


def _settings(csv: Path, image_size: int, margin: float, rows: int) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "csv_sha256": csv_sha256(csv),
        "image_size": image_size,
        "margin": margin,
        "encoding": ENCODING,
        "rows": rows,
        "shards": max(-(-rows // _SHARD_ROWS), min(rows, _MIN_SHARDS)),
    }


def _mismatch(found: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    """The first setting that differs, in words; None if all match."""
    for key in _SETTINGS:
        if found.get(key) != wanted[key]:
            if key == "csv_sha256":
                return "another training csv (its digest differs)"
            return f"{key}={found.get(key)} where the config gives {wanted[key]}"
    return None


def _shard_name(k: int, shards: int) -> str:
    return f"train-{k:05d}-of-{shards:05d}.tfrecord"


# --- writing ------------------------------------------------------------------------------------


def _context(
    image_bytes: tf.Tensor, box: tf.Tensor, image_size: int, margin: float, max_pixels: int
) -> tuple[tf.Tensor, tf.Tensor]:
    """(JPEG bytes, the box in the stored crop as ``x, y, w, h``) for one training row.

    The box is stored as exactly the raw pipeline's crop (:func:`load_crop_resize`), inside its
    context: the box grown by ``margin`` of its size per side, clipped to the image, scaled per
    axis as the box was. So an unjittered crop at train time is an identity resampling. A row
    without a usable box stores the whole image at ``image_size`` and the "no box" sentinel.
    """
    pixels, fallback = load_crop_resize(image_bytes, box, image_size, max_pixels)
    has_box = tf.reduce_any(tf.not_equal(box, -1.0)) & tf.logical_not(fallback)

    def with_context() -> tuple[tf.Tensor, tf.Tensor]:
        height, width = tf.unstack(displayed_size(image_bytes, check_image(image_bytes)))
        window, _ = crop_window(box, height, width)  # [y, x, h, w]: the pixels of `pixels`
        grow = tf.cast(tf.round(margin * tf.cast(window[2:], tf.float32)), tf.int32)
        grown = tf.concat([window[:2] - grow, window[2:] + 2 * grow], 0)
        context, _ = crop_window(tf.cast(tf.gather(grown, [1, 0, 3, 2]), tf.float32), height, width)
        # Decoded at a reduced DCT scale only while the box keeps >= image_size pixels.
        min_side = int(np.ceil(image_size * (1 + 2 * margin)))
        xywh = tf.cast(tf.gather(context, [1, 0, 3, 2]), tf.float32)
        around, _ = decode_and_crop(image_bytes, xywh, max_pixels, min_side=min_side)
        scale = image_size / tf.cast(window[2:], tf.float32)
        before = tf.cast(tf.round(tf.cast(window[:2] - context[:2], tf.float32) * scale), tf.int32)
        after_px = context[:2] + context[2:] - window[:2] - window[2:]
        after = tf.cast(tf.round(tf.cast(after_px, tf.float32) * scale), tf.int32)
        around = tf.round(resize_crop(around, before + image_size + after))
        (top, left), end = tf.unstack(before), before + image_size
        middle = tf.concat([around[top : end[0], :left], pixels, around[top : end[0], end[1] :]], 1)
        stored = tf.concat([around[:top], middle, around[end[0] :]], 0)
        inside = tf.cast(tf.stack([left, top, image_size, image_size]), tf.float32)
        return stored, inside

    stored, inside = tf.cond(has_box, with_context, lambda: (pixels, tf.constant(NO_BOX)))
    stored = tf.cast(tf.round(stored), tf.uint8)
    return tf.io.encode_jpeg(stored, quality=QUALITY), inside


def _example(image: bytes, box: np.ndarray, product: str, row: int) -> bytes:
    feature = tf.train.Feature
    return tf.train.Example(
        features=tf.train.Features(
            feature={
                "image": feature(bytes_list=tf.train.BytesList(value=[image])),
                "box": feature(float_list=tf.train.FloatList(value=box.tolist())),
                "product": feature(bytes_list=tf.train.BytesList(value=[product.encode()])),
                "row": feature(int64_list=tf.train.Int64List(value=[int(row)])),
            }
        )
    ).SerializeToString()


def _write_shard(
    path: Path, records: list[bytes], table: ImageTable, missing: list[int], max_pixels: int
) -> None:
    """The shard, then its ``.json`` (which marks it done), each atomically."""
    with io.atomic_path(path) as tmp, tf.io.TFRecordWriter(str(tmp)) as writer:
        for record in records:
            writer.write(record)
    reasons = why_unreadable(table, np.asarray(missing, np.int64), max_pixels)
    info = {
        "file": path.name,
        "count": len(records),
        "skipped": [
            {"line": int(r) + 2, "path": str(table.paths[r]), "reason": why}
            for r, why in zip(missing, reasons)
        ],
    }
    io.write_json(path.with_suffix(".json"), info)


def _load_manifest(directory: Path) -> dict[str, Any] | None:
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise VSearchError(f"{path}: not a prepared-shards manifest ({err})") from None


def prepare(
    cfg: Config,
    *,
    out: str | None = None,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Write the prepared shards of ``cfg``'s training csv to ``out`` (default
    ``data.prepared``) and return the manifest. Shards already done are kept, so a killed prepare
    resumes; a folder prepared from another csv or other settings is an error, not overwritten.

    ``workers``: images decoded at once (default: tf.data's autotuning over all cores).
    ``progress(done, total)`` is called with the rows done after each shard.
    """
    if not (out or cfg.data.prepared):
        raise VSearchError("vsearch prepare: give --out DIR or set data.prepared in the config")
    directory = Path(out or cfg.data.prepared)
    check_margin(cfg.data.prepared_margin, cfg.data.box_jitter)
    csv = Path(cfg.data.root) / cfg.data.train_csv
    table = read_training(csv, cfg.data.root, check_files=False)
    settings = _settings(csv, cfg.data.image_size, cfg.data.prepared_margin, len(table))
    found = _load_manifest(directory)
    if found is not None and (problem := _mismatch(found, settings)):
        raise VSearchError(
            f"{directory / MANIFEST}: these shards were prepared with {problem}; "
            "delete the folder or prepare into another one"
        )
    if found is not None and found.get("complete"):
        return found
    busy = "another vsearch prepare is writing these shards"
    with io.file_lock(directory / ".lock", wait=False, busy=busy):
        io.write_json(directory / MANIFEST, {**settings, "complete": False})
        _write_shards(cfg, table, directory, settings["shards"], workers, progress)
        return _finish(directory, settings, csv)


def _write_shards(
    cfg: Config,
    table: ImageTable,
    directory: Path,
    shards: int,
    workers: int | None,
    progress: Callable[[int, int], None] | None,
) -> None:
    """Write the shards not done yet (those without their ``.json``)."""
    order = np.random.default_rng(0).permutation(len(table))
    parts = np.array_split(order, shards)
    done = {
        k
        for k in range(shards)
        if (directory / _shard_name(k, shards)).with_suffix(".json").is_file()
    }
    todo = [k for k in range(shards) if k not in done]
    total = len(table)
    finished = sum(len(parts[k]) for k in done)
    if progress:
        progress(finished, total)
    if todo:
        for k, records, missing in _prepared_parts(
            cfg, table, [parts[k] for k in todo], todo, workers
        ):
            _write_shard(
                directory / _shard_name(k, shards), records, table, missing, cfg.data.max_pixels
            )
            finished += len(parts[k])
            if progress:
                progress(finished, total)


def _finish(directory: Path, settings: dict[str, Any], csv: Path) -> dict[str, Any]:
    """The complete manifest, from the shards' ``.json`` files."""
    shards = settings["shards"]
    infos = [
        json.loads((directory / _shard_name(k, shards)).with_suffix(".json").read_text())
        for k in range(shards)
    ]
    manifest = {
        **settings,
        "complete": True,
        "csv": str(csv),
        "count": sum(info["count"] for info in infos),
        "files": [{"file": info["file"], "count": info["count"]} for info in infos],
        "skipped": sorted((s for info in infos for s in info["skipped"]), key=lambda s: s["line"]),
    }
    io.write_json(directory / MANIFEST, manifest)
    return manifest


def _prepared_parts(
    cfg: Config, table: ImageTable, parts: list[np.ndarray], ids: list[int], workers: int | None
):
    """Yield ``(shard id, serialized records, rows that did not decode)`` per part, in order:
    one ordered tf.data pass over all parts' rows, decoding in parallel."""
    rows = np.concatenate(parts)
    ds = tf.data.Dataset.from_tensor_slices((table.paths[rows], table.boxes[rows], rows))
    size, margin, max_pixels = cfg.data.image_size, cfg.data.prepared_margin, cfg.data.max_pixels

    def load(path, box, row):
        image, inside = _context(tf.io.read_file(path), box, size, margin, max_pixels)
        return image, inside, row

    ds = ds.map(load, num_parallel_calls=workers or AUTOTUNE).ignore_errors()
    options = _options(deterministic=True)
    if workers:
        options.threading.private_threadpool_size = workers
    outputs = iter(ds.prefetch(AUTOTUNE).with_options(options).as_numpy_iterator())
    pending = None
    for k, part in zip(ids, parts):
        wanted, records = set(part.tolist()), []
        while True:
            item = pending if pending is not None else next(outputs, None)
            pending = None
            if item is None or int(item[2]) not in wanted:
                pending = item
                break
            image, inside, row = item
            records.append(_example(image, inside, str(table.products[row]), row))
            wanted.discard(int(row))
        yield k, records, sorted(wanted)


# --- reading ------------------------------------------------------------------------------------


def checked_manifest(
    directory: str | Path, csv: str | Path, image_size: int, margin: float
) -> dict[str, Any]:
    """The manifest of ``directory``, refused in one line unless it is complete and matches the
    config: the same training csv (by digest), image size and margin."""
    directory = Path(directory)
    manifest = _load_manifest(directory)
    if manifest is None:
        raise VSearchError(
            f"{directory}: no prepared shards ({MANIFEST} missing); run vsearch prepare"
        )
    wanted = _settings(Path(csv), image_size, margin, manifest.get("rows", -1))
    problem = _mismatch(manifest, wanted)
    if problem is None and not manifest.get("complete"):
        problem = "an unfinished prepare"
    if problem:
        raise VSearchError(
            f"{directory / MANIFEST}: prepared with {problem}; run vsearch prepare again"
        )
    return manifest


def readable(table: ImageTable, cfg: Config) -> tuple[ImageTable, list[dict[str, str]]]:
    """What ``train`` keeps of its csv when it reads prepared shards: the rows prepare did not
    skip, and the skipped ones with their reasons (no image is decoded again). More than
    ``data.max_bad_fraction`` skipped is an error, as for raw photos."""
    data = cfg.data
    check_margin(data.prepared_margin, data.box_jitter)
    manifest = checked_manifest(data.prepared, table.source, data.image_size, data.prepared_margin)
    bad = np.asarray([s["line"] - 2 for s in manifest["skipped"]], np.int64)
    if len(bad) > cfg.data.max_bad_fraction * len(table):
        first = manifest["skipped"][0]
        raise VSearchError(
            f"{table.source}: {len(bad)} of {len(table)} training images were unreadable when "
            f"prepared ({len(bad) / len(table):.1%} > data.max_bad_fraction="
            f"{cfg.data.max_bad_fraction:g}); first: {first['path']}: {first['reason']}"
        )
    keep = np.ones(len(table), bool)
    keep[bad] = False
    skipped = [{"path": s["path"], "reason": s["reason"]} for s in manifest["skipped"]]
    return table.subset(keep), skipped


def parse(record: tf.Tensor) -> dict[str, tf.Tensor]:
    """One serialized record -> ``image`` (JPEG bytes), ``box``, ``product``, ``row``."""
    return tf.io.parse_single_example(record, _FEATURES)


def crop(
    image_bytes: tf.Tensor, box: tf.Tensor, image_size: int, jitter: float, strength: float
) -> tf.Tensor:
    """A stored crop -> ``[image_size, image_size, 3]`` float32 pixels: the box jittered
    (:func:`vsearch_tf.data.pipeline.jitter_boxes`), zoomed about its centre and flipped at
    random (``strength`` as in :func:`vsearch_tf.data.pipeline.augmenter`), clipped to the crop,
    resampled bilinearly with half-pixel centres in one pass. With no jitter and strength 0 it is
    the raw pipeline's crop (docs/throughput.md gives the difference)."""
    image = tf.cast(tf.io.decode_jpeg(image_bytes, channels=3), tf.float32)  # faster resampled
    height, width = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
    box = jitter_boxes(box, jitter)
    box = tf.where(tf.reduce_all(tf.equal(box, -1.0)), tf.stack([0.0, 0.0, width, height]), box)
    u = tf.random.uniform([2])
    zoom = zoom_factor(u[0], strength)
    centre, half = box[:2] + box[2:] / 2.0, box[2:] / 2.0 * zoom
    lo = tf.maximum(centre - half, 0.0)
    hi = tf.minimum(centre + half, tf.stack([width, height]))
    # Pixel edges -> the first and last output pixel centres, in input pixel centres.
    step = (hi - lo) / image_size
    first = tf.clip_by_value(lo + step / 2.0 - 0.5, 0.0, tf.stack([width, height]) - 1.0)
    last = tf.clip_by_value(hi - step / 2.0 - 0.5, 0.0, tf.stack([width, height]) - 1.0)
    flip = u[1] < 0.5 if strength > 0 else tf.constant(False)
    x0, x1 = tf.where(flip, last[0], first[0]), tf.where(flip, first[0], last[0])
    extent = tf.maximum(tf.stack([height, width]) - 1.0, 1.0)
    boxes = tf.stack([first[1] / extent[0], x0 / extent[1], last[1] / extent[0], x1 / extent[1]])
    pixels = tf.image.crop_and_resize(image[None], boxes[None], [0], [image_size, image_size])
    return tf.clip_by_value(pixels[0], 0.0, 255.0)


def training_dataset(
    directory: str | Path,
    table: ImageTable,
    labels: np.ndarray,
    image_size: int,
    batch_size: int,
    *,
    seed: int = 0,
    augment: float = 0.5,
    box_jitter: float = 0.1,
    margin: float = 0.25,
) -> tf.data.Dataset:
    """Shuffled, augmented ``(pixels, label)`` batches of exactly ``batch_size`` from the shards
    in ``directory`` (prepared from ``table``'s csv), one pass over them. ``labels`` are those of
    ``table``'s rows, matched by product id; records of products not in ``table`` are left out.

    The shard files are the source, so ``tf.distribute`` gives each worker its own shards.
    """
    check_margin(margin, box_jitter)
    manifest = checked_manifest(directory, table.source, image_size, margin)
    if manifest["count"] < batch_size:
        raise VSearchError(
            f"{directory}: {manifest['count']} prepared images is fewer than one batch of "
            f"{batch_size}"
        )
    files = [str(Path(directory) / f["file"]) for f in manifest["files"] if f["count"]]
    products, first = np.unique(table.products.astype(str), return_index=True)
    label_of = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(products, labels[first].astype(np.int32)), -1
    )
    ds = tf.data.Dataset.from_tensor_slices(files)
    ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(len(files), 8),
        num_parallel_calls=AUTOTUNE,
        deterministic=False,
    )
    buffer = min(manifest["count"], _SHUFFLE_BUFFER)
    ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)

    def load(record):  # one map: each tf.data stage costs per image
        r = parse(record)
        label = label_of.lookup(r["product"])
        return crop(r["image"], r["box"], image_size, box_jitter, augment), label

    def colour(images, label):
        u = tf.random.uniform([tf.shape(images)[0], 4], seed=seed)
        return colour_jitter(images, u, augment), label

    ds = ds.map(load, num_parallel_calls=AUTOTUNE, deterministic=False)
    ds = ds.filter(lambda pixels, label: label >= 0)
    ds = ds.batch(batch_size, drop_remainder=True, num_parallel_calls=AUTOTUNE, deterministic=False)
    if augment > 0:
        ds = ds.map(colour, num_parallel_calls=AUTOTUNE, deterministic=False)
    return ds.prefetch(AUTOTUNE).with_options(_options(deterministic=False))
