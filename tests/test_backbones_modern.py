"""ViT, DINOv2, CLIP, SigLIP and Xception through the whole tool: each family builds, trains,
exports (checked in a fresh process against Keras) and indexes, on tiny random-weight
architectures (keras-hub presets need the internet, which tests do not have).

The text path (``serve_text``) is checked on a tiny CLIP with a vocabulary made here. With random
weights a text embedding means nothing, so these tests prove the plumbing only: the tokenizer
traces into the SavedModel, the text and image vectors share dimension and normalisation, a
fresh process gives the Keras text tower's vectors, and ``vsearch query --text`` returns hits.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pytest
from helpers import invoke, write_tiny_config

from vsearch_tf.config import load_config
from vsearch_tf.errors import VSearchError
from vsearch_tf.models.backbones import BACKBONES, check_backbone
from vsearch_tf.models.embedder import build_embedder
from vsearch_tf.models.layers import TokenPooling

# family -> (model section, image size)
FAMILIES = {
    "vit": ({"backbone": "vit_test_tiny", "pooling": "mean", "embedding_dim": 16}, 32),
    "dinov2": ({"backbone": "dinov2_test_tiny", "pooling": "cls", "embedding_dim": 16}, 32),
    "clip": ({"backbone": "clip_test_tiny", "pooling": "cls", "embedding_dim": 0}, 32),
    "siglip": ({"backbone": "siglip_test_tiny", "pooling": "map", "embedding_dim": 0}, 32),
    "xception": ({"backbone": "xception", "pooling": "gem", "embedding_dim": 16}, 72),
}


def write_clip_tokenizer(folder: Path) -> Path:
    """A tiny CLIP BPE vocabulary: letters, letters ending a word, a few merges, and the two
    special tokens last (CLIP's text pooler finds the end token as the largest id)."""
    letters = list(string.ascii_lowercase)
    merged = {"r e": "re", "re d</w>": "red</w>", "s n": "sn", "e a": "ea", "k e": "ke"}
    tokens = letters + [c + "</w>" for c in letters] + list(merged.values())
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocabulary.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merged) + "\n")
    return folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    from vsearch_tf.demo import generate

    root = tmp_path_factory.mktemp("modern")
    generate(root / "data", n_train=4, n_val=1, n_test=4, users_per_product=2, seed=5)
    write_clip_tokenizer(root / "clip_tokenizer")
    return root


_RUNS: dict[str, dict] = {}


def run_family(workspace: Path, family: str) -> dict:
    """``family`` trained for an epoch, exported (CLIP with --text) and indexed; once per module
    (the parametrised fixture and the text tests share the runs)."""
    if family in _RUNS and _RUNS[family]["workspace"] == workspace:
        return _RUNS[family]
    model, size = FAMILIES[family]
    root = workspace / family
    root.mkdir()
    model = {**model, "weights": "none"}
    if family == "clip":
        model["text_tokenizer"] = str(workspace / "clip_tokenizer")
    config = write_tiny_config(
        root,
        {"root": str(workspace / "data"), "train_csv": "train.csv", "image_size": size},
        model=model,
        train={"epochs": 1},
    )
    result = invoke("train", "--config", config, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    run = Path(summary["run_dir"])
    export = ["export", run, "--name", family, "--root", root / "sm", "--json"]
    result = invoke(*export, *(["--text"] if family == "clip" else []))
    assert result.exit_code == 0, result.output
    gallery = workspace / "data" / "gallery.csv"
    result = invoke(
        "index", "--model", root / "sm" / family, "--gallery", gallery, "--out", root / "index"
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((root / "index" / "manifest.json").read_text())
    _RUNS[family] = {
        "workspace": workspace,
        "family": family,
        "run": run,
        "summary": summary,
        "root": root,
        "model": root / "sm" / family,
        "index": root / "index",
        "manifest": manifest,
    }
    return _RUNS[family]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_run(request, workspace) -> dict:
    return run_family(workspace, request.param)


@pytest.fixture(scope="module")
def clip_run(workspace) -> dict:
    return run_family(workspace, "clip")


def test_each_family_trains_exports_checks_and_indexes(family_run):
    model, _ = FAMILIES[family_run["family"]]
    assert family_run["summary"]["epochs"] == 1
    assert np.isfinite(json.loads((family_run["run"] / "summary.json").read_text())["seconds"])
    manifest = family_run["manifest"]
    assert manifest["count"] > 0
    if model["embedding_dim"]:
        assert manifest["dim"] == model["embedding_dim"]
    # The SavedModel, served from a fresh process, gives the Keras embedder's vectors.
    result = invoke("export", "--check", family_run["root"] / "sm" / family_run["family"], "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"], report["checks"]
    if family_run["family"] == "clip":
        assert any(c["check"].startswith("serve_text") for c in report["checks"])


@pytest.mark.parametrize(
    "backbone, pooling, size, message",
    [
        ("vit_test_tiny", "gem", 32, "model.pooling: backbone vit_test_tiny outputs tokens"),
        ("dinov2_test_tiny", "avg", 32, "pooling must be cls or mean, got 'avg'"),
        ("clip_test_tiny", "mean", 32, "outputs its pretrained pooled embedding"),
        ("mobilenet", "cls", 32, "outputs a feature map, so pooling must be gem or avg"),
        ("vit_test_tiny", "cls", 36, "data.image_size: backbone vit_test_tiny cuts 8 px patches"),
        ("xception", "gem", 32, "data.image_size: backbone xception needs at least 71 px"),
    ],
)
def test_nonsense_pooling_or_size_is_refused_naming_the_key(backbone, pooling, size, message):
    with pytest.raises(VSearchError, match="config key") as err:
        check_backbone(backbone, size, pooling, "none")
    assert message in str(err.value)


def test_preset_weights_need_the_pretrained_size():
    with pytest.raises(VSearchError, match="position embeddings are for 224 px, got 256"):
        check_backbone("vit_base_patch16_224", 256, "cls", "imagenet")
    with pytest.raises(VSearchError, match="architecture only"):
        build_embedder("vit_test_tiny", 32, 8, pooling="cls", weights="imagenet")


def test_train_refuses_gem_on_tokens_before_any_work(tmp_path):
    config = write_tiny_config(
        tmp_path, {"train_csv": "nope.csv"}, model={"backbone": "vit_test_tiny", "pooling": "gem"}
    )
    result = invoke("train", "--config", config)
    assert result.exit_code == 2 and "config key model.pooling" in result.output


def test_registry_lists_the_families_with_their_presets():
    expected = {
        "xception": None,
        "vit_base_patch16_224": "vit_base_patch16_224_imagenet",
        "dinov2_small": "dinov2_small",
        "clip_vit_base_patch16": "clip_vit_base_patch16",
        "siglip_base_patch16_224": "siglip_base_patch16_224",
    }
    for name, preset in expected.items():
        assert BACKBONES[name].preset == preset
    assert BACKBONES["clip_vit_base_patch16"].text and not BACKBONES["vit_test_tiny"].text
    assert load_config(None, ["model.pooling=cls"]).model.pooling == "cls"


def test_mean_pooling_leaves_the_cls_and_register_tokens_out():
    tokens = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
    np.testing.assert_allclose(TokenPooling("cls")(tokens).numpy(), tokens[:, 0])
    np.testing.assert_allclose(
        TokenPooling("mean", prefix_tokens=2)(tokens).numpy(), tokens[:, 2:].mean(axis=1)
    )


# ------------------------------------------------------------------------------- search by text


def test_text_and_image_embeddings_share_dimension_and_normalisation(clip_run):
    """Plumbing only (random weights): shapes and norms. That the SavedModel's serve_text gives
    the Keras text tower's vectors in a fresh process is ``export --check``'s serve_text row
    (test_each_family_trains_exports_checks_and_indexes[clip]). Whether "red sneaker" finds red
    sneakers needs the pretrained preset."""
    from vsearch_tf.export import load_exported

    exported = load_exported(clip_run["model"])
    assert exported.metadata["text"] is True
    here = exported.embed_text(["red sneaker", "snake", "keras red"]).numpy()
    image = exported.embed_pixels(np.zeros((1, 32, 32, 3), np.float32)).numpy()
    assert here.shape == (3, image.shape[1]) == (3, 24)  # clip_test_tiny's projection width
    np.testing.assert_allclose(np.linalg.norm(here, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1.0, atol=1e-5)
    assert np.abs(here[0] - here[1]).max() > 1e-4  # different texts, different vectors


def test_query_by_text_returns_gallery_hits(clip_run):
    result = invoke(
        "query", "--index", clip_run["index"], "--text", "red sneaker", "--top-k", "3", "--json"
    )
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    hits = answer["queries"][0]["results"]
    assert answer["queries"][0]["text"] == "red sneaker" and len(hits) == 3
    assert all(-1.0 - 1e-5 <= h["score"] <= 1.0 + 1e-5 for h in hits)


def test_text_export_is_refused_where_text_and_image_spaces_differ(workspace):
    vit = run_family(workspace, "vit")
    result = invoke("export", vit["run"], "--name", "x", "--root", workspace / "no", "--text")
    assert result.exit_code == 2 and "has no text tower" in result.output


def test_search_api_accepts_text(clip_run):
    from fastapi.testclient import TestClient

    from vsearch_tf.serving import SearchService, create_app

    service = SearchService(clip_run["index"], max_batch=4, batch_wait_ms=2)
    with TestClient(create_app(service)) as client:
        answer = client.post("/v1/search", json={"text": "red sneaker", "top_k": 2})
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["results"]) == 2
        bad = client.post("/v1/search", json={"text": "", "top_k": 2})
        assert bad.status_code == 400 and "text: expected a non-empty string" in bad.text
        extra = client.post("/v1/search", json={"text": "red", "bbox": [0, 0, 1, 1]})
        assert extra.status_code == 400 and "unknown field 'bbox'" in extra.text
