#!/usr/bin/env python
"""Requests/s and latency of `vsearch serve` under closed-loop load, next to the same model's
offline batch embedding rate, measured in the same run.

1. Offline: the query photos (with their boxes) through ``vsearch index``'s own loop
   (``embedding_dataset`` -> ``serve_pixels`` in batches of 64): images/s.
2. Served: `vsearch serve` in a subprocess on 127.0.0.1, micro-batching on (``--max-batch``) and
   off (``--max-batch 1``); for each client count, that many closed-loop clients (each sends a
   multipart search, waits for the answer, sends the next) until ``--requests`` answers or
   ``--seconds``. The clients are raw keep-alive HTTP/1.1 over asyncio streams in this process,
   so that on a small machine they take little of the CPU the server needs.
3. Hot reload (unless ``--no-reload``): the same load at the largest client count while
   `vsearch index remove` and then `vsearch index add` (other processes) replace a copy of the
   index: errors, versions seen and latency during the swaps.

The machine may be shared, so the offline rate is measured again right before each served
measurement, and each row compares with the offline rate of its own moment. CPU ms per request
(server process) and per image (offline) come from /proc (Linux).

Example, after `make demo` (these are the defaults):
    .venv/bin/python tools/bench_serve.py --index demo/index --queries demo/data/queries.csv
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from vsearch_tf.data.pipeline import embedding_dataset
from vsearch_tf.data.tables import ImageTable, read_gallery, read_queries
from vsearch_tf.export import load_exported

BOUNDARY = "vsearch-bench"
HEADER = (
    "| batching | clients | requests | req/s | offline img/s | x offline | p50 ms | p95 ms "
    "| p99 ms | errors | mean batch | server CPU ms/req | offline CPU ms/img |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)
ROW = (
    "| {batching} | {clients} | {requests} | {rps:.0f} | {offline:.0f} | {vs_offline:.2f} "
    "| {p50:.1f} | {p95:.1f} | {p99:.1f} | {errors} | {batch:.1f} | {cpu_ms:.2f} "
    "| {offline_cpu_ms:.2f} |"
)


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Offline:
    """Decode + crop + embed in batches of 64, as `vsearch index` does, on the query photos."""

    def __init__(self, model_path: str, table: ImageTable, images: int) -> None:
        model = load_exported(model_path)
        rows = np.resize(np.arange(len(table)), images)
        # Built once: tf.data traces the decoding when the dataset is made, not at each pass.
        self.dataset = embedding_dataset(table, model.image_size, 64, rows, model.max_pixels)
        self.embed = model.embed_pixels
        self.measure()  # warm-up: tracing, thread pools

    def measure(self) -> tuple[float, float]:
        """(images/s, CPU ms/image) of one pass."""
        start, cpu, done = time.perf_counter(), cpu_seconds(), 0
        for pixels, _, _ in self.dataset:
            self.embed(pixels).numpy()
            done += len(pixels)
        return done / (time.perf_counter() - start), 1000 * (cpu_seconds() - cpu) / done


def search_request(image: bytes, box: np.ndarray, top_k: int = 10) -> bytes:
    """One complete HTTP/1.1 multipart search request."""
    parts = [(b'name="image"; filename="q.jpg"\r\nContent-Type: image/jpeg', image)]
    if not np.all(box == -1):
        parts.append((b'name="bbox"', ",".join(f"{v:g}" for v in box).encode()))
    parts.append((b'name="top_k"', str(top_k).encode()))
    body = b"".join(
        b"--%s\r\nContent-Disposition: form-data; %s\r\n\r\n%s\r\n" % (BOUNDARY.encode(), h, v)
        for h, v in parts
    ) + (b"--%s--\r\n" % BOUNDARY.encode())
    head = (
        "POST /v1/search HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    return status, await reader.readexactly(int(length.group(1)) if length else 0)


@dataclass
class Load:
    """A bounded closed-loop run: stops at ``limit`` answers or at ``deadline``."""

    limit: int
    deadline: float
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)

    def more(self) -> bool:
        answered = len(self.latencies) + len(self.errors)
        return answered < self.limit and time.monotonic() < self.deadline


async def client(port: int, requests: list[bytes], offset: int, load: Load) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = offset
    while load.more():
        i += 1
        start = time.perf_counter()
        try:
            writer.write(requests[i % len(requests)])
            status, body = await read_response(reader)
            answer = json.loads(body)
        except (OSError, asyncio.IncompleteReadError, ValueError) as err:
            load.errors.append(repr(err))
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            continue
        if status != 200:
            load.errors.append(f"{status} {answer.get('error')}")
            continue
        load.latencies.append(time.perf_counter() - start)
        load.versions.append(answer["index_version"])
    writer.close()


def run_load(port: int, requests: list[bytes], clients: int, load: Load) -> float:
    """Run ``clients`` closed-loop clients until ``load`` is done; returns the seconds taken."""

    async def main() -> None:
        step = max(1, len(requests) // clients)
        await asyncio.gather(*(client(port, requests, c * step, load) for c in range(clients)))

    start = time.perf_counter()
    asyncio.run(main())
    return time.perf_counter() - start


def get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.read().decode()


def batch_stats(port: int) -> tuple[float, float]:
    """(sum, count) of the server's batch-size histogram."""
    text = get(port, "/metrics")
    value = lambda name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))  # noqa: E731
    return value("vsearch_batch_size_sum"), value("vsearch_batch_size_count")


class Server:
    """`vsearch serve` in a subprocess on a free loopback port."""

    def __init__(self, index: Path, max_batch: int, wait_ms: float, log: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        command = [sys.executable, "-m", "vsearch_tf", "serve", "--index", str(index)]
        command += ["--port", str(self.port), "--max-batch", str(max_batch)]
        command += ["--batch-wait-ms", str(wait_ms)]
        self.log = log
        self.process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            try:
                get(self.port, "/readyz")
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    tail = log.read_text()[-2000:]
                    raise SystemExit(f"the server did not start: {tail}") from None
                time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def measure(server: Server, requests: list[bytes], clients: int, args) -> dict:
    warm_up = Load(4 * clients, time.monotonic() + 10)  # connections, threads, allocations
    run_load(server.port, requests, clients, warm_up)
    (sum0, count0), cpu0 = batch_stats(server.port), cpu_seconds(server.process.pid)
    load = Load(args.requests, time.monotonic() + args.seconds)
    seconds = run_load(server.port, requests, clients, load)
    (sum1, count1), cpu1 = batch_stats(server.port), cpu_seconds(server.process.pid)
    ms = np.array(load.latencies) * 1000
    answered = len(load.latencies)
    return {
        "clients": clients,
        "requests": answered + len(load.errors),
        "rps": answered / seconds,
        "p50": float(np.percentile(ms, 50)) if answered else float("nan"),
        "p95": float(np.percentile(ms, 95)) if answered else float("nan"),
        "p99": float(np.percentile(ms, 99)) if answered else float("nan"),
        "errors": len(load.errors),
        "batch": (sum1 - sum0) / max(count1 - count0, 1),
        "cpu_ms": 1000 * (cpu1 - cpu0) / max(answered, 1),
    }


def reload_under_load(index: Path, requests: list[bytes], clients: int, args, log: Path) -> dict:
    """Serve a copy of the index; remove one image and add it back (two new versions) while
    ``clients`` search; returns errors, versions seen and latency."""
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    live = work / "index"
    shutil.copytree(index, live)
    extra = json.loads((live / "manifest.json").read_text())["extra"]
    gallery = read_gallery(extra["gallery_csv"], extra["gallery_root"])
    victim = str(pd.read_csv(live / "ids.csv", dtype=str).seller_img_id[0])
    row = list(gallery.ids).index(victim)
    readd = work / "readd.csv"
    relative = os.path.relpath(gallery.paths[row], extra["gallery_root"])
    readd.write_text(
        f"seller_img_id,img_path,product_id\n{victim},{relative},{gallery.products[row]}\n"
    )
    cli = [sys.executable, "-m", "vsearch_tf", "index"]
    updates = [
        [*cli, "remove", "--index", str(live), "--ids", victim],
        [
            *cli,
            "add",
            "--index",
            str(live),
            "--gallery",
            str(readd),
            "--root",
            extra["gallery_root"],
        ],
    ]
    load = Load(10**9, time.monotonic() + 600)

    def update() -> None:
        """The two updates, 2 s apart, then 2 s more of load on the last version."""
        for command in updates:
            time.sleep(2)
            subprocess.run(command, check=True, capture_output=True)
        time.sleep(2)
        load.deadline = time.monotonic()

    server = Server(live, args.max_batch, args.wait_ms, log)
    try:
        writer = threading.Thread(target=update)
        writer.start()
        run_load(server.port, requests, clients, load)
        writer.join()
        ms = np.array(load.latencies) * 1000
        seen = list(dict.fromkeys(load.versions))
        return {
            "requests": len(load.latencies) + len(load.errors),
            "errors": len(load.errors),
            "versions": seen,
            "per_version": [load.versions.count(v) for v in seen],
            "p50": float(np.percentile(ms, 50)),
            "p99": float(np.percentile(ms, 99)),
            "max": float(ms.max()),
            "ready": json.loads(get(server.port, "/readyz"))["index_version"],
        }
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, default=Path("demo/index"))
    parser.add_argument("--queries", type=Path, default=Path("demo/data/queries.csv"))
    parser.add_argument("--clients", default="1,8,32", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=2000, help="answers per measurement")
    parser.add_argument("--seconds", type=float, default=30.0, help="time limit per measurement")
    parser.add_argument("--offline-images", type=int, default=2000)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--wait-ms", type=float, default=5.0)
    parser.add_argument("--no-reload", action="store_true", help="skip the hot reload run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    manifest = json.loads((args.index / "manifest.json").read_text())
    queries = read_queries(args.queries)
    requests = [
        search_request(Path(p).read_bytes(), b) for p, b in zip(queries.paths, queries.boxes)
    ]
    offline = Offline(manifest["extra"]["model"], queries, args.offline_images)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    rows, log = [], Path(tempfile.mkdtemp(prefix="bench-serve-")) / "server.log"
    print(HEADER)
    for label, max_batch in (("on", args.max_batch), ("off", 1)):
        server = Server(args.index, max_batch, args.wait_ms, log)
        try:
            for clients in (int(c) for c in args.clients.split(",")):
                rate, offline_cpu = offline.measure()
                row = {"batching": label, **measure(server, requests, clients, args)}
                row.update(offline=rate, vs_offline=row["rps"] / rate, offline_cpu_ms=offline_cpu)
                rows.append(row)
                print(ROW.format(**row), flush=True)
        finally:
            server.stop()
    report: dict = {"rows": rows}
    if not args.no_reload:
        clients = max(int(c) for c in args.clients.split(","))
        report["reload"] = reload_under_load(args.index, requests, clients, args, log)
        print("hot reload under load:", json.dumps(report["reload"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
