"""The training augmenter: ranges, identity at zero strength, geometry and colour as intended."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from vsearch_tf.data.pipeline import augmenter


def _pixels(n: int = 8, h: int = 20, w: int = 24) -> tf.Tensor:
    return tf.constant(np.random.default_rng(0).uniform(0, 255, (n, h, w, 3)).astype(np.float32))


def test_zero_strength_is_no_augmenter_and_tiny_strength_only_mirrors():
    assert augmenter(0.0, 0) is None
    x = _pixels()
    y = augmenter(1e-6, 0)(x)
    mirrored = x[:, :, ::-1]
    per_image = tf.minimum(
        tf.reduce_max(tf.abs(y - x), [1, 2, 3]), tf.reduce_max(tf.abs(y - mirrored), [1, 2, 3])
    )
    assert float(tf.reduce_max(per_image)) < 0.01
    flipped = tf.reduce_max(tf.abs(y - x), [1, 2, 3]) > 1.0
    assert (
        0 < int(tf.reduce_sum(tf.cast(flipped, tf.int32))) < 8
    )  # about half the images are mirrored


def test_output_keeps_shape_and_pixel_range_and_varies():
    x = _pixels()
    y = augmenter(1.0, 0)(x)
    assert y.shape == x.shape and y.dtype == tf.float32
    assert float(tf.reduce_min(y)) >= 0.0 and float(tf.reduce_max(y)) <= 255.0
    assert float(tf.reduce_mean(tf.abs(y - x))) > 5.0


def test_grey_stays_grey_and_flat_images_stay_flat_up_to_brightness():
    # Saturation and hue act on the chroma plane only and geometry resamples a constant image,
    # so a flat grey image can only get brighter or darker.
    x = tf.fill([16, 12, 12, 3], 100.0)
    y = augmenter(1.0, 3)(x).numpy()
    np.testing.assert_allclose(y, y[:, :1, :1, :1] * np.ones_like(y), atol=1e-3)
    assert np.all(np.abs(y[:, 0, 0, 0] - 100.0) <= 0.3 * 255 + 1e-3)


def test_colour_jitter_is_one_affine_map_per_image():
    from vsearch_tf.data.pipeline import colour_jitter

    x = _pixels(4, 10, 12) * 0.4 + 75.0  # [75, 177]: nothing clips
    y = colour_jitter(x, tf.random.uniform([4, 4], seed=1), 0.5).numpy()
    for image, out in zip(x.numpy(), y):
        inputs = np.concatenate([image.reshape(-1, 3), np.ones((120, 1))], 1)
        fit = np.linalg.lstsq(inputs, out.reshape(-1, 3), rcond=None)[0]
        assert np.abs(inputs @ fit - out.reshape(-1, 3)).max() < 0.02
        assert np.abs(fit[:3] - np.eye(3)).max() > 0.01  # and not the identity
    # Brightness alone (contrast 1, saturation 1, no hue): + 0.3 * strength * 255.
    bright = colour_jitter(x, tf.constant([[1.0, 0.5, 0.5, 0.5]] * 4), 0.5)
    np.testing.assert_allclose(bright.numpy(), x.numpy() + 38.25, atol=1e-3)
