#!/usr/bin/env python
"""Export size and per-image CPU latency of the TF Serving signatures for a realistic model.

Builds MobileNet at 224 px with a 512-d embedding (random weights unless --weights; latency does
not depend on them), exports it with ``vsearch_tf.export.export_run``, loads the SavedModel with
``tf.saved_model.load`` and times ``serving_default`` on 640 x 480 JPEGs (decode, crop, resize
in the graph), with and without a box, and ``serve_pixels``, at batch 1 and 32.

Example:
    .venv/bin/python tools/bench_serving.py \
        --weights /work/shared/weights/mobilenet_v1_1.0_imagenet_notop.weights.h5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
import yaml

from vsearch_tf.export import export_run
from vsearch_tf.models.embedder import build_embedder


def photos(n: int, seed: int = 0) -> list[bytes]:
    """Distinct 640 x 480 JPEGs with texture, so decoding costs what a phone photo costs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:480, 0:640].astype(np.float32)
    out = []
    for _ in range(n):
        f = rng.uniform(10, 40, 3)
        image = np.stack(
            [
                127 + 100 * np.sin(xx / f[0] + yy / f[1]),
                xx / 2.5,
                yy / 1.9 + 40 * np.cos(xx / f[2]),
            ],
            -1,
        )
        image += rng.normal(0, 12, image.shape)
        out.append(tf.io.encode_jpeg(np.clip(image, 0, 255).astype(np.uint8), quality=90).numpy())
    return out


def timed(fn, repeats: int) -> float:
    """Median wall seconds of ``fn()`` after two warm-up calls."""
    fn(), fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--weights", default="none", help='"none", "imagenet" or a .weights.h5 backbone file'
    )
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--dim", type=int, default=512, help="embedding size")
    parser.add_argument(
        "--repeats", type=int, default=10, help="timed calls per row (median reported)"
    )
    parser.add_argument(
        "--out", type=Path, help="keep the export here (default: a temporary folder)"
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        run = Path(tmp, "run")
        run.mkdir()
        embedder = build_embedder(
            "mobilenet", args.image_size, embedding_dim=args.dim, weights=args.weights
        )
        embedder.save(run / "embedder.keras")
        (run / "config.yml").write_text(yaml.safe_dump({"model": {"backbone": "mobilenet"}}))
        start = time.perf_counter()
        version = export_run(run, "bench", root=args.out or Path(tmp, "saved_models"))
        export_seconds = time.perf_counter() - start

        model = tf.saved_model.load(str(version))
        serve_bytes, serve_pixels = (
            model.signatures["serving_default"],
            model.signatures["serve_pixels"],
        )
        images = photos(32)
        rows = []
        for batch in (1, 32):
            data = tf.constant(images[:batch])
            whole = tf.constant([[-1.0] * 4] * batch)
            box = tf.constant([[160.0, 120.0, 320.0, 240.0]] * batch)
            pixels = tf.random.uniform([batch, args.image_size, args.image_size, 3], 0, 255, seed=0)
            for label, call in [
                (
                    "serving_default, JPEG 640x480",
                    lambda: serve_bytes(image_bytes=data, bbox=whole),
                ),
                (
                    "serving_default, JPEG + bbox 320x240",
                    lambda: serve_bytes(image_bytes=data, bbox=box),
                ),
                ("serve_pixels (decoded, resized)", lambda: serve_pixels(pixels=pixels)),
            ]:
                seconds = timed(call, args.repeats)
                rows.append((label, batch, 1000 * seconds, 1000 * seconds / batch, batch / seconds))

        print(
            f"model: MobileNet {args.image_size}px, embedding {args.dim}, weights {args.weights}; "
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; TF {tf.__version__}"
        )
        print(
            f"export: {export_seconds:.1f} s, {folder_bytes(version) / 1e6:.1f} MB total "
            f"(variables {folder_bytes(version / 'variables') / 1e6:.1f} MB, "
            f"saved_model.pb {(version / 'saved_model.pb').stat().st_size / 1e6:.2f} MB)"
        )
        print(f"\n| {'signature, input':38} | batch | ms / call | ms / image | images / s |")
        print(f"|{'-' * 40}|------:|----------:|-----------:|-----------:|")
        for label, batch, per_call, per_image, rate in rows:
            print(
                f"| {label:38} | {batch:5d} | {per_call:9.1f} | {per_image:10.2f} | {rate:10.1f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
