"""Embed a catalogue with Apache Beam, for galleries too large for one ``vsearch index`` process.

The same exported model, the same decoding (:func:`vsearch_tf.data.images.load_crop_resize`) and
the same ``serve_pixels`` signature as ``vsearch index``, so the vectors are the ones the index
would compute; Beam spreads the rows over workers: the DirectRunner's processes on one machine,
or Dataflow / Flink / Spark workers. ``vsearch index --embeddings DIR`` builds an index from the
output without embedding anything again.

Output folder (files are written through ``tf.io.gfile``, so ``gs://`` works too)::

    embeddings-SSSSS-of-NNNNN.tfrecord  one tf.train.Example per image: embedding, seller_img_id,
                                        product_id, img_path, csv / row (its position), box_fallback
    unreadable-SSSSS-of-NNNNN.jsonl     images that could not be read or decoded, with the reason
    vertex/part-SSSSS-of-NNNNN.json     with ``--format vertex-jsonl``: Vertex AI Vector Search
                                        records {"id", "embedding", "restricts"}, alone in their
                                        folder because Vertex ingests every file of the folder
    embed.json                          model, fingerprint, csvs, counts, time; written last, so a
                                        folder without it is an unfinished run
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from vsearch_tf.errors import VSearchError, one_line

FORMATS = ("tfrecord", "vertex-jsonl")
INFO = "embed.json"
_PARSE_BATCH = 4096


def _beam() -> Any:
    """Import Beam lazily: it is an optional extra (``pip install vsearch-tf[beam]``)."""
    try:
        import apache_beam
    except ImportError:
        raise VSearchError(
            "vsearch embed needs Apache Beam: pip install 'vsearch-tf[beam]'"
        ) from None
    return apache_beam


def _is_url(path: str) -> bool:
    return "://" in path


@contextlib.contextmanager
def _local(path: str) -> Iterator[str]:
    """A local copy of a remote file or folder (``gs://...``) for the block: the CSV reader and
    the SavedModel loader read local paths. A local path is used as it is."""
    import tensorflow as tf

    if not _is_url(path):
        yield path
        return
    local = tempfile.mkdtemp(prefix="vsearch-embed-")
    try:
        target = os.path.join(local, os.path.basename(path.rstrip("/")))
        if tf.io.gfile.isdir(path):
            for folder, _, files in tf.io.gfile.walk(path):
                dest = os.path.join(target, os.path.relpath(folder, path))
                os.makedirs(dest, exist_ok=True)
                for name in files:
                    tf.io.gfile.copy(os.path.join(folder, name), os.path.join(dest, name))
        else:
            tf.io.gfile.copy(path, target)
        yield target
    finally:
        shutil.rmtree(local, ignore_errors=True)


def gallery_csvs(pattern: str) -> list[str]:
    """The gallery CSV(s): a file, or a glob of shards (``gallery-*.csv``), in sorted order."""
    import tensorflow as tf

    found = sorted(tf.io.gfile.glob(pattern))
    if not found:
        raise VSearchError(f"{pattern}: no gallery csv matches")
    return found


def _read_rows(item: tuple[int, str], root: str | None) -> Iterator[dict[str, Any]]:
    """The rows of gallery csv number ``item[0]``, with their position in it.

    The root defaults to the csv's folder. A URL root is handled by reading the paths against
    "/" (which keeps them inside the root) and putting the root in front afterwards.
    """
    from vsearch_tf.data.tables import read_gallery

    number, csv = item
    base = root if root is not None else os.path.dirname(csv) or "."
    url_root = base if _is_url(base) else None
    with _local(csv) as local:
        table = read_gallery(local, "/" if url_root else base)
    paths = [url_root.rstrip("/") + p for p in table.paths] if url_root else list(table.paths)
    for row, (sid, product, path, box) in enumerate(
        zip(table.ids, table.products, paths, table.boxes)
    ):
        yield {
            "csv": number,
            "row": row,
            "seller_img_id": str(sid),
            "product_id": str(product),
            "img_path": path,
            "box": [float(v) for v in box],
        }


@functools.cache
def _decoder(image_size: int) -> Any:
    """``vsearch index``'s decoding of one image as a graph function, traced once per process."""
    import tensorflow as tf

    from vsearch_tf.data.images import load_crop_resize

    @tf.function(input_signature=[tf.TensorSpec([], tf.string), tf.TensorSpec([4], tf.float32)])
    def decode(path: tf.Tensor, box: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return load_crop_resize(tf.io.read_file(path), box, image_size)

    return decode


def _handler_class() -> type:
    """The RunInference model handler, defined once Beam is imported."""
    from apache_beam.ml.inference.base import ModelHandler, PredictionResult

    class ExportHandler(ModelHandler):
        """Loads the export once per worker process; decodes each row (an unreadable image
        becomes an error result, not a failed bundle) and embeds the batch with ``serve_pixels``."""

        def __init__(self, model_dir: str, min_batch: int, max_batch: int):
            super().__init__()
            self.model_dir, self.min_batch, self.max_batch = model_dir, min_batch, max_batch

        def load_model(self) -> Any:
            from vsearch_tf.export import load_exported

            with _local(self.model_dir) as local:  # loading reads the variables into memory
                return load_exported(local)

        def run_inference(
            self,
            batch: Sequence[dict[str, Any]],
            model: Any,
            inference_args: dict[str, Any] | None = None,
        ) -> Iterable[Any]:
            import tensorflow as tf

            from vsearch_tf.data.pipeline import unreadable_reason

            decode = _decoder(model.image_size)
            pixels, decoded, results = [], [], []
            for element in batch:
                try:
                    image, fallback = decode(
                        tf.constant(element["img_path"]), tf.constant(element["box"], tf.float32)
                    )
                except tf.errors.OpError as err:
                    results.append(PredictionResult(element, {"error": unreadable_reason(err)}))
                    continue
                pixels.append(image)
                decoded.append((element, bool(fallback)))
            if pixels:
                vectors = model.embed_pixels(tf.stack(pixels)).numpy()
                results += [
                    PredictionResult(element, {"embedding": vector, "fallback": fallback})
                    for (element, fallback), vector in zip(decoded, vectors)
                ]
            return results

        def batch_elements_kwargs(self) -> dict[str, int]:
            return {"min_batch_size": self.min_batch, "max_batch_size": self.max_batch}

        def get_metrics_namespace(self) -> str:
            return "vsearch"

    return ExportHandler


def _example(result: Any) -> bytes:
    """An embedded row as a tf.train.Example, with its (csv, row) position for ordering."""
    import tensorflow as tf

    e, inference = result.example, result.inference
    feature = {
        "embedding": tf.train.Feature(float_list=tf.train.FloatList(value=inference["embedding"])),
        "seller_img_id": tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[e["seller_img_id"].encode()])
        ),
        "product_id": tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[e["product_id"].encode()])
        ),
        "img_path": tf.train.Feature(bytes_list=tf.train.BytesList(value=[e["img_path"].encode()])),
        "csv": tf.train.Feature(int64_list=tf.train.Int64List(value=[e["csv"]])),
        "row": tf.train.Feature(int64_list=tf.train.Int64List(value=[e["row"]])),
        "box_fallback": tf.train.Feature(
            int64_list=tf.train.Int64List(value=[int(inference["fallback"])])
        ),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def vertex_record(seller_img_id: str, product_id: str, embedding: np.ndarray) -> str:
    """One line of Vertex AI Vector Search's JSON ingest format; floats in their shortest exact
    float32 form, the product id as a ``restricts`` namespace (filter search by product)."""
    values = ",".join(
        np.format_float_positional(np.float32(v), unique=True, trim="0") for v in embedding
    )
    head = json.dumps({"id": seller_img_id})[:-1]
    restricts = json.dumps([{"namespace": "product_id", "allow": [product_id]}])
    return f'{head}, "embedding": [{values}], "restricts": {restricts}}}'


def _split(result: Any) -> Iterator[Any]:
    """Embedded rows to the main output, unreadable ones (as JSON lines) to ``unreadable``."""
    beam = _beam()
    if "error" in result.inference:
        beam.metrics.Metrics.counter("vsearch", "unreadable").inc()
        e = result.example
        yield beam.pvalue.TaggedOutput(
            "unreadable",
            json.dumps(
                {
                    "seller_img_id": e["seller_img_id"],
                    "product_id": e["product_id"],
                    "img_path": e["img_path"],
                    "error": result.inference["error"],
                }
            ),
        )
    else:
        beam.metrics.Metrics.counter("vsearch", "embedded").inc()
        yield result


def embed_gallery(
    model_dir: str,
    gallery: str,
    out_dir: str,
    *,
    root: str | None = None,
    runner: str = "DirectRunner",
    formats: Sequence[str] = ("tfrecord",),
    batch_size: int = 64,
    pipeline_args: Sequence[str] = (),
) -> dict[str, Any]:
    """Run the embedding pipeline and wait for it; returns (and writes) the ``embed.json`` info.

    ``pipeline_args`` are Beam's own options (``--direct_num_workers=2``, ``--project``,
    ``--region``, ``--temp_location``...). Rows are spread over workers with a reshuffle, batched
    by Beam's BatchElements up to ``batch_size``.
    """
    beam = _beam()
    import tensorflow as tf
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.options.pipeline_options import PipelineOptions

    from vsearch_tf.export import METADATA, fingerprint_of, resolve_version

    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise VSearchError(
            f"--format {', '.join(unknown) or '(none)'}: choose from {', '.join(FORMATS)}"
        )
    with _local(model_dir) as local:
        version = resolve_version(local)
        metadata = json.loads((version / METADATA).read_text())
        fingerprint = fingerprint_of(version)
    model_path = model_dir if _is_url(model_dir) else str(version.resolve())
    csvs = gallery_csvs(gallery)
    out = out_dir.rstrip("/")
    tf.io.gfile.makedirs(out)
    if tf.io.gfile.exists(f"{out}/{INFO}"):
        tf.io.gfile.remove(f"{out}/{INFO}")  # the folder is unfinished until the new one is written
    for old in (
        tf.io.gfile.glob(f"{out}/embeddings-*")
        + tf.io.gfile.glob(f"{out}/unreadable-*")
        + tf.io.gfile.glob(f"{out}/vertex/part-*")
    ):
        tf.io.gfile.remove(old)

    handler = _handler_class()(model_path, min(8, batch_size), batch_size)
    start = time.time()
    options = PipelineOptions([*pipeline_args, f"--runner={runner}"])
    with beam.Pipeline(options=options) as p:
        rows = (
            p
            | "gallery csvs" >> beam.Create(list(enumerate(csvs)))
            | "read rows" >> beam.FlatMap(_read_rows, root)
            | "spread over workers" >> beam.Reshuffle()
        )
        split = (
            rows
            | "embed" >> RunInference(handler)
            | "split unreadable" >> beam.FlatMap(_split).with_outputs("unreadable", main="embedded")
        )
        if "tfrecord" in formats:
            _ = (
                split.embedded
                | "to tf.Example" >> beam.Map(_example)
                | "write embeddings"
                >> beam.io.WriteToTFRecord(f"{out}/embeddings", file_name_suffix=".tfrecord")
            )
        if "vertex-jsonl" in formats:
            _ = (
                split.embedded
                | "to vertex json"
                >> beam.Map(
                    lambda r: vertex_record(
                        r.example["seller_img_id"],
                        r.example["product_id"],
                        r.inference["embedding"],
                    )
                )
                | "write vertex"
                >> beam.io.WriteToText(f"{out}/vertex/part", file_name_suffix=".json")
            )
        _ = split.unreadable | "write unreadable" >> beam.io.WriteToText(
            f"{out}/unreadable", file_name_suffix=".jsonl"
        )
    seconds = time.time() - start
    counters = {
        c.key.metric.name: c.committed
        for c in p.result.metrics().query()["counters"]
        if c.key.metric.namespace == "vsearch" and c.key.metric.name in ("embedded", "unreadable")
    }
    info = {
        "model": model_path,
        "model_fingerprint": fingerprint,
        "image_size": metadata["image_size"],
        "embedding_dim": metadata["embedding_dim"],
        "gallery_csvs": csvs,
        "root": root,
        "runner": runner,
        "formats": list(formats),
        "embedded": int(counters.get("embedded", 0)),
        "unreadable": int(counters.get("unreadable", 0)),
        "seconds": round(seconds, 1),
        "images_per_second": round(counters.get("embedded", 0) / max(seconds, 1e-9), 1),
    }
    with tf.io.gfile.GFile(f"{out}/{INFO}", "w") as f:
        f.write(json.dumps(info, indent=2) + "\n")
    return info


@dataclass
class EmbeddedGallery:
    """Embeddings read back from an ``embed`` folder, in gallery order (csv by csv, row by row)."""

    info: dict[str, Any]
    embeddings: np.ndarray  # float32 (N, D)
    ids: pd.DataFrame  # seller_img_id, product_id, img_path
    fallbacks: list[str]  # seller_img_ids whose box fell back to the whole image
    unreadable: list[dict[str, str]]  # seller_img_id, product_id, img_path, error


def load_embeddings(directory: str) -> EmbeddedGallery:
    """Read an ``embed`` folder. Rows a retried Beam bundle wrote twice are kept once; a
    seller_img_id present in two csv shards is an error."""
    import tensorflow as tf

    directory = directory.rstrip("/")
    if not tf.io.gfile.exists(f"{directory}/{INFO}"):
        raise VSearchError(f"{directory}: no {INFO}; not the output of a finished `vsearch embed`")
    with tf.io.gfile.GFile(f"{directory}/{INFO}") as f:
        info = json.load(f)
    files = sorted(tf.io.gfile.glob(f"{directory}/embeddings-*.tfrecord"))
    if not files:
        raise VSearchError(
            f"{directory}: no embeddings-*.tfrecord (was it embedded with --format tfrecord?)"
        )
    dim = int(info["embedding_dim"])
    spec = {
        "embedding": tf.io.FixedLenFeature([dim], tf.float32),
        **{
            k: tf.io.FixedLenFeature([], tf.string)
            for k in ("seller_img_id", "product_id", "img_path")
        },
        **{k: tf.io.FixedLenFeature([], tf.int64) for k in ("csv", "row", "box_fallback")},
    }
    parts: dict[str, list[np.ndarray]] = {k: [] for k in spec}
    dataset = (
        tf.data.TFRecordDataset(files)
        .batch(_PARSE_BATCH)
        .map(lambda x: tf.io.parse_example(x, spec))
    )
    try:
        for batch in dataset.as_numpy_iterator():
            for key, value in batch.items():
                parts[key].append(value)
    except tf.errors.OpError as err:
        raise VSearchError(f"{directory}: unreadable embeddings shard ({one_line(err)})") from None
    cols = {k: np.concatenate(v) for k, v in parts.items()}
    order = np.lexsort((cols["row"], cols["csv"]))
    position = np.stack([cols["csv"][order], cols["row"][order]], axis=1)
    keep = order[np.concatenate([[True], np.any(position[1:] != position[:-1], axis=1)])]
    text = {
        k: np.char.decode(cols[k][keep].astype(bytes), "utf-8")
        for k in ("seller_img_id", "product_id", "img_path")
    }
    ids = pd.DataFrame(text)
    dup = ids["seller_img_id"].duplicated()
    if dup.any():
        raise VSearchError(
            f"{directory}: seller_img_id {ids['seller_img_id'][dup].iloc[0]!r} appears in more "
            "than one gallery csv"
        )
    unreadable = []
    for path in sorted(tf.io.gfile.glob(f"{directory}/unreadable-*.jsonl")):
        with tf.io.gfile.GFile(path) as f:
            unreadable += [json.loads(line) for line in f if line.strip()]
    fallbacks = list(ids["seller_img_id"][cols["box_fallback"][keep].astype(bool)])
    return EmbeddedGallery(
        info, np.ascontiguousarray(cols["embedding"][keep], np.float32), ids, fallbacks, unreadable
    )
