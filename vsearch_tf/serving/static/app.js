// The search page: choose or drop a photo, drag a box on it, search, show the catalogue matches.
"use strict";

const $ = (id) => document.getElementById(id);
// The chosen file, the box in the photo's own pixels [x, y, w, h] (null = whole photo), a drag
// in progress, and the object URLs to free when results are replaced.
const state = { file: null, box: null, drag: null, urls: [] };

function say(text, isError = false) {
  $("message").textContent = text;
  $("message").classList.toggle("error", isError);
}

function authHeaders() {
  const key = $("key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

async function showStatus() {
  try {
    const response = await fetch("/readyz");
    const info = await response.json();
    $("status").textContent = response.ok
      ? `${info.vectors} catalogue images, index ${info.index_version}`
      : info.error;
    $("keyrow").hidden = !info.api_key_required;
  } catch (err) {
    $("status").textContent = "server unreachable";
  }
}

function choose(file) {
  if (!file) return;
  state.file = file;
  state.box = null;
  URL.revokeObjectURL($("photo").src);
  $("photo").src = URL.createObjectURL(file);
  $("stage").hidden = false;
  $("search").disabled = false;
  drawBox();
  say("");
}

// Scale from the photo as shown to the photo's own pixels (boxes are sent in those).
function scale() {
  const photo = $("photo");
  const rect = photo.getBoundingClientRect();
  return { rect, sx: photo.naturalWidth / rect.width, sy: photo.naturalHeight / rect.height };
}

function pointer(event) {
  const { rect } = scale();
  const clamp = (v, hi) => Math.min(Math.max(v, 0), hi);
  return { x: clamp(event.clientX - rect.left, rect.width), y: clamp(event.clientY - rect.top, rect.height) };
}

// A box in shown pixels from two corners -> the photo's pixels.
function toPhoto(a, b) {
  const { sx, sy } = scale();
  const x = Math.min(a.x, b.x), y = Math.min(a.y, b.y);
  const w = Math.abs(a.x - b.x), h = Math.abs(a.y - b.y);
  return [x * sx, y * sy, w * sx, h * sy].map(Math.round);
}

function drawBox() {
  const el = $("box");
  el.hidden = !state.box;
  $("whole").disabled = !state.box;
  if (!state.box) return;
  const { sx, sy } = scale();
  const [x, y, w, h] = state.box;
  Object.assign(el.style, { left: `${x / sx}px`, top: `${y / sy}px`, width: `${w / sx}px`, height: `${h / sy}px` });
}

function startDrag(event) {
  event.preventDefault();
  $("stage").setPointerCapture(event.pointerId);
  state.drag = pointer(event);
}

function moveDrag(event) {
  if (!state.drag) return;
  state.box = toPhoto(state.drag, pointer(event));
  drawBox();
}

function endDrag(event) {
  if (!state.drag) return;
  const box = toPhoto(state.drag, pointer(event));
  state.drag = null;
  state.box = box[2] >= 4 && box[3] >= 4 ? box : null; // a click is not a box
  drawBox();
}

function showCrop() {
  const photo = $("photo");
  const [x, y, w, h] = state.box || [0, 0, photo.naturalWidth, photo.naturalHeight];
  const fit = 160 / Math.max(w, h);
  const canvas = $("crop");
  canvas.width = Math.max(1, Math.round(w * fit));
  canvas.height = Math.max(1, Math.round(h * fit));
  canvas.getContext("2d").drawImage(photo, x, y, w, h, 0, 0, canvas.width, canvas.height);
  $("crop-figure").hidden = false;
}

// Thumbnails are fetched rather than linked, so they carry the API key when there is one.
async function thumbnail(url) {
  const response = await fetch(url, { headers: authHeaders() });
  if (!response.ok) return null;
  const objectUrl = URL.createObjectURL(await response.blob());
  state.urls.push(objectUrl);
  return objectUrl;
}

async function showResults(results) {
  state.urls.forEach(URL.revokeObjectURL);
  state.urls = [];
  const items = await Promise.all(results.map(async (hit) => {
    const li = document.createElement("li");
    const img = document.createElement("img");
    img.alt = `catalogue image ${hit.seller_img_id}`;
    img.src = (await thumbnail(hit.image_url)) || "";
    const rank = Object.assign(document.createElement("span"), { className: "rank", textContent: `#${hit.rank}` });
    const product = Object.assign(document.createElement("div"), { className: "product", textContent: hit.product_id });
    const score = Object.assign(document.createElement("div"), { textContent: `score ${hit.score.toFixed(3)}` });
    li.append(img, rank, product, score);
    return li;
  }));
  $("results").replaceChildren(...items);
}

async function search() {
  if (!state.file) return;
  const form = new FormData();
  form.append("image", state.file);
  if (state.box) form.append("bbox", state.box.join(","));
  form.append("top_k", $("topk").value);
  $("search").disabled = true;
  say("Searching...");
  try {
    const response = await fetch("/v1/search", { method: "POST", body: form, headers: authHeaders() });
    const answer = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
    if (!response.ok) {
      say(answer.error, true);
      return;
    }
    showCrop();
    await showResults(answer.results);
    say(`${answer.results.length} matches in ${answer.took_ms} ms (index ${answer.index_version})`);
  } catch (err) {
    say(`search failed: ${err.message}`, true);
  } finally {
    $("search").disabled = false;
  }
}

function setUp() {
  $("file").addEventListener("change", (e) => choose(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    choose(e.dataTransfer.files[0]);
  });
  const stage = $("stage");
  stage.addEventListener("pointerdown", startDrag);
  stage.addEventListener("pointermove", moveDrag);
  stage.addEventListener("pointerup", endDrag);
  $("photo").addEventListener("load", drawBox);
  window.addEventListener("resize", drawBox);
  $("whole").addEventListener("click", () => { state.box = null; drawBox(); });
  $("search").addEventListener("click", search);
  showStatus();
}

setUp();
