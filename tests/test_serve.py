"""`vsearch serve` on a real tiny export and a real index: both request forms, every 4xx, the
gallery route, the API key, metrics, micro-batching and hot reload under a stream of requests
(FastAPI's TestClient, and a real uvicorn on a loopback port)."""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from fastapi.testclient import TestClient
from helpers import invoke, live_server, tiny_index

from vsearch_tf.data.pipeline import embedding_dataset
from vsearch_tf.data.tables import ImageTable
from vsearch_tf.errors import VSearchError
from vsearch_tf.serving import SearchService, create_app
from vsearch_tf.serving.app import read_api_key
from vsearch_tf.serving.batcher import MicroBatcher

BODY_LIMIT = 256 << 10
QUERY = "images/user/u00003_1.jpg"
BOX = (20.0, 16.0, 96.0, 100.0)
TEXT_IMAGE = b'--b\r\nContent-Disposition: form-data; name="image"\r\n\r\nabc\r\n--b--\r\n'


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    return tiny_index(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def data(index_dir) -> Path:
    return index_dir.parent / "data"


@pytest.fixture(scope="module")
def photo(data) -> bytes:
    return (data / QUERY).read_bytes()


@pytest.fixture(scope="module")
def service(index_dir) -> SearchService:
    return SearchService(index_dir, max_batch=8, batch_wait_ms=2)


@pytest.fixture(scope="module")
def client(service) -> TestClient:
    with TestClient(create_app(service, max_body_bytes=BODY_LIMIT)) as client:
        yield client


def multipart(client: TestClient, image: bytes, **fields: str) -> httpx.Response:
    return client.post("/v1/search", files={"image": ("q.jpg", image, "image/jpeg")}, data=fields)


def as_json(client: TestClient, image: bytes, **fields: object) -> httpx.Response:
    return client.post("/v1/search", json={"image_b64": base64.b64encode(image).decode(), **fields})


def ids_and_scores(response: httpx.Response) -> list[tuple[str, float]]:
    assert response.status_code == 200, response.text
    return [(r["seller_img_id"], r["score"]) for r in response.json()["results"]]


def test_both_request_forms_give_one_answer(client, photo, index_dir):
    form = multipart(client, photo, bbox=",".join(map(str, BOX)), top_k="5")
    body = form.json()
    assert [r["rank"] for r in body["results"]] == [1, 2, 3, 4, 5]
    assert set(body) == {"results", "model_fingerprint", "index_version", "took_ms"}
    manifest = json.loads((index_dir / "manifest.json").read_text())
    assert body["model_fingerprint"] == manifest["extra"]["model_fingerprint"]
    ids = pd.read_csv(index_dir / "ids.csv", dtype=str).set_index("seller_img_id")
    for hit in body["results"]:
        assert hit["product_id"] == ids.product_id[hit["seller_img_id"]]
        assert hit["image_url"] == f"/v1/gallery/{hit['seller_img_id']}/image"
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    assert ids_and_scores(as_json(client, photo, bbox=list(BOX), top_k=5)) == ids_and_scores(form)
    # No box: the whole photo, another answer; default top_k is 10.
    whole = ids_and_scores(multipart(client, photo))
    assert len(whole) == 10 and whole[:5] != ids_and_scores(form)


def test_served_query_is_embedded_exactly_as_vsearch_query_embeds_it(
    client, service, photo, data, index_dir
):
    snapshot = service.holder.current
    table = ImageTable(
        Path("q"),
        np.array(["q"]),
        np.array([str(data / QUERY)]),
        np.array([""]),
        np.array([BOX], np.float32),
    )
    [(indexed, _, _)] = list(
        embedding_dataset(table, snapshot.model.image_size, 1, max_pixels=snapshot.model.max_pixels)
    )
    served, _ = snapshot.decoder(tf.constant([photo]), tf.constant([BOX], tf.float32))
    np.testing.assert_array_equal(served.numpy(), indexed.numpy())
    # End to end: every gallery score equal to `vsearch query`'s, so the embeddings are equal.
    result = invoke(
        "query", data / QUERY, "--index", index_dir, "--bbox", ",".join(map(str, BOX)),
        "--top-k", 14, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    expected = [
        (hit["seller_img_id"], hit["score"])
        for hit in json.loads(result.stdout)["queries"][0]["results"]
    ]
    got = ids_and_scores(multipart(client, photo, bbox=",".join(map(str, BOX)), top_k="14"))
    assert [i for i, _ in got] == [i for i, _ in expected]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], atol=2e-6)


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` (a decompression bomb's shape)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    )


def _b64(image: bytes) -> str:
    return base64.b64encode(image).decode()


def _raw(body: bytes, content_type: str | None = None) -> dict:
    return {"content": body, "headers": {"content-type": content_type} if content_type else {}}


def _form(image: bytes, **fields: str) -> dict:
    return {"files": {"image": ("q.jpg", image, "image/jpeg")}, "data": fields}


def _bad_requests(photo: bytes) -> list[tuple[str, dict, int, str]]:
    """(what, httpx arguments, status, part of the message) for each way to get a request wrong."""
    image = _b64(photo)
    multi = "multipart/form-data; boundary=b"
    return [
        ("no content type", _raw(b"abc"), 415, "multipart/form-data"),
        ("text body", _raw(b"abc", "text/plain"), 415, "application/json"),
        ("bad JSON", _raw(b"{", "application/json"), 400, "not valid JSON"),
        ("JSON list", {"json": [1]}, 400, "JSON object"),
        ("no image_b64", {"json": {"top_k": 3}}, 400, "image_b64: required"),
        ("bad base64", {"json": {"image_b64": "!!!"}}, 400, "not valid base64"),
        ("unknown field", {"json": {"image_b64": image, "k": 3}}, 400, "unknown field 'k'"),
        ("form field in JSON", {"json": {"image": image}}, 400, "unknown field 'image'"),
        ("not an image", {"json": {"image_b64": _b64(b"hello")}}, 400, "not a JPEG"),
        ("empty image", {"json": {"image_b64": ""}}, 400, "empty file"),
        ("truncated JPEG", _form(photo[:400]), 400, "Invalid JPEG"),
        ("bomb", {"json": {"image_b64": _b64(_png_header(30000, 30000))}}, 400, "max_pixels"),
        ("box of 3", {"json": {"image_b64": image, "bbox": [1, 2, 3]}}, 400, "four numbers"),
        ("box of text", {"json": {"image_b64": image, "bbox": "1,2,3,4"}}, 400, "four numbers"),
        ("box w=0", {"json": {"image_b64": image, "bbox": [1, 2, 0, 4]}}, 400, "width and height"),
        ("box NaN", _form(photo, bbox="1,2,nan,4"), 400, "four numbers"),
        ("box words", _form(photo, bbox="left,top"), 400, "x,y,w,h"),
        ("box off image", _form(photo, bbox="5000,5000,10,10"), 400, "outside the image"),
        ("top_k 0", {"json": {"image_b64": image, "top_k": 0}}, 400, "top_k"),
        ("top_k 1000", _form(photo, top_k="1000"), 400, "top_k"),
        ("top_k text", _form(photo, top_k="ten"), 400, "top_k"),
        ("top_k bool", {"json": {"image_b64": image, "top_k": True}}, 400, "top_k"),
        ("no image file", {"files": {"photo": ("q.jpg", photo)}}, 400, "unknown field"),
        ("image as text", _raw(TEXT_IMAGE, multi), 400, "image: required"),
        ("two images", {"files": [("image", ("a", photo)), ("image", ("b", photo))]}, 400, "files"),
        ("bad multipart", _raw(b"--b\r\nnope", multi), 400, ""),
        ("too large", _raw(b" " * (BODY_LIMIT + 1), "application/json"), 413, "larger than"),
    ]


def test_every_bad_request_is_a_one_line_4xx_and_serving_goes_on(client, photo):
    cases = _bad_requests(photo)
    for name, request, status, message in cases:
        response = client.post("/v1/search", **request)
        assert response.status_code == status, (name, response.text)
        assert list(response.json()) == ["error"], name
        assert message in response.json()["error"], (name, response.text)
        assert "\n" not in response.text and "Traceback" not in response.text, name
    assert len(ids_and_scores(multipart(client, photo, top_k="3"))) == 3


def test_a_chunked_body_over_the_limit_is_refused_while_it_streams(client):
    def chunks():
        for _ in range(BODY_LIMIT // 4096 + 2):
            yield b" " * 4096

    response = client.post(
        "/v1/search", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413 and "larger than" in response.json()["error"]


def test_routes_and_methods_that_do_not_exist_answer_json(client):
    missing = client.get("/v1/nothing")
    assert missing.status_code == 404 and missing.json() == {"error": "no route GET /v1/nothing"}
    wrong = client.get("/v1/search")
    assert wrong.status_code == 405 and "method not allowed" in wrong.json()["error"]


def test_gallery_serves_indexed_images_and_refuses_anything_else(client, data, index_dir):
    ids = pd.read_csv(index_dir / "ids.csv", dtype=str)
    for sid, path in zip(ids.seller_img_id[:3], ids.img_path[:3]):
        response = client.get(f"/v1/gallery/{sid}/image")
        assert response.status_code == 200
        assert response.content == Path(path).read_bytes()
        assert response.headers["content-type"].startswith("image/")
    gallery_file = ids.img_path[0]
    for bad in (
        "nope",
        "..%2F..%2F..%2Fetc%2Fpasswd",
        "../../etc/passwd",
        "%2Fetc%2Fpasswd",
        gallery_file.replace("/", "%2F"),
        "images%2Fseller%2Fp00000.jpg",
        QUERY.replace("/", "%2F"),
    ):
        response = client.get(f"/v1/gallery/{bad}/image")
        assert response.status_code == 404, bad
        assert list(response.json()) == ["error"]


def test_health_readiness_and_metrics(client, photo, service):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["ready"] and ready["index_version"] == service.holder.current.version
    assert ready["vectors"] == 14 and ready["api_key_required"] is False
    multipart(client, photo)
    client.post("/v1/search", json={"image_b64": "!!"})
    text = client.get("/metrics").text
    assert 'vsearch_requests_total{method="POST",route="/v1/search",status="200"}' in text
    assert 'vsearch_errors_total{method="POST",route="/v1/search",status="400"}' in text
    assert 'vsearch_request_seconds_bucket{le="0.5",route="/v1/search"}' in text
    assert "vsearch_batch_size_count" in text
    assert f'version="{service.holder.current.version}"' in text
    assert "vsearch_index_vectors 14.0" in text


def test_page_and_its_files_are_served_and_load_nothing_from_elsewhere(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for text in (
        page.text,
        client.get("/static/app.js").text,
        client.get("/static/style.css").text,
    ):
        assert "://" not in text and "@import" not in text


def test_api_key_is_required_when_set(index_dir, photo, tmp_path):
    service = SearchService(index_dir)
    with TestClient(create_app(service, api_key="s3cret-key")) as keyed:
        files = {"image": ("q.jpg", photo, "image/jpeg")}
        for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer nope"}):
            response = keyed.post("/v1/search", files=files, headers=headers)
            assert response.status_code == 401 and "API key" in response.json()["error"]
        assert keyed.get("/metrics").status_code == 401
        assert keyed.get("/v1/gallery/s00000/image").status_code == 401
        for headers in ({"X-API-Key": "s3cret-key"}, {"Authorization": "Bearer s3cret-key"}):
            assert keyed.post("/v1/search", files=files, headers=headers).status_code == 200
        # Probes and the page stay open; the page learns it must ask for the key.
        assert keyed.get("/healthz").status_code == 200
        assert keyed.get("/readyz").json()["api_key_required"] is True
        assert keyed.get("/").status_code == 200


def test_serve_refuses_a_public_host_without_a_key_and_bad_key_files(index_dir, tmp_path):
    result = invoke("serve", "--index", index_dir, "--host", "0.0.0.0")
    assert result.exit_code == 2
    assert "--api-key-file" in result.stderr and "Traceback" not in result.output
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    for path, message in ((empty, "one word"), (tmp_path / "missing.key", "cannot read")):
        with pytest.raises(VSearchError, match=message):
            read_api_key(path)
    missing = invoke("serve", "--index", tmp_path / "no-index")
    assert missing.exit_code == 2 and "index folder not found" in missing.stderr


def test_micro_batcher_batches_and_survives_a_failing_batch():
    seen: list[list[int]] = []
    gate = threading.Event()

    def process(jobs):
        gate.wait(5)  # hold the first batch until every job is queued
        seen.append(list(jobs))
        if -1 in jobs:
            raise ValueError("bad job")
        return [j * 10 for j in jobs]

    batcher = MicroBatcher(process, max_batch=4, wait_s=0.5)
    batcher.start()
    futures = [batcher.submit(i) for i in range(10)]
    gate.set()
    assert [f.result(5) for f in futures] == [i * 10 for i in range(10)]
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    # An exception as a result fails its job alone.
    batcher.process = lambda jobs: [ValueError("odd") if j % 2 else j for j in jobs]
    mixed = [batcher.submit(j) for j in (1, 2)]
    assert isinstance(mixed[0].exception(5), ValueError) and mixed[1].result(5) == 2
    batcher.process = process
    # A failing batch fails each of its jobs, and the worker goes on.
    failing = [batcher.submit(j) for j in (1, -1, 2, 3)]
    for future in failing:
        with pytest.raises(ValueError, match="bad job"):
            future.result(5)
    assert batcher.submit(3).result(5) == 30
    batcher.stop()
    assert not batcher.alive
    # Nothing on its way: a lone job does not wait for company.
    eager = MicroBatcher(lambda jobs: jobs, max_batch=8, wait_s=30.0, arriving=lambda: 0)
    eager.start()
    start = time.monotonic()
    assert eager.submit(5).result(5) == 5 and time.monotonic() - start < 5
    eager.stop()
    unbatched = MicroBatcher(lambda jobs: [len(jobs)] * len(jobs), max_batch=1, wait_s=1.0)
    unbatched.start()
    assert {f.result(5) for f in [unbatched.submit(i) for i in range(6)]} == {1}
    unbatched.stop()


def _search_loop(url: str, photo: bytes, stop: threading.Event, log: list) -> None:
    """A closed-loop client: search until ``stop``, noting (status, version, ids) of each answer;
    an exception (a refused or dropped connection) is noted as status None."""
    with httpx.Client(base_url=url, timeout=30) as http:
        while not stop.is_set():
            try:
                response = http.post(
                    "/v1/search", files={"image": ("q.jpg", photo)}, data={"top_k": "14"}
                )
                body = response.json()
            except (httpx.HTTPError, ValueError) as err:
                log.append((None, None, [repr(err)]))
                continue
            ids = [r["seller_img_id"] for r in body.get("results", [])]
            log.append((response.status_code, body.get("index_version"), ids))


@contextlib.contextmanager
def _clients(url: str, photo: bytes, n: int) -> Iterator[list]:
    """``n`` closed-loop clients searching in threads until the block ends; yields their log."""
    stop, log = threading.Event(), []
    threads = [
        threading.Thread(target=_search_loop, args=(url, photo, stop, log), daemon=True)
        for _ in range(n)
    ]
    for thread in threads:
        thread.start()
    try:
        yield log
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_concurrent_requests_share_model_calls_on_a_real_server(index_dir, photo):
    service = SearchService(index_dir, max_batch=8, batch_wait_ms=20)
    with live_server(create_app(service)) as url:
        expected = httpx.post(
            f"{url}/v1/search", files={"image": ("q.jpg", photo)}, data={"top_k": "14"}
        ).json()
        with _clients(url, photo, 8) as log:
            _wait_for(lambda: len(log) >= 64)
        batches = service.metrics.batch_size.collect()[0].samples
    count = next(s.value for s in batches if s.name.endswith("_count"))
    total = next(s.value for s in batches if s.name.endswith("_sum"))
    assert total / count > 1.5, "concurrent requests were not batched"
    expected_ids = [r["seller_img_id"] for r in expected["results"]]
    assert all(status == 200 and ids == expected_ids for status, _, ids in log)


def test_hot_reload_under_a_stream_of_requests_fails_none(index_dir, data, photo, tmp_path):
    live = tmp_path / "index"
    shutil.copytree(index_dir, live)
    service = SearchService(live, max_batch=8, batch_wait_ms=2, poll_s=0.1)
    with live_server(create_app(service)) as url:
        first = service.holder.current
        with _clients(url, photo, 4) as log:
            _wait_for(lambda: len(log) >= 10)
            removed = invoke("index", "remove", "--index", live, "--ids", "s00004")
            assert removed.exit_code == 0, removed.output
            _wait_for(lambda: service.holder.current.version != first.version)
            second = service.holder.current
            _wait_for(lambda: sum(v == second.version for _, v, _ in log) >= 10)
            readd = tmp_path / "readd.csv"
            gallery = pd.read_csv(data / "gallery.csv", dtype=str)
            gallery[gallery.seller_img_id == "s00004"].to_csv(readd, index=False)
            added = invoke("index", "add", "--index", live, "--gallery", readd, "--root", data)
            assert added.exit_code == 0, added.output
            _wait_for(lambda: service.holder.current.version not in (first.version, second.version))
            third = service.holder.current
            _wait_for(lambda: sum(v == third.version for _, v, _ in log) >= 10)
        ready = httpx.get(f"{url}/readyz").json()
    statuses = Counter(status for status, _, _ in log)
    assert statuses == {200: len(log)}, statuses
    order = [v for _, v, _ in log]
    assert {first.version, second.version, third.version} == set(order)
    assert all("s00004" not in ids and len(ids) == 13 for _, v, ids in log if v == second.version)
    assert all("s00004" in ids for _, v, ids in log if v == third.version)
    assert ready["index_version"] == third.version
    # The index names the same model throughout: it was not loaded again.
    assert second.model is first.model and third.model is first.model


def test_a_broken_new_version_is_skipped_and_the_old_one_kept(index_dir, tmp_path, photo):
    live = tmp_path / "index"
    shutil.copytree(index_dir, live)
    service = SearchService(live, poll_s=3600)  # only the explicit polls below
    with TestClient(create_app(service)) as client:
        before = service.holder.current
        manifest = json.loads((live / "manifest.json").read_text())
        (live / "embeddings.npy").unlink()
        (live / "manifest.json").write_text(json.dumps({**manifest, "updated": "later"}))
        assert service.holder.poll() is False
        assert "embeddings.npy: missing" in client.get("/readyz").json()["reload_error"]
        assert service.holder.current is before
        assert len(ids_and_scores(multipart(client, photo, top_k="3"))) == 3
        assert service.holder.poll() is False  # the broken version is not retried over and over
        shutil.rmtree(live)
        shutil.copytree(index_dir, live)
        (live / "manifest.json").write_text(json.dumps({**manifest, "updated": "fixed"}))
        assert service.holder.poll() is True
        assert client.get("/readyz").json()["reload_error"] is None
