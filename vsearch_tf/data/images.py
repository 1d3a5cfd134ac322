"""Decode, crop and resize one encoded image inside the TensorFlow graph.

This is the single preprocessing code path: the tf.data pipelines (training, indexing,
evaluation) and the exported SavedModel's ``serving_default`` signature all call
:func:`load_crop_resize`, so what is served is exactly what was trained and indexed.

Pixels leave here as float32 RGB in [0, 255]; each backbone's own normalisation is the first
layer of the embedder (see :mod:`vsearch_tf.models.embedder`).

Hostile input fails with a one-line ``InvalidArgumentError`` before anything large is
allocated: an empty file, a format other than JPEG / PNG / GIF / BMP / WebP, or a header that
declares more than ``max_pixels`` pixels (a decompression bomb). JPEGs are shown as a browser
shows them: their EXIF orientation is applied, and boxes refer to the image as displayed.
"""

from __future__ import annotations

import functools

import tensorflow as tf

from vsearch_tf.data import DEFAULT_MAX_PIXELS

#: A box of all -1 means "no box": use the whole image.
NO_BOX = (-1.0, -1.0, -1.0, -1.0)

JPEG, PNG, GIF, BMP, WEBP = 1, 2, 3, 4, 5
_MAGIC = (
    (JPEG, 0, b"\xff\xd8\xff"),
    (PNG, 0, b"\x89PNG\r\n\x1a\n"),
    (GIF, 0, b"GIF87a"),
    (GIF, 0, b"GIF89a"),
    (BMP, 0, b"BM"),
    (WEBP, 8, b"WEBP"),
)
FORMATS = "JPEG, PNG, GIF, BMP or WebP"
# EXIF lives in an APP1 segment near the start of a JPEG; 64 KiB is the largest segment.
_EXIF_WINDOW = 1 << 16
_EXIF_ENTRIES = 64
_EXIF_MARKER = b"Exif\0\0"
_JPEG_RATIOS = (1, 2, 4, 8)  # the DCT-domain scales libjpeg decodes at


def image_format(image_bytes: tf.Tensor) -> tf.Tensor:
    """The format code (``JPEG``...``WEBP``) from the leading bytes; 0 for anything else."""
    padded = tf.strings.join([image_bytes, b"\0" * 16])  # substr fails past the end of a string
    code = tf.constant(0)
    for fmt, offset, magic in reversed(_MAGIC):
        code = tf.where(tf.equal(tf.strings.substr(padded, offset, len(magic)), magic), fmt, code)
    return code


def _bytes(image_bytes: tf.Tensor, length: int, offset: tf.Tensor | int = 0) -> tf.Tensor:
    """``length`` bytes from ``offset`` as int64, zero-padded past the end (an offset beyond the
    end reads zeros), so fixed offsets are always readable."""
    offset = tf.clip_by_value(tf.cast(offset, tf.int32), 0, tf.strings.length(image_bytes))
    head = tf.io.decode_raw(tf.strings.substr(image_bytes, offset, length), tf.uint8)
    return tf.cast(tf.pad(head, [[0, length - tf.shape(head)[0]]]), tf.int64)


def _uint(data: tf.Tensor, offset, size: int, little: bool | tf.Tensor = True) -> tf.Tensor:
    """Unsigned integer of ``size`` bytes at ``offset`` (scalar or vector; clipped to ``data``)."""
    offset = tf.cast(offset, tf.int64)
    last = tf.cast(tf.shape(data)[0] - 1, tf.int64)
    parts = [tf.gather(data, tf.clip_by_value(offset + i, 0, last)) for i in range(size)]
    lo_first = tf.add_n([p * 256**i for i, p in enumerate(parts)])
    hi_first = tf.add_n([p * 256 ** (size - 1 - i) for i, p in enumerate(parts)])
    return tf.where(little, lo_first, hi_first)


def header_shape(image_bytes: tf.Tensor, fmt: tf.Tensor) -> tf.Tensor:
    """``[height, width]`` (int64) as the header declares it, without decoding pixels."""
    h = _bytes(image_bytes, 32)

    def webp():  # lossy VP8, lossless VP8L and extended VP8X each store the size differently
        chunk = tf.strings.substr(tf.strings.join([image_bytes, b"\0" * 16]), 12, 4)
        vp8 = tf.stack([_uint(h, 28, 2) % 0x4000, _uint(h, 26, 2) % 0x4000])
        bits = _uint(h, 21, 4)
        vp8l = tf.stack([bits // 0x4000 % 0x4000 + 1, bits % 0x4000 + 1])
        vp8x = tf.stack([_uint(h, 27, 3) + 1, _uint(h, 24, 3) + 1])
        return tf.where(
            tf.equal(chunk, b"VP8L"), vp8l, tf.where(tf.equal(chunk, b"VP8X"), vp8x, vp8)
        )

    # JPEG, by far the commonest, on a two-way cond: a six-way switch_case costs 0.5 ms per image.
    return tf.cond(
        tf.equal(fmt, JPEG),
        lambda: tf.cast(tf.image.extract_jpeg_shape(image_bytes)[:2], tf.int64),
        lambda: tf.switch_case(
            fmt,
            [
                lambda: tf.zeros([2], tf.int64),
                lambda: tf.zeros([2], tf.int64),  # JPEG: not reached
                lambda: tf.stack([_uint(h, 20, 4, little=False), _uint(h, 16, 4, little=False)]),
                lambda: tf.stack([_uint(h, 8, 2), _uint(h, 6, 2)]),
                # BMP: the height is signed, negative when the rows run top-down.
                lambda: tf.stack(
                    [
                        tf.cast(
                            tf.abs(tf.bitcast(tf.cast(_uint(h, 22, 4), tf.uint32), tf.int32)),
                            tf.int64,
                        ),
                        _uint(h, 18, 4),
                    ]
                ),
                webp,
            ],
        ),
    )


def check_image(image_bytes: tf.Tensor, max_pixels: int = DEFAULT_MAX_PIXELS) -> tf.Tensor:
    """Assert the bytes are a non-empty image of a known format and at most ``max_pixels``
    (header dimensions); returns the format code. Cheap: nothing is decoded."""
    not_empty = tf.debugging.Assert(tf.strings.length(image_bytes) > 0, ["empty file (0 bytes)"])
    with tf.control_dependencies([not_empty]):
        fmt = image_format(image_bytes)
        known = tf.debugging.Assert(fmt > 0, [f"not a {FORMATS} image"])
    with tf.control_dependencies([known]):
        shape = header_shape(image_bytes, fmt)
    small = tf.debugging.Assert(
        shape[0] * shape[1] <= max_pixels,
        [
            tf.strings.format(
                "{} x {} pixels is more than max_pixels={} (a decompression bomb?)",
                (shape[1], shape[0], max_pixels),
            )
        ],
    )
    with tf.control_dependencies([small]):  # nothing is decoded before every check has passed
        return tf.identity(fmt)


def exif_orientation(image_bytes: tf.Tensor) -> tf.Tensor:
    """The EXIF orientation tag (1-8) of a JPEG, 1 when absent or unreadable.

    Finds the ``Exif\\0\\0`` APP1 header in the first 64 KiB (a string split: a byte-wise search
    over 64 KiB as tensors cost more than decoding the crop), then tag 0x0112 among the first
    IFD's entries. Offsets stay inside that window and read zeros past its end, so a hostile
    header cannot read out of bounds.
    """
    window = tf.strings.substr(image_bytes, 0, _EXIF_WINDOW)
    before = tf.strings.split(window, _EXIF_MARKER, maxsplit=1)
    found = tf.size(before) > 1
    tiff = tf.cast(tf.strings.length(before[0]), tf.int64) + len(_EXIF_MARKER)
    header = _bytes(window, 8, tiff)
    little = tf.equal(_uint(header, 0, 2), 0x4949)  # "II"; "MM" is big-endian
    ifd = tiff + _uint(header, 4, 4, little)
    table = _bytes(window, 2 + 12 * _EXIF_ENTRIES, tf.minimum(ifd, _EXIF_WINDOW))
    # Each entry: tag (2 bytes), type (2), count (4), value (4).
    rows = tf.reshape(table[2:], [_EXIF_ENTRIES, 12])
    weights = tf.where(little, tf.constant([1, 256], tf.int64), tf.constant([256, 1], tf.int64))
    tags, values = (
        tf.reduce_sum(rows[:, 0:2] * weights, 1),
        tf.reduce_sum(rows[:, 8:10] * weights, 1),
    )
    is_tag = (
        tf.range(_EXIF_ENTRIES, dtype=tf.int64) < tf.reduce_sum(table[:2] * weights)
    ) & tf.equal(tags, 0x0112)
    value = tf.reduce_max(tf.where(is_tag, values, 0))
    valid = found & (value >= 1) & (value <= 8)
    return tf.cast(tf.where(valid, value, 1), tf.int32)


def crop_window(
    bbox: tf.Tensor, height: tf.Tensor, width: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """Clip an ``(x, y, w, h)`` pixel box to the image and return ``([y, x, h, w], fallback)``.

    A box that is NaN, empty or entirely outside the image falls back to the whole image and
    ``fallback`` is True, so callers can count it; the "no box" sentinel (all -1) also gives the
    whole image but is not a fallback.
    """
    bbox = tf.cast(tf.reshape(bbox, [4]), tf.float32)
    has_box = tf.reduce_any(tf.not_equal(bbox, -1.0))
    finite = tf.reduce_all(tf.math.is_finite(bbox))
    safe = tf.where(finite, bbox, tf.zeros_like(bbox))
    h_f, w_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    x0 = tf.clip_by_value(tf.round(safe[0]), 0.0, w_f)
    y0 = tf.clip_by_value(tf.round(safe[1]), 0.0, h_f)
    x1 = tf.clip_by_value(tf.round(safe[0] + safe[2]), 0.0, w_f)
    y1 = tf.clip_by_value(tf.round(safe[1] + safe[3]), 0.0, h_f)
    valid = finite & (x1 > x0) & (y1 > y0)
    use_box = has_box & valid
    full = tf.stack([0.0, 0.0, h_f, w_f])
    window = tf.where(use_box, tf.stack([y0, x0, y1 - y0, x1 - x0]), full)
    return tf.cast(window, tf.int32), has_box & tf.logical_not(valid)


def _stored_window(
    window: tf.Tensor, orientation: tf.Tensor, height: tf.Tensor, width: tf.Tensor
) -> tf.Tensor:
    """A ``[y, x, h, w]`` window of the displayed image -> the same pixels' window in the stored
    one.

    Displayed point (x, y) is stored point, per orientation: 1 (x, y), 2 (W-x, y), 3 (W-x, H-y),
    4 (x, H-y), 5 (y, x), 6 (y, H-x), 7 (W-y, H-x), 8 (W-y, x), with W x H the stored size.
    """
    y0, x0 = window[0], window[1]
    y1, x1 = y0 + window[2], x0 + window[3]

    def corner(x, y):
        xs = tf.gather([x, width - x, width - x, x, y, y, width - y, width - y], orientation - 1)
        ys = tf.gather(
            [y, y, height - y, height - y, x, height - x, height - x, x], orientation - 1
        )
        return xs, ys

    (ax, ay), (bx, by) = corner(x0, y0), corner(x1, y1)
    return tf.stack([tf.minimum(ay, by), tf.minimum(ax, bx), tf.abs(by - ay), tf.abs(bx - ax)])


def _displayed(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """Stored pixels -> as displayed (what PIL's ``ImageOps.exif_transpose`` gives): a transpose
    for orientations 5-8, then flips; no control flow, which on a decoded crop cost ~1 ms even
    for orientation 1 (nearly every photo)."""
    transposed = orientation >= 5
    flip_rows = tf.reduce_any(tf.equal(orientation, [3, 4, 7, 8]))
    flip_cols = tf.reduce_any(tf.equal(orientation, [2, 3, 6, 7]))
    image = tf.transpose(image, tf.where(transposed, [1, 0, 2], [0, 1, 2]))
    return tf.reverse(image, tf.boolean_mask([0, 1], tf.stack([flip_rows, flip_cols])))


def _to_rgb(image: tf.Tensor) -> tf.Tensor:
    """Float [0, 1] image with 1-4 channels -> RGB in [0, 255]; alpha is composited onto white,
    because catalogue photos with transparency are products cut out for a white page."""
    channels = tf.shape(image)[-1]
    has_alpha = tf.equal(channels % 2, 0)
    alpha = tf.cond(has_alpha, lambda: image[..., -1:], lambda: tf.ones_like(image[..., :1]))
    colour = image[..., : channels - tf.cast(has_alpha, tf.int32)]
    colour = tf.cond(
        tf.equal(tf.shape(colour)[-1], 1), lambda: tf.tile(colour, [1, 1, 3]), lambda: colour
    )
    colour = tf.ensure_shape(colour[..., :3], [None, None, 3])
    # Rounded to whole levels like a decoded 8-bit JPEG, so both paths give identical pixels.
    return tf.round((colour * alpha + (1.0 - alpha)) * 255.0)


def _decode_jpeg_crop(
    image_bytes: tf.Tensor, bbox: tf.Tensor, min_side: int | None
) -> tuple[tf.Tensor, tf.Tensor]:
    # Only the crop is decoded: for a small product in a large phone photo this is most of the cost.
    # CMYK and grayscale JPEGs come out as RGB too (libjpeg converts).
    shape = tf.image.extract_jpeg_shape(image_bytes)
    orientation = exif_orientation(image_bytes)
    turned = orientation >= 5  # the displayed image is the stored one transposed
    height, width = tf.where(turned, shape[1], shape[0]), tf.where(turned, shape[0], shape[1])
    window, fallback = crop_window(bbox, height, width)
    stored = _stored_window(window, orientation, shape[0], shape[1])
    # libjpeg can decode at 1/2, 1/4 or 1/8 scale in the DCT domain (a proper low-pass, and the
    # inverse DCT, colour conversion and copy shrink by 4-64x): take the largest scale that keeps
    # the crop at least `min_side` on both sides, so the resize that follows still only shrinks.
    # The scaled crop covers the same pixels (its window is rounded outwards, < 1 scaled pixel).
    ratios = (1,) if min_side is None else _JPEG_RATIOS
    branch = tf.reduce_sum(
        tf.cast([tf.reduce_all(stored[2:] >= r * min_side) for r in ratios[1:]], tf.int32)
    )

    def decode(ratio: int) -> tf.Tensor:
        lo = stored[:2] // ratio
        size = (stored[:2] + stored[2:] + ratio - 1) // ratio - lo
        return tf.image.decode_and_crop_jpeg(
            image_bytes,
            tf.concat([lo, size], 0),
            channels=3,
            ratio=ratio,
            dct_method="INTEGER_ACCURATE",
        )

    image = tf.switch_case(branch, [functools.partial(decode, r) for r in ratios])
    return tf.cast(_displayed(image, orientation), tf.float32), fallback


def _decode_other_crop(
    image_bytes: tf.Tensor, bbox: tf.Tensor, fmt: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    # decode_image(dtype=float32) maps 8- and 16-bit PNGs alike onto [0, 1]; its WebP decoder
    # only gives uint8. Animated GIFs and WebPs give their first frame.
    image = tf.cond(
        tf.equal(fmt, WEBP),
        lambda: tf.image.convert_image_dtype(
            tf.io.decode_image(image_bytes, expand_animations=False), tf.float32
        ),
        lambda: tf.io.decode_image(
            image_bytes, channels=0, dtype=tf.float32, expand_animations=False
        ),
    )
    window, fallback = crop_window(bbox, tf.shape(image)[0], tf.shape(image)[1])
    image = image[window[0] : window[0] + window[2], window[1] : window[1] + window[3]]
    return _to_rgb(image), fallback


def decode_and_crop(
    image_bytes: tf.Tensor,
    bbox: tf.Tensor,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Encoded JPEG/PNG/GIF/BMP/WebP bytes and an ``(x, y, w, h)`` box -> (RGB float32 crop in
    [0, 255] of shape [h, w, 3], fallback flag). Bad input fails as :func:`check_image` says.

    With ``min_side``, a JPEG crop larger than ``2 * min_side`` on both sides is decoded at 1/2,
    1/4 or 1/8 scale (the smallest it can be while staying at least ``min_side``)."""
    fmt = check_image(image_bytes, max_pixels)
    return tf.cond(
        tf.equal(fmt, JPEG),
        lambda: _decode_jpeg_crop(image_bytes, bbox, min_side),
        lambda: _decode_other_crop(image_bytes, bbox, fmt),
    )


def load_crop_resize(
    image_bytes: tf.Tensor, bbox: tf.Tensor, image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[tf.Tensor, tf.Tensor]:
    """The full serving/eval preprocessing: decode, crop the box, resize to a square.

    Returns float32 RGB pixels in [0, 255] of shape ``[image_size, image_size, 3]`` and the
    fallback flag of :func:`crop_window`. A JPEG crop of more than twice ``image_size`` is
    decoded at a reduced DCT scale (see :func:`decode_and_crop`: a whole 12 MP photo to 224 px,
    150 -> 50 ms of CPU; Huffman decoding, which no scale avoids, is most of the rest). A crop at
    least ``image_size`` on both sides then shrinks by area averaging (each output pixel is the
    mean of the input it covers: alias-free, and ~5x cheaper on CPU than antialiased bilinear,
    which cost as much as decoding the crop); any other is resized bilinearly with antialiasing
    (for the side that shrinks).
    """
    crop, fallback = decode_and_crop(image_bytes, bbox, max_pixels, min_side=image_size)
    image = resize_crop(crop, tf.constant([image_size, image_size]))
    return tf.ensure_shape(image, [image_size, image_size, 3]), fallback


def resize_crop(crop: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    """Resize a decoded crop to ``size`` ``[height, width]`` as :func:`load_crop_resize` does:
    area averaging when it shrinks on both sides, else antialiased bilinear; clipped to [0, 255]."""
    shrinks = tf.reduce_all(tf.shape(crop)[:2] >= size)
    image = tf.cond(
        shrinks,
        lambda: tf.image.resize(crop, size, method="area"),
        lambda: tf.image.resize(crop, size, method="bilinear", antialias=True),
    )
    return tf.clip_by_value(image, 0.0, 255.0)


def displayed_size(image_bytes: tf.Tensor, fmt: tf.Tensor) -> tf.Tensor:
    """``[height, width]`` (int32) of the image as displayed, EXIF orientation applied, from its
    header: the frame that boxes refer to, known before anything is decoded."""
    shape = tf.cast(header_shape(image_bytes, fmt), tf.int32)
    turned = tf.equal(fmt, JPEG) & (exif_orientation(image_bytes) >= 5)
    return tf.where(turned, shape[::-1], shape)


def decodes_fully(image_bytes: tf.Tensor, max_pixels: int = DEFAULT_MAX_PIXELS) -> tf.Tensor:
    """Check every byte of an image decodes; raises, or returns True.

    A truncated JPEG whose box lies in its intact part crops fine, yet the file is broken. JPEGs
    are decoded at 1/8 scale, ~5x cheaper.
    """
    fmt = check_image(image_bytes, max_pixels)
    decoded = tf.cond(
        tf.equal(fmt, JPEG),
        lambda: tf.size(tf.io.decode_jpeg(image_bytes, ratio=8)),
        lambda: tf.size(tf.io.decode_image(image_bytes, expand_animations=False)),
    )
    return decoded > 0
