"""The embedder: pixels -> backbone -> pooling -> projection -> L2-normalised embedding.

It takes float32 RGB pixels in [0, 255] (the output of :mod:`vsearch_tf.data.images`) and owns
its normalisation, so the exported SavedModel needs nothing but the embedder's own layers.
"""

from __future__ import annotations

import keras

from vsearch_tf.models.backbones import build_backbone, check_backbone, set_bn_momentum
from vsearch_tf.models.layers import GeMPooling, L2Normalize, TokenPooling, pixel_normalization


def build_embedder(
    backbone: str,
    image_size: int,
    embedding_dim: int = 512,
    pooling: str = "gem",
    weights: str = "imagenet",
    dropout: float = 0.0,
    bn_momentum: float | None = None,
) -> keras.Model:
    """Build the embedding model.

    ``embedding_dim=0`` skips the projection, so the embedding is the pooled backbone feature
    (the honest "no training" baseline for a pretrained backbone). The projection is followed by
    BatchNorm, as in the MCS2023 and GUIE solutions: it centres the features before the norm.
    ``bn_momentum`` overrides every BatchNorm momentum (backbone and projection): Keras' 0.99
    leaves the moving statistics of a network trained from scratch for a few hundred steps far
    from the weights'.

    ``pooling`` follows the backbone's output (:func:`~vsearch_tf.models.backbones.check_backbone`
    refuses the others): ``gem`` / ``avg`` for feature maps, ``cls`` / ``mean`` for tokens, and
    for CLIP (``cls``) and SigLIP (``map``) the pooling inside their pretrained image tower, whose
    output with ``embedding_dim=0`` is the joint image-text space.
    """
    spec = check_backbone(backbone, image_size, pooling, weights)
    features, normalization = build_backbone(backbone, image_size, weights)
    set_bn_momentum(features, bn_momentum)
    pixels = keras.Input((image_size, image_size, 3), name="pixels", dtype="float32")
    x = pixel_normalization(normalization)(pixels)
    x = features({"images": x} if isinstance(features.input, dict) else x)
    if spec.output == "tokens":
        x = TokenPooling(pooling, spec.prefix_tokens, name=f"{pooling}_pool")(x)
    elif spec.output == "map":
        x = (
            GeMPooling(name="gem")(x)
            if pooling == "gem"
            else keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        )
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    if embedding_dim > 0:
        x = keras.layers.Dense(embedding_dim, use_bias=False, name="projection")(x)
        x = keras.layers.BatchNormalization(
            momentum=0.99 if bn_momentum is None else bn_momentum,
            name="projection_bn",
            dtype="float32",
        )(x)
    embedding = L2Normalize(name="embedding")(x)
    model = keras.Model(pixels, embedding, name="embedder")
    return model


def backbone_of(embedder: keras.Model) -> keras.Model:
    """The backbone sub-model of an embedder built by :func:`build_embedder` (for freezing and
    separate learning rates)."""
    return next(layer for layer in embedder.layers if isinstance(layer, keras.Model))
