"""Transformer image towers from keras-hub: ViT, DINOv2, and the image and text towers of CLIP and
SigLIP, built from a preset (``weights: imagenet``, needs the internet once) or from the
architecture alone (``weights: none``).

The architectures are written out here (the preset files hold only names and descriptions), so
``weights: none`` builds the same network as the preset at any image size divisible by the patch.
The ``*_test_tiny`` variants exist only as architectures: tests build them in seconds.

A ViT or DINOv2 returns its token sequence ``[batch, 1 (+ registers) + patches, hidden]``; the
embedder pools it (CLS token or mean of the patch tokens). A CLIP or SigLIP image tower returns
the joint image-text embedding (CLIP: the CLS token through the pretrained vision projection;
SigLIP: its attention-pooling head), so the same model's text tower maps into the same space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras

from vsearch_tf.errors import VSearchError
from vsearch_tf.models.layers import L2Normalize, TokenPooling


@dataclass(frozen=True)
class Tower:
    """One transformer encoder: patch (vision only), depth, heads, width, MLP width."""

    layers: int
    heads: int
    hidden: int
    mlp: int
    patch: int = 0


@dataclass(frozen=True)
class TextTower:
    vocabulary: int
    layers: int
    heads: int
    hidden: int
    mlp: int
    sequence_length: int


@dataclass(frozen=True)
class Arch:
    family: str  # vit | dinov2 | clip | siglip
    vision: Tower
    preset: str | None = None  # keras-hub preset name (None: an architecture only)
    native_size: int | None = None  # pretrained position embeddings' image size (None: any)
    text: TextTower | None = None
    projection: int = 0  # CLIP's joint-space width
    registers: int = 0  # DINOv2 register tokens

    @property
    def prefix_tokens(self) -> int:
        """Tokens before the patch tokens: the CLS token and any registers."""
        return 1 + self.registers


_B16 = Tower(12, 12, 768, 3072, 16)
_L16 = Tower(24, 16, 1024, 4096, 16)
_TINY = Tower(2, 2, 32, 64, 8)
_CLIP_TEXT_B = TextTower(49408, 12, 8, 512, 2048, 77)
_CLIP_TEXT_L = TextTower(49408, 12, 12, 768, 3072, 77)
_SIGLIP_TEXT_B = TextTower(32000, 12, 12, 768, 3072, 64)
_TINY_TEXT = TextTower(64, 2, 2, 32, 64, 16)

ARCHS: dict[str, Arch] = {
    "vit_base_patch16_224": Arch("vit", _B16, "vit_base_patch16_224_imagenet", 224),
    "vit_base_patch16_384": Arch("vit", _B16, "vit_base_patch16_384_imagenet", 384),
    "vit_base_patch32_384": Arch(
        "vit", Tower(12, 12, 768, 3072, 32), "vit_base_patch32_384_imagenet", 384
    ),
    "vit_large_patch16_224": Arch("vit", _L16, "vit_large_patch16_224_imagenet", 224),
    "vit_test_tiny": Arch("vit", _TINY),
    "dinov2_small": Arch("dinov2", Tower(12, 6, 384, 1536, 14), "dinov2_small"),
    "dinov2_base": Arch("dinov2", Tower(12, 12, 768, 3072, 14), "dinov2_base"),
    "dinov2_large": Arch("dinov2", Tower(24, 16, 1024, 4096, 14), "dinov2_large"),
    "dinov2_test_tiny": Arch("dinov2", _TINY),
    "clip_vit_base_patch16": Arch(
        "clip", _B16, "clip_vit_base_patch16", 224, _CLIP_TEXT_B, projection=512
    ),
    "clip_vit_base_patch32": Arch(
        "clip",
        Tower(12, 12, 768, 3072, 32),
        "clip_vit_base_patch32",
        224,
        _CLIP_TEXT_B,
        projection=512,
    ),
    "clip_vit_large_patch14": Arch(
        "clip",
        Tower(24, 16, 1024, 4096, 14),
        "clip_vit_large_patch14",
        224,
        _CLIP_TEXT_L,
        projection=768,
    ),
    "clip_test_tiny": Arch("clip", _TINY, text=_TINY_TEXT, projection=24),
    "siglip_base_patch16_224": Arch("siglip", _B16, "siglip_base_patch16_224", 224, _SIGLIP_TEXT_B),
    "siglip_base_patch16_256": Arch("siglip", _B16, "siglip_base_patch16_256", 256, _SIGLIP_TEXT_B),
    "siglip_test_tiny": Arch("siglip", _TINY, text=_TINY_TEXT),
}


def _hub():
    import keras_hub  # imported lazily: slow to import, and only these backbones need it

    return keras_hub


def _check_preset(name: str, arch: Arch) -> str:
    if arch.preset is None:
        raise VSearchError(
            f"backbone {name!r} is an architecture only (no keras-hub preset); "
            "use weights: none or a weights file"
        )
    return arch.preset


def _joint(name: str, arch: Arch, image_size: int, weights: str | None):
    """The whole keras-hub CLIP or SigLIP model (image and text towers)."""
    hub = _hub()
    cls = hub.models.CLIPBackbone if arch.family == "clip" else hub.models.SigLIPBackbone
    if weights == "imagenet":
        return cls.from_preset(_check_preset(name, arch))
    return _joint_architecture(arch, image_size, arch.text.vocabulary)


def _joint_architecture(arch: Arch, image_size: int, vocabulary: int):
    """CLIP's or SigLIP's architecture, random weights: the two families share their encoders'
    arguments (the vision one is :func:`_vision_encoder`'s) and differ in class names and CLIP's
    projection."""
    hub = _hub()
    t = arch.text
    prefix = "CLIP" if arch.family == "clip" else "SigLIP"
    vision = _vision_encoder(arch, (image_size, image_size, 3))
    text = getattr(hub.models, f"{prefix}TextEncoder")(
        vocabulary_size=vocabulary,
        embedding_dim=t.hidden,
        hidden_dim=t.hidden,
        num_layers=t.layers,
        num_heads=t.heads,
        intermediate_dim=t.mlp,
        max_sequence_length=t.sequence_length,
    )
    if arch.family == "clip":
        return hub.models.CLIPBackbone(vision, text, projection_dim=arch.projection)
    return hub.models.SigLIPBackbone(vision, text)


def _clip_image_tower(encoder, projection_dim: int, name: str, pretrained=None) -> keras.Model:
    """CLIP's image embedding as one serialisable model: vision encoder, CLS token, the vision
    projection (a plain Dense; ``pretrained``'s weights copied into it)."""
    images = keras.Input(encoder.image_shape, name="images")
    tokens = encoder({"images": images})
    pooled = TokenPooling("cls", name="cls_token")(tokens)
    projection = keras.layers.Dense(projection_dim, use_bias=False, name="vision_projection")
    out = projection(pooled)
    if pretrained is not None:
        projection.set_weights(pretrained.get_weights())
    return keras.Model(images, out, name=name)


def _vision_encoder(arch: Arch, input_shape):
    hub = _hub()
    v = arch.vision
    cls = hub.models.CLIPVisionEncoder if arch.family == "clip" else hub.models.SigLIPVisionEncoder
    return cls(
        patch_size=v.patch,
        hidden_dim=v.hidden,
        num_layers=v.layers,
        num_heads=v.heads,
        intermediate_dim=v.mlp,
        image_shape=input_shape,
    )


def build_image_tower(name: str, input_shape: tuple[int, int, int], weights: str | None):
    """Backbone ``name`` (a key of :data:`ARCHS`): tokens for ViT / DINOv2, the joint embedding
    for CLIP / SigLIP. ``weights`` is "imagenet" (the preset) or None (random)."""
    arch = ARCHS[name]
    hub = _hub()
    size = input_shape[0]
    v = arch.vision
    if arch.family == "vit":
        if weights == "imagenet":
            return hub.models.ViTBackbone.from_preset(
                _check_preset(name, arch), image_shape=input_shape
            )
        return hub.models.ViTBackbone(
            image_shape=input_shape,
            patch_size=v.patch,
            num_layers=v.layers,
            num_heads=v.heads,
            hidden_dim=v.hidden,
            mlp_dim=v.mlp,
        )
    if arch.family == "dinov2":
        if weights == "imagenet":
            # DINOv2 interpolates its position embeddings: any size divisible by 14.
            return hub.models.DINOV2Backbone.from_preset(
                _check_preset(name, arch), image_shape=input_shape
            )
        return hub.models.DINOV2Backbone(
            patch_size=v.patch,
            num_layers=v.layers,
            hidden_dim=v.hidden,
            num_heads=v.heads,
            intermediate_dim=v.mlp,
            image_shape=input_shape,
            position_embedding_shape=(518, 518, 3) if arch.preset else input_shape,
        )
    if weights == "imagenet":
        joint = _joint(name, arch, size, weights)
        if arch.family == "clip":
            return _clip_image_tower(
                joint.vision_encoder, arch.projection, name, joint.vision_projection
            )
        return joint.vision_encoder
    encoder = _vision_encoder(arch, input_shape)  # the image tower only: no text weights
    if arch.family == "clip":
        return _clip_image_tower(encoder, arch.projection, name)
    return encoder


@dataclass
class TextEncoder:
    """Strings -> L2-normalised embeddings in the image tower's joint space: the preset's
    preprocessor (lower-casing, tokenizer, start/end/padding to its sequence length) and the
    text tower with its projection. Every TensorFlow op, so it traces into a SavedModel."""

    preprocessor: Any  # a keras-hub CLIPPreprocessor / SigLIPPreprocessor
    model: keras.Model  # token_ids -> embedding
    sequence_length: int

    def __call__(self, text):
        ids = self.preprocessor({"images": None, "prompts": text})["token_ids"]
        return self.model(ids, training=False)


def _local_tokenizer(family: str, folder: str):
    """A tokenizer from a folder: CLIP ``vocabulary.json`` + ``merges.txt`` (BPE), SigLIP
    ``vocabulary.spm`` (SentencePiece), as keras-hub's presets store them in
    ``assets/tokenizer/``."""
    import os

    hub = _hub()
    if family == "clip":
        vocabulary = os.path.join(folder, "vocabulary.json")
        merges = os.path.join(folder, "merges.txt")
        if not (os.path.isfile(vocabulary) and os.path.isfile(merges)):
            raise VSearchError(
                f"config key model.text_tokenizer: {folder} needs vocabulary.json and merges.txt"
            )
        return hub.models.CLIPTokenizer(
            vocabulary=vocabulary, merges=merges, pad_with_end_token=True
        )
    proto = os.path.join(folder, "vocabulary.spm")
    if not os.path.isfile(proto):
        raise VSearchError(f"config key model.text_tokenizer: {folder} needs vocabulary.spm")
    return hub.models.SigLIPTokenizer(proto=proto)


def build_text_encoder(
    name: str, image_size: int, weights: str | None, tokenizer: str | None = None
) -> TextEncoder:
    """The text tower of CLIP / SigLIP backbone ``name``: from the preset (``weights:
    imagenet``: the same pretrained model the image tower came from) or, with ``weights: none``,
    a random tower over the tokenizer in folder ``tokenizer`` (tests: plumbing only)."""
    arch = ARCHS[name]
    if arch.text is None:
        raise VSearchError(f"backbone {name!r} has no text tower (CLIP and SigLIP have one)")
    hub = _hub()
    pre_cls = (
        hub.models.CLIPPreprocessor if arch.family == "clip" else hub.models.SigLIPPreprocessor
    )
    if weights == "imagenet":
        joint = _joint(name, arch, image_size, "imagenet")
        preprocessor = (
            pre_cls(
                _local_tokenizer(arch.family, tokenizer), sequence_length=arch.text.sequence_length
            )
            if tokenizer
            else pre_cls.from_preset(arch.preset)
        )
    else:
        if not tokenizer:
            raise VSearchError(
                "config key model.text_tokenizer: weights: none has no preset tokenizer; "
                "give a folder with the tokenizer's files"
            )
        tok = _local_tokenizer(arch.family, tokenizer)
        joint = _joint_architecture(arch, image_size, tok.vocabulary_size())
        preprocessor = pre_cls(tok, sequence_length=arch.text.sequence_length)
    ids = keras.Input((None,), dtype="int32", name="token_ids")
    embedding = L2Normalize(name="text_embedding")(joint.get_text_embeddings(ids))
    model = keras.Model(ids, embedding, name="text_encoder")
    return TextEncoder(preprocessor, model, int(preprocessor.sequence_length))
