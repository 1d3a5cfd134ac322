"""ConvNeXt with DepthwiseConv2D: same outputs and weight files as keras.applications' ConvNeXt."""

from __future__ import annotations

import h5py
import keras
import numpy as np
import pytest
from keras.src.legacy.saving import legacy_h5_format

from vsearch_tf.errors import VSearchError
from vsearch_tf.models.backbones import build_backbone
from vsearch_tf.models.convnext import convnext, copy_keras_weights

SIZE = 32  # the smallest input keras.applications' ConvNeXt accepts: builds stay quick


def _grouped_convs(model: keras.Model) -> int:
    return sum(getattr(layer, "groups", 1) > 1 for layer in model.layers)


@pytest.fixture(scope="module")
def reference() -> keras.Model:
    """The registry's Keras build of ConvNeXtTiny with random weights, layer scales drawn away
    from their 1e-6 init so that the residual branches matter in the comparisons."""
    keras.utils.set_random_seed(0)
    model, _ = build_backbone("convnext_tiny_keras", SIZE, weights="none")
    rng = np.random.default_rng(0)
    for v in model.weights:
        if "layer_scale" in v.path:
            v.assign(rng.uniform(0.5, 1.5, v.shape).astype("float32"))
    return model


@pytest.fixture(scope="module")
def fast(reference) -> keras.Model:
    model = convnext("tiny", (SIZE, SIZE, 3))
    copy_keras_weights(reference, model)
    return model


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(1).uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def expected(reference, pixels) -> np.ndarray:
    return reference(pixels).numpy()


def _max_diff(model: keras.Model, pixels: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(model(pixels).numpy() - expected).max())


def test_copied_weights_give_keras_outputs(reference, fast, pixels, expected):
    assert _grouped_convs(reference) == 18
    assert _max_diff(fast, pixels, expected) < 1e-5


@pytest.mark.parametrize("kind", ["keras_weights_h5", "keras_legacy_h5", "own_weights_h5"])
def test_registry_build_uses_depthwise_conv_and_loads_either_file(
    reference, fast, pixels, expected, tmp_path, kind
):
    path = tmp_path / ("w.h5" if kind == "keras_legacy_h5" else "w.weights.h5")
    if kind == "keras_weights_h5":
        reference.save_weights(path)
    elif kind == "keras_legacy_h5":  # the layout of Keras' ImageNet downloads
        with h5py.File(path, "w") as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, reference)
    else:
        fast.save_weights(path)
    model, mode = build_backbone("convnext_tiny", SIZE, weights=str(path))
    assert mode == "none"  # the model normalises its own [0, 255] input, as Keras' does
    assert sum(isinstance(layer, keras.layers.DepthwiseConv2D) for layer in model.layers) == 18
    assert _grouped_convs(model) == 0
    assert _max_diff(model, pixels, expected) < 1e-5


def test_a_file_of_another_architecture_is_refused(tmp_path):
    # Has a grouped 7x7 kernel, so it takes the keras.applications path, and must fail there.
    other = keras.Sequential([keras.Input((8, 8, 4)), keras.layers.Conv2D(4, 7, groups=4)])
    other.save_weights(tmp_path / "o.weights.h5")
    with pytest.raises(VSearchError, match="does not fit backbone 'convnext_tiny'"):
        build_backbone("convnext_tiny", SIZE, weights=str(tmp_path / "o.weights.h5"))


def test_stochastic_depth_only_acts_in_training(fast, pixels, expected):
    dropping = convnext("tiny", (SIZE, SIZE, 3), drop_path_rate=0.9)
    dropping.set_weights(fast.get_weights())
    assert _max_diff(dropping, pixels, expected) < 1e-5
    assert np.abs(dropping(pixels, training=True).numpy() - expected).max() > 1e-3


def test_saved_model_file_round_trips(fast, pixels, expected, tmp_path):
    # Only keras.* classes: load_model finds them without this package being imported.
    assert all(type(layer).__module__.startswith("keras.") for layer in fast.layers)
    fast.save(tmp_path / "c.keras")
    assert _max_diff(keras.saving.load_model(tmp_path / "c.keras"), pixels, expected) < 1e-5
