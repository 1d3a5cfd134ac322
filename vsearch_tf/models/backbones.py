"""Backbone registry: a name -> a feature extractor, its pixel normalisation, its weights.

Every backbone takes ``(size, size, 3)`` inputs and returns what its spec's ``output`` says: a
spatial feature map (the CNNs, any size; pooled by GeM or average), a token sequence (ViT,
DINOv2; pooled by the CLS token or the mean of the patch tokens; the size divisible by the
patch), or an already pooled embedding (the CLIP / SigLIP image towers, whose pooling and
projection are the pretrained joint image-text space's). Pooling and projection belong to the
embedder. ``weights`` is ``"imagenet"`` (downloaded by Keras
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
from vsearch_tf.models import convnext, transformers

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
    output: str = "map"  # map | tokens | pooled (see the module docstring)
    poolings: tuple[str, ...] = ("gem", "avg")  # model.pooling values that make sense
    patch_size: int | None = None  # image sizes must be multiples of it
    native_size: int | None = None  # the only size the pretrained weights fit (None: any)
    min_size: int | None = None  # smallest image size the architecture accepts
    prefix_tokens: int = 0  # tokens before the patch tokens (CLS, registers)
    text: bool = False  # has a text tower mapping into the same space (CLIP, SigLIP)
    preset: str | None = None  # the keras-hub preset behind weights: imagenet


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


def _transformer_specs() -> list[BackboneSpec]:
    """ViT, DINOv2, CLIP and SigLIP from :mod:`vsearch_tf.models.transformers`. Normalisation:
    the presets' image converters (ViT and SigLIP scale to [-1, 1]; DINOv2 ImageNet mean/std;
    CLIP its own mean/std); with ``weights: imagenet`` it is read from the preset itself."""
    modes = {"vit": "tf", "dinov2": "torch", "clip": "clip", "siglip": "tf"}
    specs = []
    for name, arch in transformers.ARCHS.items():
        tokens = arch.family in ("vit", "dinov2")
        specs.append(
            BackboneSpec(
                name,
                functools.partial(transformers.build_image_tower, name),
                modes[arch.family],
                "keras-hub" + (f" preset {arch.preset}" if arch.preset else " (architecture)"),
                output="tokens" if tokens else "pooled",
                poolings=("cls", "mean")
                if tokens
                else (("cls",) if arch.family == "clip" else ("map",)),
                patch_size=arch.vision.patch,
                native_size=arch.native_size,
                prefix_tokens=arch.prefix_tokens if tokens else 0,
                text=arch.text is not None,
                preset=arch.preset,
            )
        )
    return specs


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
        BackboneSpec(
            "xception", _applications(apps.Xception), "tf", "keras.applications", min_size=71
        ),
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
    specs.extend(_transformer_specs())
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


def check_backbone(
    name: str, image_size: int, pooling: str | None = None, weights: str = "imagenet"
) -> BackboneSpec:
    """Refuse, in one line naming the config key, a pooling the backbone's output has no use for
    or an image size it cannot take; returns the spec."""
    spec = get_spec(name)
    if pooling is not None and pooling not in spec.poolings:
        what = {
            "map": "a feature map",
            "tokens": "tokens",
            "pooled": "its pretrained pooled embedding",
        }[spec.output]
        raise VSearchError(
            f"config key model.pooling: backbone {name} outputs {what}, so pooling must be "
            f"{' or '.join(spec.poolings)}, got {pooling!r}"
        )
    if spec.patch_size and image_size % spec.patch_size:
        raise VSearchError(
            f"config key data.image_size: backbone {name} cuts {spec.patch_size} px patches, "
            f"so the size must be a multiple of {spec.patch_size}, got {image_size}"
        )
    if spec.native_size and weights == "imagenet" and image_size != spec.native_size:
        raise VSearchError(
            f"config key data.image_size: {name}'s pretrained position embeddings are for "
            f"{spec.native_size} px, got {image_size}"
        )
    if spec.min_size and image_size < spec.min_size:
        raise VSearchError(
            f"config key data.image_size: backbone {name} needs at least {spec.min_size} px, "
            f"got {image_size}"
        )
    return spec


def preset_normalization(spec: BackboneSpec) -> dict | None:
    """The keras-hub preset's own image converter as ``PixelNormalization`` arguments (its scale
    and offset), or None when the backbone has no preset or the preset has no converter."""
    if spec.preset is None:
        return None
    import keras_hub

    try:
        converter = keras_hub.layers.ImageConverter.from_preset(spec.preset)
    except ValueError:  # a preset without an image converter
        return None
    return {"mode": "affine", "scale": converter.scale, "offset": converter.offset}


def build_backbone(
    name: str, image_size: int, weights: str = "imagenet"
) -> tuple[keras.Model, str | dict]:
    """Build backbone ``name`` for square ``image_size`` inputs; returns it and its
    normalisation (a ``PixelNormalization`` mode, or its arguments when read from a preset)."""
    spec = check_backbone(name, image_size, weights=weights)
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
    if weights == "imagenet":
        return model, preset_normalization(spec) or spec.normalization
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
