"""The search page in a real headless Chromium (Debian's, driven by playwright): load the page,
upload a photo, drag a box, search, see the catalogue thumbnails, save a screenshot.

Skipped when no Chromium is installed, unless VSEARCH_REQUIRE_BROWSER=1 (set by CI), which makes
a missing browser a failure. VSEARCH_SCREENSHOT=PATH also saves the screenshot there.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
from helpers import live_server, tiny_index

from vsearch_tf.serving import SearchService, create_app

CHROMIUM = os.environ.get("VSEARCH_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Headless and quiet: no GPU, no first-run or background traffic (the page must work offline).
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
QUERY = "images/user/u00006_1.jpg"


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        message = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
        if os.environ.get("VSEARCH_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    index_dir = tiny_index(tmp_path_factory.mktemp("browser"))
    with live_server(create_app(SearchService(index_dir))) as url:
        yield url, index_dir.parent / "data"


def test_upload_drag_a_box_search_and_see_thumbnails(browser, server, tmp_path):
    url, data = server
    # bypass_csp: the page's policy forbids eval, which playwright's wait_for_function uses.
    page = browser.new_page(viewport={"width": 1200, "height": 800}, bypass_csp=True)
    outside: list[str] = []
    local = (url, f"blob:{url}")  # blob: URLs are the page's own object URLs
    page.on("request", lambda r: None if r.url.startswith(local) else outside.append(r.url))
    sent: list[bytes] = []
    page.on(
        "request",
        lambda r: sent.append(r.post_data_buffer or b"") if "/v1/search" in r.url else None,
    )
    page.goto(url)
    page.wait_for_function("document.getElementById('status').textContent.includes('14')")

    page.set_input_files("#file", str(data / QUERY))
    page.wait_for_function("document.getElementById('photo').naturalWidth > 0")
    photo = page.locator("#photo").bounding_box()
    natural = page.evaluate("[photo.naturalWidth, photo.naturalHeight]")
    start = (photo["x"] + 0.2 * photo["width"], photo["y"] + 0.25 * photo["height"])
    end = (photo["x"] + 0.7 * photo["width"], photo["y"] + 0.8 * photo["height"])
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=8)
    page.mouse.up()
    assert page.locator("#box").is_visible()

    page.click("#search")
    page.wait_for_function(
        "[...document.querySelectorAll('#results img')].filter(i => i.naturalWidth > 0).length"
        " === 12",
        timeout=30_000,
    )
    assert page.locator("#crop-figure").is_visible()
    captions = page.locator("#results .product").all_inner_texts()
    assert len(captions) == 12 and all(re.fullmatch(r"p\d{5}", c) for c in captions)
    assert "matches in" in page.locator("#message").inner_text()

    # The box is kept in the photo's own pixels (20%..70% across, 25%..80% down), and the page
    # shows what the API answers for that box.
    box = page.evaluate("state.box")
    expected = (0.2 * natural[0], 0.25 * natural[1], 0.5 * natural[0], 0.55 * natural[1])
    assert all(abs(a - b) <= 2 for a, b in zip(box, expected)), (box, expected)
    api = httpx.post(
        f"{url}/v1/search",
        files={"image": ("q.jpg", (data / QUERY).read_bytes())},
        data={"bbox": ",".join(map(str, box)), "top_k": "12"},
    ).json()["results"]
    assert captions == [hit["product_id"] for hit in api]
    assert outside == [], "the page fetched something from elsewhere"

    shot = tmp_path / "serve-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("VSEARCH_SCREENSHOT"):
        shutil.copy(shot, os.environ["VSEARCH_SCREENSHOT"])
    page.close()
