"""Prepared training shards: every training photo decoded once, not once per epoch.

Decoding a phone photo costs more CPU than a GPU's training step on it, so a pipeline that decodes
full photos every epoch starves a GPU however good it is (docs/throughput.md). :func:`prepare`
makes one pass over the training csv: each box is cropped with a context margin (room for the
train-time box jitter), shrunk so the box is at most ``image_size`` on each side, stored as JPEG
or raw pixels (``data.prepared_encoding``) in sharded TFRecords with its box position inside the
crop and its product id, plus a manifest (csv digest, image size, margin, encoding, count,
skipped images with reasons).

Rows go to shards by a fixed permutation, so every shard is a random sample of the csv and a few
interleaved shards plus a shuffle buffer mix products well. Each shard is written atomically,
then its ``.json`` (count, skipped rows): a shard is done when both exist, so a killed prepare
resumes shard by shard. There are at least ``_MIN_SHARDS`` shards, so that ``tf.distribute``
can give every worker its own files.

:func:`training_dataset` reads them (``data.prepared``), in whichever encoding the manifest
records: per image, the jittered and zoomed box is cut from the stored crop (real context instead
of reflected borders; a JPEG decodes only that window) and resized bilinearly; per batch, one
XLA computation mirrors half the images and applies
:func:`vsearch_tf.data.pipeline.colour_jitter`. Rotation, the one transform of
:func:`vsearch_tf.data.pipeline.augmenter` not applied here, costs 1.8 ms per 224 px image on CPU
even batched (``ImageProjectiveTransformV3``), more than the whole prepared pipeline
(docs/throughput.md).
"""

from __future__ import annotations

import hashlib
import json
import os
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
#: ``data.prepared_encoding`` -> what the manifest records. Raw pixels skip the decode (0.6 ms of
#: CPU an image) for 5.5x the bytes (docs/throughput.md).
ENCODINGS = {"jpeg": f"jpeg q{QUALITY} 4:2:0", "raw": "raw uint8 rgb"}
_SHARD_ROWS = 1024  # 55 MB of JPEG crops per shard, 300 MB raw
_MIN_SHARDS = 16
_SHUFFLE_BYTES = 256 << 20  # the shuffle buffer holds encoded records: ~4,900 JPEGs, ~880 raw
_SETTINGS = ("format", "csv_sha256", "image_size", "margin", "encoding", "rows", "shards")
_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "box": tf.io.FixedLenFeature([4], tf.float32),
    "product": tf.io.FixedLenFeature([], tf.string),
    "row": tf.io.FixedLenFeature([], tf.int64),
}
_RAW_FEATURES = {**_FEATURES, "shape": tf.io.FixedLenFeature([2], tf.int64)}  # height, width


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


def _settings(
    csv: Path, image_size: int, margin: float, rows: int, encoding: str
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "csv_sha256": csv_sha256(csv),
        "image_size": image_size,
        "margin": margin,
        "encoding": ENCODINGS[encoding],
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
    """(uint8 pixels, the box in them as ``x, y, w, h``) for one training row.

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
    return tf.cast(tf.round(stored), tf.uint8), inside


def _example(image: bytes | np.ndarray, box: np.ndarray, product: str, row: int) -> bytes:
    """One record; ``image`` is JPEG bytes, or pixels stored raw with their height and width."""
    feature = tf.train.Feature
    features = {
        "box": feature(float_list=tf.train.FloatList(value=box.tolist())),
        "product": feature(bytes_list=tf.train.BytesList(value=[product.encode()])),
        "row": feature(int64_list=tf.train.Int64List(value=[int(row)])),
    }
    if isinstance(image, np.ndarray):
        features["shape"] = feature(int64_list=tf.train.Int64List(value=image.shape[:2]))
        image = image.tobytes()
    features["image"] = feature(bytes_list=tf.train.BytesList(value=[image]))
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


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
    settings = _settings(
        csv, cfg.data.image_size, cfg.data.prepared_margin, len(table), cfg.data.prepared_encoding
    )
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
    jpeg = cfg.data.prepared_encoding == "jpeg"

    def load(path, box, row):
        pixels, inside = _context(tf.io.read_file(path), box, size, margin, max_pixels)
        return tf.io.encode_jpeg(pixels, quality=QUALITY) if jpeg else pixels, inside, row

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
    """The manifest of ``directory``, refused in one line unless it is complete, in an encoding
    this version reads, and matches the config: the same training csv (by digest), image size and
    margin. The encoding is the manifest's, whatever ``data.prepared_encoding`` says: it only
    chooses how ``prepare`` writes."""
    directory = Path(directory)
    manifest = _load_manifest(directory)
    if manifest is None:
        raise VSearchError(
            f"{directory}: no prepared shards ({MANIFEST} missing); run vsearch prepare"
        )
    encoding = encoding_of(manifest)
    problem = None if encoding else f"encoding={manifest.get('encoding')}, which is not read here"
    if problem is None:
        wanted = _settings(Path(csv), image_size, margin, manifest.get("rows", -1), encoding)
        problem = _mismatch(manifest, wanted)
    if problem is None and not manifest.get("complete"):
        problem = "an unfinished prepare"
    if problem:
        raise VSearchError(
            f"{directory / MANIFEST}: prepared with {problem}; run vsearch prepare again"
        )
    return manifest


def encoding_of(manifest: dict[str, Any]) -> str | None:
    """The ``data.prepared_encoding`` (a key of :data:`ENCODINGS`) the manifest records."""
    return next((k for k, v in ENCODINGS.items() if v == manifest.get("encoding")), None)


def readable(table: ImageTable, cfg: Config) -> tuple[ImageTable, list[dict[str, str]]]:
    """What ``train`` keeps of its csv when it reads prepared shards: the rows prepare did not
    skip, and the skipped ones with their reasons (no image is decoded again). More than
    ``data.max_bad_fraction`` skipped is an error, as for raw photos."""
    data = cfg.data
    check_margin(data.prepared_margin, data.box_jitter)
    manifest = checked_manifest(data.prepared, table.source, data.image_size, data.prepared_margin)
    bad = np.asarray([s["line"] - 2 for s in manifest["skipped"]], np.int64)
    skipped = [{"path": s["path"], "reason": s["reason"]} for s in manifest["skipped"]]
    what = "were unreadable when prepared"
    return table.without(skipped, bad, cfg.data.max_bad_fraction, what), skipped


def parse(record: tf.Tensor, encoding: str = "jpeg") -> dict[str, tf.Tensor]:
    """One serialized record -> ``image`` (JPEG bytes or raw pixels), ``box``, ``product``,
    ``row``, and for raw pixels their ``shape`` (height, width)."""
    return tf.io.parse_single_example(record, _RAW_FEATURES if encoding == "raw" else _FEATURES)


def window(box: tf.Tensor, shape: tf.Tensor, jitter: float, strength: float) -> tf.Tensor:
    """``[y, x, h, w]``, int32: the part of a stored crop of ``shape`` (height, width) that becomes
    the training image. The stored ``box`` jittered (:func:`jitter_boxes`), zoomed about its
    centre (:func:`zoom_factor` of ``strength``), clipped to the crop, in whole pixels: at most
    half a pixel off, which no augmentation notices, and an unjittered box (whole pixels already)
    is exact. "No box" is the whole crop."""
    size = tf.cast(shape[::-1], tf.float32)  # width, height: as the box
    box = jitter_boxes(box, jitter)
    box = tf.where(tf.reduce_all(tf.equal(box, -1.0)), tf.concat([tf.zeros([2]), size], 0), box)
    zoom = zoom_factor(tf.random.uniform([]), strength)
    centre, half = box[:2] + box[2:] / 2.0, box[2:] / 2.0 * zoom
    lo = tf.clip_by_value(tf.round(centre - half), 0.0, size - 1.0)
    hi = tf.clip_by_value(tf.round(centre + half), lo + 1.0, size)
    return tf.cast(tf.concat([lo[::-1], (hi - lo)[::-1]], 0), tf.int32)


def crop(
    record: dict[str, tf.Tensor], encoding: str, image_size: int, jitter: float, strength: float
) -> tf.Tensor:
    """A parsed record -> ``[image_size, image_size, 3]`` float32 pixels in [0, 255]: its
    :func:`window` (a JPEG decodes only that) resized bilinearly with half-pixel centres. With no
    jitter and strength 0 it is the stored box unchanged: the raw pipeline's crop, up to JPEG
    re-encoding (docs/throughput.md). Flip and colour come per batch (:func:`_flip_and_colour`).
    """
    image, raw = record["image"], encoding == "raw"
    shape = tf.cast(record["shape"], tf.int32) if raw else tf.image.extract_jpeg_shape(image)[:2]
    y, x, h, w = tf.unstack(window(record["box"], shape, jitter, strength))
    if raw:
        pixels = tf.reshape(tf.io.decode_raw(image, tf.uint8), tf.concat([shape, [3]], 0))
        pixels = pixels[y : y + h, x : x + w]
    else:
        pixels = tf.io.decode_and_crop_jpeg(image, tf.stack([y, x, h, w]), channels=3)
    # Resized from float32: ResizeBilinear takes half the CPU it takes from uint8.
    return tf.image.resize(tf.cast(pixels, tf.float32), [image_size, image_size])


@tf.function(jit_compile=True)
def _flip_and_colour(images: tf.Tensor, u: tf.Tensor, strength: float) -> tf.Tensor:
    """Mirror the images where ``u[:, 4] < 0.5``, then :func:`colour_jitter` with ``u[:, :4]``:
    one XLA computation, so the flip costs no pass over the pixels of its own."""
    mirrored = tf.where(u[:, 4, None, None, None] < 0.5, tf.reverse(images, [2]), images)
    return colour_jitter(mirrored, u[:, :4], strength)


def _pk_groups(images: tf.data.Dataset, k: int, p: int) -> tf.data.Dataset:
    """P x K batches from a shuffled stream of ``(pixels, label)``: each product's images wait in
    a window until K of them have arrived, then P such windows make a batch (class-major, as
    :class:`~vsearch_tf.data.sampling.PKSampler`'s). A stream cannot index by class, so unlike the
    sampler this does not promise P distinct products per batch; with hundreds of products in
    the shuffle buffer a repeat is rare, and a repeated product only adds positives. At most one
    partial window per product is held: memory grows with the catalogue, not the shards."""
    windows = images.group_by_window(
        key_func=lambda pixels, label: tf.cast(label, tf.int64),
        reduce_func=lambda key, window: window.batch(k, drop_remainder=True),
        window_size=k,
    )
    return windows.batch(p, drop_remainder=True).map(
        lambda pixels, labels: (
            tf.reshape(pixels, tf.concat([[-1], tf.shape(pixels)[2:]], 0)),
            tf.reshape(labels, [-1]),
        ),
        num_parallel_calls=AUTOTUNE,
    )


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
    pk: int | None = None,
) -> tf.data.Dataset:
    """Shuffled, augmented ``(pixels, label)`` batches of exactly ``batch_size`` from the shards
    in ``directory`` (prepared from ``table``'s csv), one pass over them. ``labels`` are those of
    ``table``'s rows, matched by product id; records of products not in ``table`` are left out.

    The shard files are the source, so ``tf.distribute`` gives each worker its own shards. They are
    read ``os.cpu_count()`` (at least 8) at a time and shuffled in a buffer of 256 MB of records.

    With ``pk=K`` the batches are ``batch_size / K`` groups of K images of one product, endless
    (:func:`_pk_groups`), as pair losses and XBM need.
    """
    check_margin(margin, box_jitter)
    manifest = checked_manifest(directory, table.source, image_size, margin)
    if manifest["count"] < batch_size:
        raise VSearchError(
            f"{directory}: {manifest['count']} prepared images is fewer than one batch of "
            f"{batch_size}"
        )
    encoding = encoding_of(manifest)
    files = [str(Path(directory) / f["file"]) for f in manifest["files"] if f["count"]]
    record_bytes = sum(os.path.getsize(f) for f in files) / manifest["count"]
    products, first = np.unique(table.products.astype(str), return_index=True)
    label_of = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(products, labels[first].astype(np.int32)), -1
    )
    ds = tf.data.Dataset.from_tensor_slices(files)
    ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(len(files), max(8, os.cpu_count() or 1)),
        num_parallel_calls=AUTOTUNE,
        deterministic=False,
    )
    buffer = int(min(manifest["count"], max(1, _SHUFFLE_BYTES // record_bytes)))
    ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)

    def load(record):  # one map: each tf.data stage costs per image
        r = parse(record, encoding)
        return crop(r, encoding, image_size, box_jitter, augment), label_of.lookup(r["product"])

    def flip_and_colour(images, label):
        u = tf.random.uniform([tf.shape(images)[0], 5], seed=seed)
        return _flip_and_colour(images, u, augment), label

    ds = ds.map(load, num_parallel_calls=AUTOTUNE, deterministic=False)
    ds = ds.filter(lambda pixels, label: label >= 0)
    if pk:
        ds = _pk_groups(ds.repeat(), pk, batch_size // pk)
    else:
        ds = ds.batch(
            batch_size, drop_remainder=True, num_parallel_calls=AUTOTUNE, deterministic=False
        )
    if augment > 0:
        ds = ds.map(flip_and_colour, num_parallel_calls=AUTOTUNE, deterministic=False)
    return ds.prefetch(AUTOTUNE).with_options(_options(deterministic=False))
