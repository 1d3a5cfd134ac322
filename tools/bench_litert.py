"""The LiteRT table of the README: size, mAP@1000 and latency per image on one thread, of a
SavedModel export and the ``.tflite`` files converted from it, measured in one run.

    nice -n 10 python tools/bench_litert.py \
        --saved-model M/NAME/1 --tflite M/NAME/litert/NAME-{none,float16,int8}.tflite \
        --images queries.csv --root DATA --eval eval-sm.json eval-none.json ... --out bench.json

- size: the ``.tflite`` bytes against the SavedModel's ``variables/`` bytes (its weights);
- mAP@1000: read from the ``vsearch eval --out`` report of each model, given in the order of
  ``--saved-model`` then ``--tflite`` (optional: without it the column is empty);
- latency: batch 1, already-cropped pixels of ``--n`` images of ``--images`` (decoded once,
  beforehand), the SavedModel's ``serve_pixels`` with TensorFlow's intra- and inter-op threads
  at 1, each ``.tflite`` on the LiteRT interpreter with ``num_threads=1`` (XNNPACK). The models
  take turns for ``--rounds`` rounds and each one's median round counts, so load from other jobs
  on the machine falls on all of them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

from vsearch_tf.data.pipeline import embedding_dataset  # noqa: E402
from vsearch_tf.data.tables import read_queries  # noqa: E402
from vsearch_tf.export import load_exported  # noqa: E402
from vsearch_tf.litert import interpreter_class, read_metadata  # noqa: E402


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def saved_model_runner(path: Path):
    model = load_exported(path)
    function = model.serving.signatures["serve_pixels"]
    return lambda x: function(pixels=tf.constant(x))["embedding"].numpy()


def litert_runner(path: Path):
    it = interpreter_class()(model_path=str(path), num_threads=1)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]

    def run(x: np.ndarray) -> np.ndarray:
        it.set_tensor(inp, x)
        it.invoke()
        return it.get_tensor(out)

    return run


def seconds_per_image(run, pixels: np.ndarray) -> float:
    started = time.perf_counter()
    for i in range(len(pixels)):
        run(pixels[i : i + 1])
    return (time.perf_counter() - started) / len(pixels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--saved-model", type=Path, required=True, help="a version folder")
    parser.add_argument("--tflite", type=Path, nargs="+", required=True)
    parser.add_argument("--images", type=Path, required=True, help="queries.csv to time on")
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--eval", type=Path, nargs="*", default=[], help="eval reports, in order")
    parser.add_argument("--n", type=int, default=200, help="images timed per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()

    saved = load_exported(args.saved_model)
    table = read_queries(args.images, args.root)
    rows = np.arange(min(args.n, len(table)))
    pixels = np.concatenate(
        [p.numpy() for p, _, _ in embedding_dataset(table, saved.image_size, 32, rows)]
    )
    variables = folder_bytes(args.saved_model / "variables")
    models = [("SavedModel float32", args.saved_model, saved_model_runner(args.saved_model))]
    for path in args.tflite:
        quantize = read_metadata(path)["quantize"]
        models.append((f"LiteRT {quantize}", path, litert_runner(path)))
    maps = [json.loads(p.read_text())["map_at_k"] for p in args.eval]
    maps += [None] * (len(models) - len(maps))

    reference = models[0][2](pixels[:16])
    for _, _, run in models:  # warm up (graph tracing, XNNPACK packing) and agree
        embeddings = np.concatenate([run(pixels[i : i + 1]) for i in range(16)])
        cosine = np.sum(embeddings * reference, axis=1)
        assert cosine.min() > 0.5, cosine
    timings: list[list[float]] = [[] for _ in models]
    for _ in range(args.rounds):
        for i, (_, _, run) in enumerate(models):
            timings[i].append(seconds_per_image(run, pixels))
    latency = [statistics.median(t) for t in timings]

    results = []
    for (label, path, _), seconds, score in zip(models, latency, maps):
        size = variables if path == args.saved_model else path.stat().st_size
        results.append(
            {
                "format": label,
                "path": str(path),
                "bytes": size,
                "size_ratio": size / variables,
                "map_at_1000": score,
                "map_delta": None if score is None or maps[0] is None else score - maps[0],
                "ms_per_image": seconds * 1e3,
                "latency_ratio": seconds / latency[0],
            }
        )
    print(
        f"{len(pixels)} images of {args.images}, {saved.image_size} px, batch 1, 1 thread, "
        f"median of {args.rounds} rounds; SavedModel variables/ = {variables / 1e6:.2f} MB"
    )
    header = ("format", "size", "x SavedModel variables", "mAP@1000", "vs SavedModel")
    print("| " + " | ".join(header + ("ms / image", "x SavedModel")) + " |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        score = "-" if r["map_at_1000"] is None else f"{r['map_at_1000']:.4f}"
        delta = "-" if r["map_delta"] is None else f"{r['map_delta']:+.4f}"
        print(
            f"| {r['format']} | {r['bytes'] / 1e6:.2f} MB | {r['size_ratio']:.3f} | {score} | "
            f"{delta} | {r['ms_per_image']:.2f} | {r['latency_ratio']:.2f} |"
        )
    if args.out:
        args.out.write_text(json.dumps({"images": len(pixels), "rows": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
