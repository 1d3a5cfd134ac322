#!/usr/bin/env python
"""Images/s of embedding and training: the model alone vs fed by the real input pipeline.

For each backbone and each step (embedding = the indexing loop of ``vsearch_tf.inference``;
training = ``RetrievalModel.train_step`` with the ArcFace head, through Keras' own
``train_function``, as ``fit`` runs it) it measures:

  (a) model alone     the step fed one in-memory batch over and over: no file, no decoding.
  (b) full pipeline   the same step fed by vsearch's tf.data pipeline from JPEG files on disk:
                      read, decode only the box (decode_and_crop_jpeg; at 1/2-1/8 DCT scale
                      when the box is over twice the input size), alias-free resize;
                      for training also shuffle, box jitter and augmentation; parallel map,
                      deterministic=False, prefetch (``vsearch_tf.data.pipeline``). With
                      ``--cache`` from decoded crops cached by a first pass instead.
  b/a                 1.00 = the input pipeline costs the model nothing. On a CPU-only machine the
                      pipeline runs on the same cores as the model, so 1 - b/a is the share of the
                      machine that decoding and augmentation take from the model. Median over
                      rounds; "b/a rounds" is the range.
  cpu-ms/img          process CPU time (all threads) per image; "cpu a/b" is the b/a that a
                      machine kept busy by this process would see: the robust figure when other
                      processes share the cores and the wall-clock ratio swings with their load.
  pipeline alone      the pipeline iterated with no model (all cores): it must exceed (a).
                      In rounds, alternating: embedding and training from the photos,
                      training from prepared shards (``vsearch prepare``: crops decoded once,
                      jitter, zoom, flip and colour at train time), stored as JPEG (mode
                      ``prepared-jpeg``) and as raw pixels (``prepared-raw``), and
                      the reference of decoding a JPEG, cropping its box and resizing it with
                      nothing else (PIL with libjpeg-turbo, one thread; and tf.io.decode_jpeg +
                      slice + resize in tf.data). "per core" is 1000 / cpu-ms.

(a) and (b) alternate in rounds, each with a fresh pipeline and its own warm-up. ``--precision``
and ``--jit`` add model-alone rows per dtype policy and XLA setting; ``*_keras`` backbones (e.g.
``convnext_tiny_keras``, Keras' grouped-Conv2D ConvNeXt) are measured model-alone and compared
with vsearch's DepthwiseConv2D build; ``--memory`` checks that the memory of gallery embedding
does not grow with the gallery.

Example (2-core CPU, about 20 minutes):
  nice -n 10 python tools/bench_throughput.py --batch 16 --warmup 1 --steps 3 --rounds 2
Training speed of the transformer families next to the CNNs, model alone (README's table):
  nice -n 10 python tools/bench_throughput.py --no-pipeline --modes train --batch 8 \
    --warmup 1 --steps 2 --rounds 1 --backbones mobilenet,convnext_tiny,xception,\
vit_base_patch16_224,dinov2_small,clip_vit_base_patch16,siglip_base_patch16_224
The input pipelines alone against the reference (a few minutes):
  python tools/bench_throughput.py --pipeline-only --rounds 3
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_BACKBONES = "mobilenet,efficientnet_b0,resnet50,convnext_tiny,convnext_tiny_keras"


# --- data -------------------------------------------------------------------------------------


def write_photos(
    folder: Path, n: int, width: int, height: int, seed: int = 0
) -> tuple[list[str], np.ndarray]:
    """``n`` photo-like JPEGs (smooth colour fields + sensor noise, quality 90, about the entropy
    and file size of a phone photo of that size) and one product box per photo (x, y, w, h)."""
    rng = np.random.default_rng(seed)
    paths, boxes = [], []
    for i in range(n):
        field = rng.uniform(0, 255, (max(height // 16, 1), max(width // 16, 1), 3)).astype(np.uint8)
        image = np.asarray(
            Image.fromarray(field).resize((width, height), Image.BICUBIC), np.float32
        )
        image += rng.normal(0.0, 12.0, image.shape)
        w, h = (
            int(rng.integers(width // 4, width * 3 // 4)),
            int(rng.integers(height // 4, height * 3 // 4)),
        )
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        path = folder / f"{i:06d}.jpg"
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
        boxes.append((x, y, w, h))
    return paths, np.asarray(boxes, np.float32)


def write_training_csv(
    folder: Path, paths: list[str], boxes: np.ndarray, images_per_product: int = 4
) -> Path:
    """A training csv of the photos (``images_per_product`` per product), for ``vsearch prepare``
    and the raw pipeline alike."""
    import pandas as pd

    frame = pd.DataFrame(
        {
            "img_path": [os.path.relpath(p, folder) for p in paths],
            "product_id": [f"p{i // images_per_product:05d}" for i in range(len(paths))],
        }
    )
    frame[["bbox_x", "bbox_y", "bbox_w", "bbox_h"]] = boxes
    frame.to_csv(folder / "train.csv", index=False)
    return folder / "train.csv"


def prepare_shards(csv: Path, image_size: int, encoding: str) -> str:
    """``vsearch prepare`` of the csv into a folder beside it; returns the folder."""
    from vsearch_tf.config import load_config
    from vsearch_tf.data.prepared import prepare

    out = str(csv.parent / f"prepared-{encoding}")
    overrides = [f"data.root={csv.parent}", f"data.train_csv={csv.name}"]
    overrides += [f"data.prepared_encoding={encoding}", f"data.prepared={out}"]
    prepare(load_config(None, overrides + [f"data.image_size={image_size}"]))
    return out


def record_kb(folder: str) -> float:
    """Mean bytes of a prepared record (shard bytes / images), in KB."""
    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    total = sum((Path(folder) / f["file"]).stat().st_size for f in manifest["files"])
    return total / manifest["count"] / 1000


def image_table(folder: Path, paths: list[str], boxes: np.ndarray, images_per_product: int = 4):
    from vsearch_tf.data.tables import ImageTable

    products = np.array([f"p{i // images_per_product:05d}" for i in range(len(paths))])
    return ImageTable(
        folder, np.array([f"u{i:06d}" for i in range(len(paths))]), np.array(paths), products, boxes
    )


# --- timing -----------------------------------------------------------------------------------


@dataclass
class Timing:
    images_per_s: float
    cpu_ms_per_image: float  # process CPU time (all threads) per image


def timed(step: Callable[[], None], batch: int, warmup: int, steps: int) -> Timing:
    """Run ``warmup`` untimed then ``steps`` timed calls of ``step`` (each one batch)."""
    for _ in range(warmup):
        step()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return Timing(steps * batch / wall, 1000.0 * cpu / (steps * batch))


def median_timing(timings: list[Timing]) -> Timing:
    return Timing(
        statistics.median(t.images_per_s for t in timings),
        statistics.median(t.cpu_ms_per_image for t in timings),
    )


# --- models and steps -------------------------------------------------------------------------


@dataclass
class Workload:
    """One backbone under one dtype policy / XLA setting: an embedding and a training step, each
    taking an iterator over batches."""

    embed: Callable[[Iterator], None]
    train: Callable[[Iterator], None]


def build_workload(
    backbone: str, image_size: int, num_classes: int, precision: str, jit: bool
) -> Workload:
    import keras
    import tensorflow as tf

    from vsearch_tf.config import HeadConfig
    from vsearch_tf.models.backbones import get_spec
    from vsearch_tf.models.embedder import build_embedder
    from vsearch_tf.models.heads import build_head
    from vsearch_tf.train import RetrievalModel

    keras.backend.clear_session()
    gc.collect()
    keras.mixed_precision.set_global_policy("float32" if precision == "off" else precision)
    # GeM for feature maps; the first valid pooling (cls, or the tower's own) for transformers
    pooling = "gem" if "gem" in get_spec(backbone).poolings else get_spec(backbone).poolings[0]
    embedder = build_embedder(
        backbone, image_size, embedding_dim=512, pooling=pooling, weights="none"
    )
    head = build_head(HeadConfig(), num_classes, [1] * num_classes)  # ArcFace, the default head
    model = RetrievalModel(embedder, head, name="retrieval")
    model(keras.ops.zeros((1, image_size, image_size, 3)))
    head(keras.ops.zeros((1, embedder.output.shape[-1])), keras.ops.zeros((1,), "int32"))

    def optimizer() -> keras.optimizers.Optimizer:
        opt = keras.optimizers.AdamW(1e-4, weight_decay=1e-4, global_clipnorm=10.0)
        return keras.optimizers.LossScaleOptimizer(opt) if precision == "mixed_float16" else opt

    model.compile_optimizers(optimizer(), optimizer(), jit_compile=jit)
    model.make_train_function()
    embed_fn = tf.function(
        lambda x: embedder(x, training=False), jit_compile=jit, reduce_retracing=True
    )

    def embed(batches: Iterator) -> None:  # as vsearch_tf.inference: embeddings to numpy
        np.asarray(embed_fn(next(batches)[0]), np.float32)

    def train(batches: Iterator) -> None:  # Keras' train_function pulls the batch itself, as in fit
        logs = model.train_function(batches)
        float(logs["loss"])

    return Workload(embed, train)


@dataclass
class DataTuning:
    """Overrides of the pipelines' tf.data settings (None keeps vsearch's)."""

    threads: int | None = None  # tf.data private thread pool size
    intra_op: int | None = None  # max intra-op parallelism inside tf.data functions
    # Tf.data service dispatcher address: the pipeline runs on its workers
    service: str | None = None

    def apply(self, ds):
        import tensorflow as tf

        options = tf.data.Options()
        if self.threads is not None:
            options.threading.private_threadpool_size = self.threads
        if self.intra_op is not None:
            options.threading.max_intra_op_parallelism = self.intra_op
        ds = ds.with_options(options)
        if self.service:
            ds = ds.apply(tf.data.experimental.service.distribute("parallel_epochs", self.service))
        return ds


def datasets(
    table,
    labels: np.ndarray,
    image_size: int,
    batch: int,
    cache_dir: str | None,
    tuning: DataTuning,
    prepared: dict[str, str] | None = None,
):
    """(in-memory, pipeline) dataset factories per step; each yields (pixels, ...) batches.
    With ``prepared`` (mode -> folder), also training from the shards prepared there.

    With ``cache_dir`` the decoded crops are cached as after a first pass: training's on disk
    (``data.cache_dir``), embedding's in memory (as validation could, re-embedding the same
    gallery every epoch).
    """
    import tensorflow as tf

    from vsearch_tf.data.pipeline import embedding_dataset, training_dataset

    embed_ds = embedding_dataset(table, image_size, batch)
    if cache_dir:
        embed_ds = embed_ds.cache()
        for _ in embed_ds:
            pass
        for _ in training_dataset(table, labels, image_size, batch, cache_dir=cache_dir):
            pass
    embed_ds = embed_ds.repeat()

    def embed_pipeline() -> tf.data.Dataset:
        return tuning.apply(embed_ds)

    def train_pipeline() -> tf.data.Dataset:
        return tuning.apply(
            training_dataset(table, labels, image_size, batch, cache_dir=cache_dir).repeat()
        )

    def prepared_pipeline(folder: str) -> Callable[[], tf.data.Dataset]:
        return lambda: tuning.apply(
            training_dataset(table, labels, image_size, batch, prepared=folder).repeat()
        )

    # The in-memory batches are real decoded pixels, so (a) and (b) compute on the same content.
    embed_batch = next(iter(embed_ds))
    train_batch = next(iter(train_pipeline()))
    sources = {
        "embed": (lambda: tf.data.Dataset.from_tensors(embed_batch).repeat(), embed_pipeline),
        "train": (lambda: tf.data.Dataset.from_tensors(train_batch).repeat(), train_pipeline),
    }
    for mode, folder in (prepared or {}).items():
        sources[mode] = (sources["train"][0], prepared_pipeline(folder))
    return sources


def reference_pil(table, image_size: int) -> Timing:
    """Decode each JPEG, crop its box, resize to ``image_size`` with PIL (libjpeg-turbo), one
    thread and nothing else: the floor any pipeline that decodes full photos stands on."""
    wall, cpu = time.perf_counter(), time.process_time()
    for path, (x, y, w, h) in zip(table.paths, table.boxes):
        with Image.open(path) as image:
            crop = image.crop((int(x), int(y), int(x + w), int(y + h)))
            crop.resize((image_size, image_size), Image.BILINEAR)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return Timing(len(table) / wall, 1000.0 * cpu / len(table))


def reference_tf(table, image_size: int, batch: int):
    """The same in tf.data: tf.io.decode_jpeg, a slice, tf.image.resize; a dataset factory."""
    import tensorflow as tf

    def load(path, box):
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        x, y, w, h = tf.unstack(tf.cast(box, tf.int32))
        return tf.image.resize(image[y : y + h, x : x + w], [image_size, image_size])

    ds = tf.data.Dataset.from_tensor_slices((table.paths, table.boxes)).repeat()
    return lambda: ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch).prefetch(2)


def pipelines_alone(sources: dict, table, args: argparse.Namespace) -> None:
    """Each input pipeline with no model, alternating in rounds with the references; medians,
    and the ratios the throughput bars are about (docs/throughput.md)."""
    runs: dict[str, list[Timing]] = {}
    factories = {mode: source[1] for mode, source in sources.items()}
    factories["reference, tf"] = reference_tf(table, args.image_size, args.batch)
    for _ in range(args.rounds):
        for name, make_ds in factories.items():
            timing = measure(next, make_ds, args.batch, args.warmup, 4 * args.steps)
            runs.setdefault(name, []).append(timing)
        runs.setdefault("reference, PIL", []).append(reference_pil(table, args.image_size))
    print(f"\n{'pipeline alone':<16} {'img/s':>8} {'cpu-ms/img':>11} {'per core':>9}  rounds")
    cpu = {}
    for name, timings in runs.items():
        t = median_timing(timings)
        cpu[name] = t.cpu_ms_per_image
        spread = ", ".join(f"{x.cpu_ms_per_image:.2f}" for x in timings)
        print(
            f"{name:<16} {t.images_per_s:>8.0f} {t.cpu_ms_per_image:>11.2f} "
            f"{1000 / t.cpu_ms_per_image:>9.0f}  cpu-ms {spread}"
        )
    for mode in (m for m in cpu if m.startswith("prepared-") and "train" in cpu):
        ratios = [
            t.cpu_ms_per_image / p.cpu_ms_per_image for t, p in zip(runs["train"], runs[mode])
        ]
        print(
            f"train from {mode} shards ({record_kb(args.prepared[mode]):.0f} KB an image): "
            f"{1000 / cpu[mode]:.0f} img/s per core, {cpu['train'] / cpu[mode]:.1f}x the "
            f"raw-photo training pipeline (rounds {min(ratios):.1f}-{max(ratios):.1f}x)"
        )
    if "embed" in cpu:
        print(
            f"embedding / reference: {cpu['embed'] / cpu['reference, PIL']:.2f} (PIL), "
            f"{cpu['embed'] / cpu['reference, tf']:.2f} (tf.data)"
        )


def measure(
    step: Callable[[Iterator], None], make_ds: Callable, batch: int, warmup: int, steps: int
) -> Timing:
    batches = [iter(make_ds())]
    try:
        return timed(lambda: step(batches[0]), batch, warmup, steps)
    finally:
        batches.clear()  # stops the pipeline's threads before the next measurement
        gc.collect()


# --- memory -----------------------------------------------------------------------------------


def _rss_kb(field: str) -> int:
    """A field of /proc/self/status in kB.

    RssAnon is heap and tensors, RssFile mapped files, VmHWM the peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _memory_child(n: int, folder: str, mode: str, chunk_rows: int, dim: int) -> None:
    """Embed ``n`` small images with a tiny model; print peak RSS and peak anonymous RSS (sampled
    every 20 ms), run in a fresh process so each gallery size starts from the same state."""
    import threading

    import keras
    import tensorflow as tf

    from vsearch_tf.index import EmbeddingStore
    from vsearch_tf.inference import embed_table, embed_to_store

    paths = sorted(str(p) for p in Path(folder).glob("*.jpg"))[:n]
    table = image_table(Path(folder), paths, np.full((n, 4), -1.0, np.float32))
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(8, 3, strides=2)(inputs))
    model = keras.Model(inputs, keras.layers.UnitNormalization()(keras.layers.Dense(dim)(x)))
    fn = tf.function(lambda t: model(t, training=False))
    peak_anon, done = [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak_anon[0] = max(peak_anon[0], _rss_kb("RssAnon"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with tempfile.TemporaryDirectory() as tmp:
        if mode == "streamed":  # what `vsearch index` runs
            embeddings, report = embed_to_store(
                fn, table, 32, EmbeddingStore(tmp), batch_size=64, chunk_rows=chunk_rows
            )
        else:
            embeddings, report = embed_table(fn, table, 32, batch_size=64)
        checksum = float(np.asarray(embeddings).sum())  # reads every vector, as indexing does
        done.set()
        sampler.join()
        file_kb = _rss_kb("RssFile")
    # Not ru_maxrss: Linux carries the parent's high-water mark over fork+exec.
    peak = _rss_kb("VmHWM")
    print(
        json.dumps(
            {
                "n": n,
                "embedded": len(report.rows),
                "peak_rss_mb": peak / 1024,
                "peak_anon_mb": peak_anon[0] / 1024,
                "file_mb": file_kb / 1024,
                "checksum": checksum,
            }
        )
    )


def memory_check(sizes: list[int], chunk_rows: int, dim: int) -> None:
    """Peak RSS of embedding galleries of increasing size.

    Streamed to disk (``embed_to_store``, as ``vsearch index``) and, to show the check can see
    growth, held in memory (``embed_table``).
    """
    with tempfile.TemporaryDirectory() as tmp:
        write_photos(Path(tmp), max(sizes), 48, 48, seed=1)
        print(
            f"\nPeak memory of embedding a gallery: {dim}-d embeddings, "
            f"chunks of {chunk_rows} rows, 48x48 JPEGs, a fresh process per run.\n"
            "'anon' is heap and tensors; the rest is mapped "
            "files (libraries, and for 'streamed' the embeddings.npy memmap that "
            "EmbeddingStore.assemble returns, which the OS can evict)."
        )
        print(
            f"{'images':>7} {'mode':>10} {'peak RSS MB':>12} {'peak anon MB':>13} "
            f"{'mapped files MB':>16} {'embeddings MB':>14}"
        )
        for mode in ("streamed", "in-memory"):
            for n in sizes:
                cmd = [
                    sys.executable,
                    __file__,
                    "--memory-child",
                    str(n),
                    tmp,
                    mode,
                    str(chunk_rows),
                    str(dim),
                ]
                out = (
                    subprocess.run(cmd, check=True, capture_output=True, text=True)
                    .stdout.strip()
                    .splitlines()[-1]
                )
                r = json.loads(out)
                assert r["embedded"] == n, r
                print(
                    f"{n:>7} {mode:>10} {r['peak_rss_mb']:>12.0f} {r['peak_anon_mb']:>13.0f} "
                    f"{r['file_mb']:>16.0f} {n * dim * 4 / 2**20:>14.1f}",
                    flush=True,
                )


# --- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument(
        "--backbones", default=DEFAULT_BACKBONES, help="comma-separated registry names"
    )
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed batches per measurement")
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed batches before each measurement"
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="alternations of (a) and (b); medians are reported"
    )
    parser.add_argument(
        "--modes",
        default="embed,train,prepared-jpeg,prepared-raw",
        help="of embed, train, prepared-jpeg, prepared-raw",
    )
    parser.add_argument("--photos", type=int, default=256, help="distinct JPEG files to generate")
    parser.add_argument(
        "--photo-size", default="800x600", help="WIDTHxHEIGHT of the generated photos"
    )
    parser.add_argument(
        "--cache", action="store_true", help="(b) reads decoded crops cached by a first pass"
    )
    parser.add_argument(
        "--data-threads", type=int, help="tf.data private thread pool size (vsearch: shared pool)"
    )
    parser.add_argument(
        "--data-intra-op", type=int, help="tf.data max intra-op parallelism (vsearch: TF's default)"
    )
    parser.add_argument(
        "--model-threads",
        type=int,
        help="TF intra-op threads for the model (vsearch: TF's default)",
    )
    parser.add_argument(
        "--data-service",
        action="store_true",
        help="(b) through an in-process tf.data service dispatcher and worker (checks the "
        "pipelines can be moved to other hosts; on one machine it only adds overhead)",
    )
    parser.add_argument(
        "--precision",
        default="off",
        help="dtype policies for extra model-alone rows: off,mixed_bfloat16,mixed_float16",
    )
    parser.add_argument(
        "--jit", default="off", help="XLA settings for extra model-alone rows: off,on"
    )
    parser.add_argument(
        "--no-pipeline", action="store_true", help="model-alone rows only (precision/XLA studies)"
    )
    parser.add_argument(
        "--pipeline-only",
        action="store_true",
        help="the input pipelines and the references alone, no model",
    )
    parser.add_argument(
        "--memory", action="store_true", help="also run the peak-RSS check of gallery embedding"
    )
    parser.add_argument("--memory-only", action="store_true", help="run only the peak-RSS check")
    parser.add_argument("--memory-sizes", default="2000,8000")
    parser.add_argument(
        "--memory-dim", type=int, default=2048, help="embedding size in the memory check"
    )
    parser.add_argument("--memory-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory_child:
        n, folder, mode, chunk_rows, dim = args.memory_child
        _memory_child(int(n), folder, mode, int(chunk_rows), int(dim))
        return 0
    if args.memory_only:
        memory_check([int(s) for s in args.memory_sizes.split(",")], 1024, args.memory_dim)
        return 0

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if args.model_threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.model_threads)
    tuning = DataTuning(args.data_threads, args.data_intra_op)
    if args.data_service:
        dispatcher = tf.data.experimental.service.DispatchServer()
        worker = tf.data.experimental.service.WorkerServer(  # noqa: F841 (serves while referenced)
            tf.data.experimental.service.WorkerConfig(
                dispatcher_address=dispatcher.target.split("://")[1]
            )
        )
        tuning.service = dispatcher.target
    backbones = args.backbones.split(",")
    modes = args.modes.split(",")
    precisions = args.precision.split(",")
    jits = [j == "on" for j in args.jit.split(",")]
    width, height = (int(v) for v in args.photo_size.split("x"))
    print(
        f"TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores, "
        f"GPUs: {len(tf.config.list_physical_devices('GPU'))}; {args.image_size} px, "
        f"batch {args.batch}, {args.warmup} warm-up + {args.steps} timed batches, "
        f"{args.rounds} rounds; weights none; {args.photos} JPEGs {width}x{height} with a box each"
        f"{'; decoded crops cached' if args.cache else ''}"
        f"{'; via tf.data service' if args.data_service else ''}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )

    with tempfile.TemporaryDirectory() as tmp:
        from vsearch_tf.data.tables import read_training

        paths, boxes = write_photos(Path(tmp), args.photos, width, height)
        csv = write_training_csv(Path(tmp), paths, boxes)
        table = read_training(csv, tmp)
        labels = np.unique(table.products, return_inverse=True)[1].astype(np.int32)
        cache_dir = os.path.join(tmp, "cache") if args.cache else None
        args.prepared = {
            mode: prepare_shards(csv, args.image_size, mode.removeprefix("prepared-"))
            for mode in modes
            if mode.startswith("prepared-")
        }
        sources = datasets(
            table, labels, args.image_size, args.batch, cache_dir, tuning, args.prepared
        )
        sources = {mode: sources[mode] for mode in modes}
        if not args.no_pipeline:
            pipelines_alone(sources, table, args)
        if args.pipeline_only:
            return 0

        rows: list[tuple] = []
        print(
            f"\n{'backbone':<20} {'step':<6} {'precision':<15} {'xla':<4} {'(a) img/s':>10} "
            f"{'(b) img/s':>10} {'b/a':>6} {'b/a rounds':>11} "
            f"{'(a) cpu-ms/img':>15} {'(b) cpu-ms/img':>15} {'cpu a/b':>8}"
        )
        for backbone in backbones:
            for precision in precisions:
                for jit in jits:
                    rows += bench_backbone(
                        backbone, precision, jit, modes, sources, int(labels.max()) + 1, args
                    )
        speedups(rows)
    print(
        f"load average at the end {os.getloadavg()[0]:.1f} "
        "(other processes on these cores slow (a) and (b) alike)"
    )
    if args.memory:
        memory_check([int(s) for s in args.memory_sizes.split(",")], 1024, args.memory_dim)
    return 0


def bench_backbone(
    backbone: str,
    precision: str,
    jit: bool,
    modes: list[str],
    sources: dict,
    num_classes: int,
    args: argparse.Namespace,
) -> list[tuple]:
    """Measure and print one backbone under one dtype policy / XLA setting; a failure (e.g. an op
    XLA cannot compile) is printed as the row's result instead of ending the benchmark."""
    rows = []
    prefix = f"{backbone:<20} {{mode:<6}} {precision:<15} {'on' if jit else 'off':<4} "
    try:
        work = build_workload(backbone, args.image_size, num_classes, precision, jit)
    except Exception as err:  # noqa: BLE001 (reported, the benchmark goes on)
        print(
            prefix.format(mode="-") + f"failed to build: {str(err).splitlines()[0][:120]}",
            flush=True,
        )
        return rows
    # Only the default float32 build of vsearch's backbones is run through the pipeline: the
    # other rows answer "how fast is the model", and Keras' ConvNeXt is there for its speed only.
    with_pipeline = not (
        args.no_pipeline or backbone.endswith("_keras") or precision != "off" or jit
    )
    for mode in modes:
        step = work.embed if mode == "embed" else work.train  # prepared-*: the train step
        memory_ds, pipeline_ds = sources[mode]
        a_runs, b_runs = [], []
        try:
            for _ in range(args.rounds if with_pipeline else 1):
                a_runs.append(measure(step, memory_ds, args.batch, args.warmup, args.steps))
                if with_pipeline:
                    b_runs.append(measure(step, pipeline_ds, args.batch, args.warmup, args.steps))
        except Exception as err:  # noqa: BLE001
            print(
                prefix.format(mode=mode) + f"failed: {str(err).splitlines()[0][:120]}", flush=True
            )
            continue
        a = median_timing(a_runs)
        rows.append((backbone, mode, precision, jit, a))
        line = prefix.format(mode=mode) + f"{a.images_per_s:>10.1f} "
        if b_runs:
            b = median_timing(b_runs)
            ratios = [y.images_per_s / x.images_per_s for x, y in zip(a_runs, b_runs)]
            spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
            line += (
                f"{b.images_per_s:>10.1f} {statistics.median(ratios):>6.2f} {spread:>11} "
                f"{a.cpu_ms_per_image:>15.1f} {b.cpu_ms_per_image:>15.1f} "
                f"{a.cpu_ms_per_image / b.cpu_ms_per_image:>8.2f}"
            )
        else:
            line += f"{'-':>10} {'-':>6} {'-':>11} {a.cpu_ms_per_image:>15.1f} {'-':>15} {'-':>8}"
        print(line, flush=True)
    return rows


def speedups(rows: list[tuple]) -> None:
    """Keras' grouped-Conv2D ConvNeXt vs vsearch's DepthwiseConv2D build, model alone."""
    by_key = {row[:4]: row[4] for row in rows}
    lines = []
    for (backbone, mode, precision, jit), slow in by_key.items():
        fast = by_key.get((backbone.removesuffix("_keras"), mode, precision, jit))
        if backbone.endswith("_keras") and fast is not None:
            lines.append(
                f"{backbone.removesuffix('_keras'):<16} {mode:<6} {precision:<15} "
                f"{'on' if jit else 'off':<4} {slow.images_per_s:>12.2f} "
                f"{fast.images_per_s:>12.2f} {fast.images_per_s / slow.images_per_s:>8.1f}x "
                f"{slow.cpu_ms_per_image:>12.0f} {fast.cpu_ms_per_image:>12.0f} "
                f"{slow.cpu_ms_per_image / fast.cpu_ms_per_image:>8.1f}x"
            )
    if lines:
        print(
            "\nConvNeXt, model alone: Keras' build (grouped Conv2D) "
            "vs vsearch's (DepthwiseConv2D), same weights and outputs"
        )
        print(
            f"{'backbone':<16} {'step':<6} {'precision':<15} {'xla':<4} {'Keras img/s':>12} "
            f"{'vsearch img/s':>12} {'speed-up':>9} "
            f"{'Keras cpu-ms':>12} {'vsearch cpu-ms':>12} {'speed-up':>9}"
        )
        print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
