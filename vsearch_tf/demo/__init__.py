"""A procedural, download-free product-retrieval dataset in the MCS2023 / Products-10K layout.

Why: the real datasets are large, licensed and need a network; tests, demos and smoke trainings
need data that is small, instant and reproducible. Every product is a procedural *design*
(silhouette + two colours + pattern + optional emblem). Products come in *families* that share a
silhouette and a hue, so near-duplicates exist and retrieval is not trivial. Each product gets one
clean catalogue ("seller") photo and a few "shopper" photos: the product scaled, rotated, re-lit,
sometimes blurred, pasted on a cluttered scene with distractor objects, with its bounding box.

Determinism: every image draws from its own ``numpy.random.Generator`` seeded by
``(seed, stream, index...)``; only numpy and PIL touch pixels, so the same seed and the same
Pillow/libjpeg give byte-identical files, and one image does not depend on how many came before.

Modules: ``products`` (designs and how to draw them), ``photos`` (a design as a catalogue or
shopper photo) and ``dataset`` (:func:`generate`, the files on disk).
"""

from vsearch_tf.demo.dataset import generate
from vsearch_tf.demo.photos import seller_photo, user_photo
from vsearch_tf.demo.products import (
    PATTERNS,
    SILHOUETTES,
    Design,
    random_design,
    render_product,
)

__all__ = [
    "Design",
    "SILHOUETTES",
    "PATTERNS",
    "random_design",
    "render_product",
    "seller_photo",
    "user_photo",
    "generate",
]
