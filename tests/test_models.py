"""Backbone registry, embedder layers and config validation."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from vsearch_tf.config import load_config
from vsearch_tf.errors import VSearchError
from vsearch_tf.models.backbones import BACKBONES, build_backbone
from vsearch_tf.models.embedder import build_embedder
from vsearch_tf.models.layers import GeMPooling, PixelNormalization


@pytest.mark.parametrize("name", ["mobilenet", "resnet18", "efficientnet_b0", "convnext_tiny"])
def test_registry_builds_feature_maps_at_any_size(name):
    model, mode = build_backbone(name, 64, weights="none")
    out = model(np.zeros((1, 64, 64, 3), np.float32))
    assert len(out.shape) == 4 and mode in PixelNormalization.MODES


def test_registry_covers_the_families():
    for name in [
        "resnet18",
        "resnet34",
        "resnet50",
        "efficientnet_b0",
        "efficientnet_b7",
        "convnext_tiny",
        "convnext_base",
        "mobilenet",
        "mobilenet_050",
    ]:
        assert name in BACKBONES


def test_unknown_backbone_suggests_the_nearest():
    with pytest.raises(VSearchError, match="did you mean resnet50"):
        build_backbone("resnet5O", 64)


def test_weights_file_round_trip_and_wrong_file(tmp_path):
    model, _ = build_backbone("mobilenet", 32, weights="none")
    path = tmp_path / "mobilenet.weights.h5"
    model.save_weights(path)
    loaded, _ = build_backbone("mobilenet", 48, weights=str(path))  # same weights, other input size
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    with pytest.raises(VSearchError, match="does not fit backbone"):
        build_backbone("efficientnet_b0", 32, weights=str(path))
    with pytest.raises(VSearchError, match="weights file not found"):
        build_backbone("mobilenet", 32, weights=str(tmp_path / "nope.h5"))


def test_embedder_is_unit_norm_and_serialisable(tmp_path):
    embedder = build_embedder("mobilenet", 32, embedding_dim=16, pooling="gem", weights="none")
    x = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    y = embedder(x).numpy()
    assert y.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)
    embedder.save(tmp_path / "e.keras")
    again = keras.saving.load_model(tmp_path / "e.keras")
    np.testing.assert_allclose(again(x).numpy(), y, atol=1e-6)


def test_bn_momentum_zero_reaches_every_batchnorm():
    """0 is a momentum (the moving statistics are the last batch's), not "unset"."""
    embedder = build_embedder("mobilenet", 32, embedding_dim=8, weights="none", bn_momentum=0.0)
    momenta = {
        layer.momentum
        for layer in embedder._flatten_layers()
        if isinstance(layer, keras.layers.BatchNormalization)
    }
    assert momenta == {0.0}


def test_gem_with_p1_is_average_pooling():
    x = np.random.default_rng(1).uniform(0.1, 2.0, (2, 4, 4, 5)).astype(np.float32)
    gem = GeMPooling(p=1.0)
    np.testing.assert_allclose(gem(x).numpy(), x.mean(axis=(1, 2)), rtol=1e-5)
    gem3 = GeMPooling(p=3.0)
    np.testing.assert_allclose(gem3(x).numpy(), np.cbrt((x**3).mean(axis=(1, 2))), rtol=1e-5)


def test_pixel_normalization_modes_match_keras_applications():
    x = np.random.default_rng(2).uniform(0, 255, (2, 4, 4, 3)).astype(np.float32)
    np.testing.assert_allclose(
        PixelNormalization("tf")(x).numpy(),
        keras.applications.mobilenet.preprocess_input(x.copy()),
        atol=1e-5,
    )
    np.testing.assert_allclose(
        PixelNormalization("caffe")(x).numpy(),
        keras.applications.resnet50.preprocess_input(x.copy()),
        atol=1e-4,
    )


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("model:\n  backbone: mobilenet\ntrain:\n  lr: 0.01\n")
    cfg = load_config(
        path, ["train.lr=3e-4", "data.val_gallery_csv=g.csv", "data.val_queries_csv=q.csv"]
    )
    assert cfg.model.backbone == "mobilenet" and cfg.train.lr == pytest.approx(3e-4)


@pytest.mark.parametrize(
    "text, message",
    [
        ("trian:\n  lr: 1\n", "unknown config key 'trian'; did you mean 'train'?"),
        (
            "data:\n  image_szie: 3\n",
            "unknown config key 'data.image_szie'; did you mean 'data.image_size'?",
        ),
        ("data:\n  batch_size: 0\n", "data.batch_size: must be > 0"),
        ("train:\n  lr: -1\n", "train.lr: must be > 0"),
        ("data:\n  batch_size: many\n", "data.batch_size: expected int"),
        ("head:\n  type: cosface\n", "head.type: 'cosface' is not one of"),
        ("run:\n  init_from: /no/such/run\n", "run.init_from: /no/such/run is not a finished run"),
        ("data:\n  val_gallery_csv: g.csv\n", "give both or neither"),
        ("- a\n- b\n", "expected a mapping"),
    ],
)
def test_config_errors_name_the_key(tmp_path, text, message):
    path = tmp_path / "c.yml"
    path.write_text(text)
    with pytest.raises(VSearchError) as err:
        load_config(path)
    assert message in str(err.value)
