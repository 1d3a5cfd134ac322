"""tf.data input pipelines: everything per image happens in the graph, in parallel.

Two shapes of pipeline share :func:`vsearch_tf.data.images.load_crop_resize`:

- :func:`embedding_dataset` for indexing and evaluation: ordered, carries each row's index so
  unreadable images can be dropped (``ignore_errors``) and still be reported by row.
- :func:`training_dataset`: shuffled, box-jittered, augmented (:func:`augmenter`), batched
  with ``drop_remainder`` (fixed shapes for XLA and multi-replica strategies), prefetched.

Unreadable images -- missing files included -- are skipped, never silently: :func:`unreadable_rows`
finds them up front (what training does) and :func:`why_unreadable` gives the one-line reason for
each skipped row.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from vsearch_tf.data import DEFAULT_MAX_PIXELS
from vsearch_tf.data.images import decode_and_crop, decodes_fully, load_crop_resize
from vsearch_tf.data.sampling import PKSampler
from vsearch_tf.data.tables import ImageTable
from vsearch_tf.errors import VSearchError, error_cause

AUTOTUNE = tf.data.AUTOTUNE
#: The reason given for a catalogue row whose file is not there: skipped like a damaged image.
MISSING = "image not found"


def _options(deterministic: bool) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = deterministic
    options.autotune.enabled = True
    options.threading.private_threadpool_size = 0  # share the global pool; nproc-aware by default
    return options


def embedding_dataset(
    table: ImageTable,
    image_size: int,
    batch_size: int,
    rows: np.ndarray | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tf.data.Dataset:
    """Batches of ``(pixels, fallback, row)`` in table order, for embedding a gallery or queries.

    Unreadable images are skipped by ``ignore_errors``; the caller finds them as the rows that
    never came out, so nothing is dropped silently.
    """
    rows = np.arange(len(table), dtype=np.int64) if rows is None else rows.astype(np.int64)
    ds = tf.data.Dataset.from_tensor_slices((table.paths[rows], table.boxes[rows], rows))

    def load(path, box, row):
        pixels, fallback = load_crop_resize(tf.io.read_file(path), box, image_size, max_pixels)
        return pixels, fallback, row

    ds = ds.map(load, num_parallel_calls=AUTOTUNE).ignore_errors()
    return ds.batch(batch_size).prefetch(AUTOTUNE).with_options(_options(deterministic=True))


def unreadable_rows(table: ImageTable, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Rows whose file is missing, empty, not an image, too large or does not decode to the end
    (:func:`vsearch_tf.data.images.decodes_fully`), checked in parallel. JPEGs are decoded at 1/8
    scale, so this costs a fraction of one epoch's decoding."""
    ds = tf.data.Dataset.from_tensor_slices((table.paths, np.arange(len(table), dtype=np.int64)))
    ds = ds.map(
        lambda path, row: (decodes_fully(tf.io.read_file(path), max_pixels), row),
        num_parallel_calls=AUTOTUNE,
    )
    ds = ds.ignore_errors().batch(1024).with_options(_options(deterministic=False))
    good = np.concatenate([row.numpy() for _, row in ds] or [np.zeros(0, np.int64)])
    return np.setdiff1d(np.arange(len(table)), good)


@tf.function(reduce_retracing=True)
def _decode_one(path: tf.Tensor, box: tf.Tensor, max_pixels: tf.Tensor) -> tf.Tensor:
    return decode_and_crop(tf.io.read_file(path), box, max_pixels)[0]


def unreadable_reason(err: tf.errors.OpError) -> str:
    """The one-line reason an image failed to load: a missing file reads as such, whether the
    catalogue is embedded here or by Beam workers."""
    if isinstance(err, tf.errors.NotFoundError):
        return MISSING
    return error_cause(err.message)


def why_unreadable(
    table: ImageTable, rows: np.ndarray, max_pixels: int = DEFAULT_MAX_PIXELS, limit: int = 1000
) -> list[str]:
    """The one-line reason each of ``rows`` fails to decode, found by decoding it again alone
    (a tf.data pipeline skips a failing image but drops its error). Beyond ``limit`` rows only
    missing files are looked for, so a gallery of broken files does not take twice as long."""
    reasons = []
    for i, row in enumerate(rows):
        if i >= limit:
            missing = not tf.io.gfile.exists(table.paths[row])
            reasons.append(MISSING if missing else f"not examined (more than {limit} unreadable)")
            continue
        try:
            _decode_one(
                tf.constant(table.paths[row]),
                tf.constant(table.boxes[row]),
                tf.constant(max_pixels, tf.int64),
            )
            reasons.append("did not decode in the pipeline, but does alone (changed on disk?)")
        except tf.errors.OpError as err:
            reasons.append(unreadable_reason(err))
    return reasons


def jitter_boxes(box: tf.Tensor, amount: float) -> tf.Tensor:
    """Randomly move and rescale a box by up to ``amount`` of its size (train-time crop jitter,
    done before decoding so JPEGs still decode only the crop). "No box" stays "no box"."""
    if amount <= 0:
        return box
    noise = tf.random.uniform([4], minval=-amount, maxval=amount)
    size = tf.stack([box[2], box[3], box[2], box[3]])
    jittered = box + noise * size
    return tf.where(tf.reduce_all(tf.equal(box, -1.0)), box, jittered)


# RGB <-> YIQ: saturation and hue are a scaling and a rotation of the (I, Q) chroma plane.
_RGB_TO_YIQ = np.array(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32
)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ).astype(np.float32)


def zoom_factor(u: tf.Tensor, strength: float) -> tf.Tensor:
    """Uniform ``u`` in [0, 1] -> the zoom of :func:`augmenter` (> 1 shows more of the image)."""
    return 1.0 - 0.2 * strength + u * (0.3 * strength)


@tf.function(jit_compile=True)
def colour_jitter(images: tf.Tensor, u: tf.Tensor, strength: float) -> tf.Tensor:
    """The colour half of :func:`augmenter`: brightness, contrast, saturation and hue of a batch
    of [0, 255] pixels from ``u``, ``[n, 4]`` uniforms in [0, 1], as one affine map per image
    (brightness, contrast, then saturation and hue as a scaling and rotation of the YIQ chroma
    plane). Compiled with XLA, which fuses the map, its clip and the image mean into two passes
    over the pixels: 0.2 ms a 224 px image on CPU, against 0.55 ms for the same ops one by one
    (a batched [pixels, 3] x [3, 3] matmul, an add and a clip)."""
    s = float(strength)
    n = tf.shape(images)[0]
    sym = 2.0 * u - 1.0  # uniform in [-1, 1]
    brightness = sym[:, 0] * (0.3 * s * 255.0)
    contrast = 1.0 + sym[:, 1] * (0.3 * s)
    saturation_factor = 0.5 + sym[:, 2] * (0.3 * s)
    saturation = saturation_factor / (1.0 - saturation_factor)  # Keras' mapping: 0.5 -> 1
    hue = sym[:, 3] * (0.05 * s * 0.5 * 2.0 * math.pi)  # up to 0.025 s of a turn either way
    # Brightness then contrast around the mean: x -> contrast * x + offset, per image.
    offset = tf.reduce_mean(images, axis=[1, 2]) * (1.0 - contrast[:, None]) + brightness[:, None]
    zeros = tf.zeros([n])
    cos, sin, one = saturation * tf.cos(hue), saturation * tf.sin(hue), tf.ones([n])
    chroma = tf.reshape(
        tf.stack([one, zeros, zeros, zeros, cos, -sin, zeros, sin, cos], axis=1), [n, 3, 3]
    )
    to_yiq, to_rgb = tf.constant(_RGB_TO_YIQ), tf.constant(_YIQ_TO_RGB)
    colour = tf.einsum("ij,njk,kl->nil", to_rgb, chroma, to_yiq)  # acts on RGB column vectors
    bias = tf.einsum("nc,ndc->nd", offset, colour)[:, None, None, :]
    # Output channel c is sum_k matrix[c, k] * channel k: elementwise, so XLA fuses it.
    matrix = (colour * contrast[:, None, None])[:, None, None]  # [n, 1, 1, out, in]
    mixed = bias + tf.add_n([images[..., k : k + 1] * matrix[..., k] for k in range(3)])
    return tf.clip_by_value(mixed, 0.0, 255.0)


def augmenter(strength: float, seed: int) -> Callable[[tf.Tensor], tf.Tensor] | None:
    """Random flip, rotation, zoom and colour jitter of a batch of [0, 255] pixels.

    ``strength`` in [0, 1] scales every transform (0 disables augmentation), with the ranges of
    Keras' RandomFlip("horizontal"), RandomRotation(0.08 s), RandomZoom((-0.2 s, 0.1 s)) and
    RandomColorJitter(brightness 0.3 s, contrast 0.3 s, saturation (0.5 -+ 0.3 s), hue 0.05 s).
    Why not those layers: on CPU they take ~18 ms per 224 px image, four times the decoding,
    and on a CPU-only machine that time is taken from the model (tools/bench_throughput.py).
    Here the geometry is one bilinear resampling (flip, rotation and zoom composed into one
    transform, reflected borders) and the colour one affine map per image
    (:func:`colour_jitter`): ~4 ms. All parameters of a batch come from one seeded random op.
    """
    if strength <= 0:
        return None
    s = float(strength)

    def augment(images: tf.Tensor) -> tf.Tensor:
        shape = tf.shape(images)
        n = shape[0]
        h, w = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
        u = tf.random.uniform([n, 7], seed=seed)
        # Output pixel p samples the input at c + zoom * R(angle) * flip * (p - c);
        # zoom > 1 shows more.
        flip = tf.where(u[:, 0] < 0.5, -1.0, 1.0)
        angle = (2.0 * u[:, 1] - 1.0) * (0.08 * s * 2.0 * math.pi)
        zoom = zoom_factor(u[:, 2], s)
        a0, a1 = zoom * tf.cos(angle) * flip, -zoom * tf.sin(angle)
        b0, b1 = zoom * tf.sin(angle) * flip, zoom * tf.cos(angle)
        cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
        zeros = tf.zeros([n])
        transforms = tf.stack(
            [a0, a1, cx - a0 * cx - a1 * cy, b0, b1, cy - b0 * cx - b1 * cy, zeros, zeros], axis=1
        )
        images = tf.raw_ops.ImageProjectiveTransformV3(
            images=images,
            transforms=transforms,
            output_shape=shape[1:3],
            fill_value=0.0,
            interpolation="BILINEAR",
            fill_mode="REFLECT",
        )
        return colour_jitter(images, u[:, 3:], s)

    return augment


def training_dataset(
    table: ImageTable,
    labels: np.ndarray,
    image_size: int,
    batch_size: int,
    *,
    seed: int = 0,
    augment: float = 0.5,
    box_jitter: float = 0.1,
    cache_dir: str | None = None,
    pk: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    prepared: str | None = None,
    margin: float = 0.25,
) -> tf.data.Dataset:
    """Shuffled ``(pixels, label)`` batches of exactly ``batch_size``, one pass over the table.

    With ``prepared``, from the shards `vsearch prepare` wrote there (context ``margin``) instead
    of the photos: :func:`vsearch_tf.data.prepared.training_dataset`.

    With ``pk=K`` batches are class-balanced instead (``batch_size / K`` products x K images,
    endless, see :class:`vsearch_tf.data.sampling.PKSampler`), as pair losses and XBM need.

    With ``cache_dir``, decoded crops (before jitter and augmentation, so no jitter) are cached to
    disk after the first epoch: worth it when decoding, not the model, is the bottleneck.
    """
    if prepared:
        from vsearch_tf.data import prepared as shards  # it builds on this module

        return shards.training_dataset(
            prepared,
            table,
            labels,
            image_size,
            batch_size,
            seed=seed,
            augment=augment,
            box_jitter=box_jitter,
            margin=margin,
            pk=pk,
        )
    n = len(table)
    if n < batch_size:
        raise VSearchError(
            f"{table.source}: {n} readable training images is fewer than one batch of {batch_size}"
        )
    ds = tf.data.Dataset.from_tensor_slices((table.paths, table.boxes, labels.astype(np.int32)))

    def load(path, box, label, jitter=0.0):
        pixels, _ = load_crop_resize(
            tf.io.read_file(path), jitter_boxes(box, jitter), image_size, max_pixels
        )
        return pixels, label

    if pk:
        # Decode whole P x K batches (parallel across batches), so no reordering can mix them.
        def load_batch(r):
            pixels = tf.map_fn(
                lambda a: load(a[0], a[1], 0, box_jitter)[0],
                (r["path"], r["box"]),
                fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32),
            )
            return pixels, r["label"]

        records = {"path": table.paths, "label": labels.astype(np.int32), "box": table.boxes}
        ds = PKSampler(batch_size // pk, pk, seed=seed)(records).map(
            load_batch, num_parallel_calls=AUTOTUNE
        )
        ds = ds.ignore_errors()
    elif cache_dir:
        # Decode once, cache the crops, shuffle the cached crops (bounded buffer: they are pixels).
        os.makedirs(cache_dir, exist_ok=True)
        ds = ds.map(load, num_parallel_calls=AUTOTUNE).ignore_errors()
        ds = ds.cache(os.path.join(cache_dir, f"crops-{image_size}"))
        ds = ds.shuffle(min(n, 8192), seed=seed, reshuffle_each_iteration=True)
    else:
        # Shuffle the cheap (path, box, label) records, then decode in parallel.
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
        ds = ds.map(
            lambda p, b, y: load(p, b, y, box_jitter),
            num_parallel_calls=AUTOTUNE,
            deterministic=False,
        )
        ds = ds.ignore_errors()
    if not pk:
        ds = ds.batch(
            batch_size, drop_remainder=True, num_parallel_calls=AUTOTUNE, deterministic=False
        )
    aug = augmenter(augment, seed)
    if aug is not None:
        ds = ds.map(lambda x, y: (aug(x), y), num_parallel_calls=AUTOTUNE, deterministic=False)
    return ds.prefetch(AUTOTUNE).with_options(_options(deterministic=False))
