"""Backbone registry: a name -> a feature-map model, its pixel normalisation, its weights.

Every backbone takes ``(size, size, 3)`` inputs of any size and returns a spatial feature map;
pooling and projection belong to the embedder. ``weights`` is ``"imagenet"`` (downloaded by Keras
or keras-hub on first use, so it needs the internet once), ``"none"`` (random init), or a path to
a ``.weights.h5`` / ``.h5`` file saved from the same architecture (offline machines).
"""

from __future__ import annotations

import difflib
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import keras

from vsearch_tf.errors import VSearchError, one_line
from vsearch_tf.models import convnext

Builder = Callable[[tuple[int, int, int], str | None], keras.Model]
WeightsLoader = Callable[[keras.Model, str], None]


def _load_weights(model: keras.Model, path: str) -> None:
    model.load_weights(path)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone: ``build(input_shape, weights)``, weights "imagenet" or None."""

    name: str
    build: Builder
    normalization: str  # a PixelNormalization mode
    source: str  # where the architecture and its ImageNet weights come from
    load_file: WeightsLoader = _load_weights  # loads a weights file into a built model


def _applications(factory: Callable[..., keras.Model], **extra) -> Builder:
    def build(input_shape, weights):
        return factory(include_top=False, weights=weights, input_shape=input_shape, **extra)

    return build


def _hub_resnet(blocks: list[int], preset: str | None) -> Builder:
    def build(input_shape, weights):
        import keras_hub  # imported lazily: it is slow to import and only these backbones need it

        if weights == "imagenet":
            if preset is None:
                raise VSearchError(
                    "backbone has no ImageNet preset in keras-hub; "
                    "use weights: none or a weights file"
                )
            return keras_hub.models.ResNetBackbone.from_preset(preset, image_shape=input_shape)
        return keras_hub.models.ResNetBackbone(
            input_conv_filters=[64],
            input_conv_kernel_sizes=[7],
            stackwise_num_filters=[64, 128, 256, 512],
            stackwise_num_blocks=blocks,
            stackwise_num_strides=[1, 2, 2, 2],
            block_type="basic_block",
            use_pre_activation=False,
            image_shape=input_shape,
        )

    return build


def _registry() -> dict[str, BackboneSpec]:
    apps = keras.applications
    specs = [
        BackboneSpec("mobilenet", _applications(apps.MobileNet), "tf", "keras.applications"),
        # Width 0.5 / 0.75: ~1/4 / ~1/2 the compute, for small models trained from scratch.
        BackboneSpec(
            "mobilenet_050", _applications(apps.MobileNet, alpha=0.5), "tf", "keras.applications"
        ),
        BackboneSpec(
            "mobilenet_075", _applications(apps.MobileNet, alpha=0.75), "tf", "keras.applications"
        ),
        BackboneSpec("mobilenet_v2", _applications(apps.MobileNetV2), "tf", "keras.applications"),
        BackboneSpec(
            "mobilenet_v3_small",
            _applications(apps.MobileNetV3Small, include_preprocessing=True),
            "none",
            "keras.applications",
        ),
        BackboneSpec(
            "mobilenet_v3_large",
            _applications(apps.MobileNetV3Large, include_preprocessing=True),
            "none",
            "keras.applications",
        ),
        BackboneSpec(
            "resnet18", _hub_resnet([2, 2, 2, 2], "resnet_18_imagenet"), "torch", "keras-hub"
        ),
        BackboneSpec("resnet34", _hub_resnet([3, 4, 6, 3], None), "torch", "keras-hub"),
        BackboneSpec("resnet50", _applications(apps.ResNet50), "caffe", "keras.applications"),
        BackboneSpec("resnet101", _applications(apps.ResNet101), "caffe", "keras.applications"),
        BackboneSpec("resnet152", _applications(apps.ResNet152), "caffe", "keras.applications"),
        BackboneSpec("resnet50_v2", _applications(apps.ResNet50V2), "tf", "keras.applications"),
    ]
    for i, factory in enumerate(
        [
            apps.EfficientNetB0,
            apps.EfficientNetB1,
            apps.EfficientNetB2,
            apps.EfficientNetB3,
            apps.EfficientNetB4,
            apps.EfficientNetB5,
            apps.EfficientNetB6,
            apps.EfficientNetB7,
        ]
    ):
        specs.append(
            BackboneSpec(f"efficientnet_b{i}", _applications(factory), "none", "keras.applications")
        )
    for suffix, factory in [
        ("b0", apps.EfficientNetV2B0),
        ("b1", apps.EfficientNetV2B1),
        ("b2", apps.EfficientNetV2B2),
        ("b3", apps.EfficientNetV2B3),
        ("s", apps.EfficientNetV2S),
        ("m", apps.EfficientNetV2M),
        ("l", apps.EfficientNetV2L),
    ]:
        specs.append(
            BackboneSpec(
                f"efficientnet_v2_{suffix}",
                _applications(factory, include_preprocessing=True),
                "none",
                "keras.applications",
            )
        )
    for size in convnext.VARIANTS:
        # DepthwiseConv2D build with keras.applications' weights (also their files); "_keras" is
        # Keras' own grouped-Conv2D build, several times slower on CPU, kept for comparison.
        specs.append(
            BackboneSpec(
                f"convnext_{size}",
                convnext.build(size),
                "none",
                "keras.applications weights, vsearch_tf.models.convnext",
                convnext.weights_loader(size),
            )
        )
        specs.append(
            BackboneSpec(
                f"convnext_{size}_keras",
                functools.partial(convnext.keras_convnext, size),
                "none",
                "keras.applications",
            )
        )
    return {spec.name: spec for spec in specs}


BACKBONES: dict[str, BackboneSpec] = _registry()


def get_spec(name: str) -> BackboneSpec:
    """Look a backbone up by name; an unknown name suggests the nearest ones."""
    try:
        return BACKBONES[name]
    except KeyError:
        near = difflib.get_close_matches(name, BACKBONES, n=3)
        hint = (
            f"; did you mean {', '.join(near)}?"
            if near
            else f"; known: {', '.join(sorted(BACKBONES))}"
        )
        raise VSearchError(f"unknown backbone {name!r}{hint}") from None


def build_backbone(
    name: str, image_size: int, weights: str = "imagenet"
) -> tuple[keras.Model, str]:
    """Build backbone ``name`` for square ``image_size`` inputs; returns it and its
    normalisation mode."""
    spec = get_spec(name)
    input_shape = (image_size, image_size, 3)
    if weights in ("imagenet", "none", None):
        model = spec.build(input_shape, "imagenet" if weights == "imagenet" else None)
    else:
        if not os.path.isfile(weights):
            raise VSearchError(
                f"weights file not found: {weights} "
                "(model.weights expects imagenet, none or a file)"
            )
        model = spec.build(input_shape, None)
        try:
            spec.load_file(model, weights)
        except Exception as err:  # Keras raises several types for a file of another architecture
            raise VSearchError(
                f"{weights}: does not fit backbone {name!r} ({one_line(err)})"
            ) from None
    return model, spec.normalization


def set_bn_momentum(model: keras.Model, momentum: float | None) -> None:
    """Override every BatchNorm momentum of ``model`` (``None`` keeps them): Keras' 0.99 leaves
    the moving statistics of a network trained from scratch for a few hundred steps far from the
    weights'."""
    if momentum is None:
        return
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum
