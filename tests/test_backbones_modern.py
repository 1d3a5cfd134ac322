"""Xception, ViT, DINOv2, CLIP and SigLIP through the tool: each family builds, trains a step,
exports and indexes, on tiny random-weight architectures (keras-hub presets need the internet,
which tests do not have; keras.applications' Xception has no smaller variant, so it is the real
one at 72 px).

Random weights only prove the plumbing: shapes, normalisation, the graph the SavedModel carries,
the same vectors after a reload. Whether "red sneaker" finds red sneakers needs a pretrained
preset, which no test here downloads.

Cost (the file's budget is ~90 s on 2 cores): every family is trained, exported and indexed
once for the module (:func:`runs`) through the library functions the CLI calls, without
augmentation. The training step runs eagerly (``tf.config.run_functions_eagerly``): the same
``train_step`` code without tracing and optimising its backward graph (~20 s for Xception's 130
layers; compiled training is tests/test_train.py's); the forward graph is still traced, by the
export. Exports are compared in this process with their run's Keras embedder; only the tiny CLIP
export (with ``serve_text``) is reloaded in a fresh process (``vsearch export --check``), in the
background while the other families export and index.
"""

from __future__ import annotations

import io
import json
import string
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from helpers import invoke, write_tiny_config

from vsearch_tf import workflows
from vsearch_tf.config import load_config
from vsearch_tf.data.tables import read_gallery
from vsearch_tf.errors import VSearchError
from vsearch_tf.export import METADATA, TEXT_CHECK
from vsearch_tf.index import load_index
from vsearch_tf.models.backbones import BACKBONES, check_backbone
from vsearch_tf.models.embedder import build_embedder
from vsearch_tf.models.layers import PixelNormalization, TokenPooling

pytestmark = [
    # run_functions_eagerly (the training steps) says it leaves tf.data alone, as intended
    pytest.mark.filterwarnings("ignore:Even though the `tf.config.experimental_run_functions"),
    # DINOv2's mask token (masked-image pretraining) gets no gradient from retrieval training
    pytest.mark.filterwarnings("ignore:Gradients do not exist for variables .*mask_token"),
]

# family -> (model section, image size); CLIP and SigLIP keep their joint space (no projection)
FAMILIES = {
    "clip": ({"backbone": "clip_test_tiny", "pooling": "cls", "embedding_dim": 0}, 32),
    "siglip": ({"backbone": "siglip_test_tiny", "pooling": "map", "embedding_dim": 0}, 32),
    "vit": ({"backbone": "vit_test_tiny", "pooling": "mean", "embedding_dim": 16}, 32),
    "dinov2": ({"backbone": "dinov2_test_tiny", "pooling": "cls", "embedding_dim": 16}, 32),
    "xception": ({"backbone": "xception", "pooling": "gem", "embedding_dim": 16}, 72),
}
TEXT_FAMILIES = ("clip", "siglip")
# the joint-space widths of the tiny towers: CLIP's projection, SigLIP's hidden size
JOINT_DIM = {"clip": 24, "siglip": 32}


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


def write_siglip_tokenizer(folder: Path) -> Path:
    """A tiny SentencePiece model (``vocabulary.spm``, as keras-hub's SigLIP presets store it)
    trained here on a few sentences, with the pieces SigLIP's tokenizer expects: ``</s>`` (end
    and padding) and ``<unk>``. Training needs the sentencepiece package (the test extra);
    tokenizing in the graph needs only TensorFlow Text."""
    import sentencepiece

    sentences = [
        "red sneaker",
        "a black leather handbag with a gold chain",
        "blue cotton t-shirt",
        "white running shoes",
        "green wool scarf",
    ]
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=proto,
        vocab_size=32,
        model_type="unigram",
        normalization_rule_name="identity",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocabulary.spm").write_bytes(proto.getvalue())
    return folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    from vsearch_tf.demo import generate

    root = tmp_path_factory.mktemp("modern")
    generate(root / "data", n_train=4, n_val=1, n_test=2, users_per_product=2, seed=5)
    write_clip_tokenizer(root / "tokenizers" / "clip")
    write_siglip_tokenizer(root / "tokenizers" / "siglip")
    return root


def _train(workspace: Path, family: str) -> dict:
    """One training step of ``family`` (``vsearch train``'s library call), run eagerly."""
    import tensorflow as tf

    model, size = FAMILIES[family]
    root = workspace / family
    root.mkdir()
    model = {**model, "weights": "none"}
    if family in TEXT_FAMILIES:
        model["text_tokenizer"] = str(workspace / "tokenizers" / family)
    config = write_tiny_config(
        root,
        {
            "root": str(workspace / "data"),
            "train_csv": "train.csv",
            "image_size": size,
            "augment": 0.0,
            "box_jitter": 0.0,
        },
        model=model,
        train={"epochs": 1, "steps_per_epoch": 1},
    )
    tf.config.run_functions_eagerly(True)
    try:
        summary = workflows.train(config, show_progress=False)
    finally:
        tf.config.run_functions_eagerly(False)
    return {"family": family, "root": root, "config": config, "run": Path(summary["run_dir"])}


def _export_index(workspace: Path, run: dict) -> dict:
    """``vsearch export`` (CLIP and SigLIP with ``--text``) and ``vsearch index`` of ``run``."""
    family, root = run["family"], run["root"]
    exported = workflows.export(run["run"], family, root=root / "sm", text=family in TEXT_FAMILIES)
    manifest = workflows.index_build(
        exported["path"], workspace / "data" / "gallery.csv", None, root / "index"
    )
    return {**run, "model": Path(exported["path"]), "index": root / "index", "manifest": manifest}


@pytest.fixture(scope="module")
def load_once():
    """``load_exported`` memoised by version folder for the module, where index, query and serve
    look it up (``vsearch_tf.litert.load_model``, ``vsearch_tf.serving.state``): each export is
    read from disk once, by the ``vsearch index`` that builds its index, and the tests after it
    query the same loaded SavedModel (loading one with ``serve_text`` costs seconds)."""
    from vsearch_tf import export, litert
    from vsearch_tf.serving import state

    cache: dict[Path, export.ExportedModel] = {}

    def load(path):
        key = export.resolve_version(path).resolve()
        if key not in cache:
            cache[key] = export.load_exported(key)
        return cache[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(litert, "load_exported", load)
        patch.setattr(state, "load_exported", load)
        yield load


@pytest.fixture(scope="module")
def runs(workspace, load_once) -> dict[str, dict]:
    """Every family trained for one step, exported (CLIP and SigLIP with ``serve_text``) and
    indexed, once for the module. ``runs["clip"]["check"]`` is the fresh-process check of the
    CLIP export (``workflows.check_model``), run while the other families export and index: not
    during a training step, since ``run_functions_eagerly`` is global and the check's Keras
    reference must run as a graph, like the SavedModel it is compared with."""
    from concurrent.futures import ThreadPoolExecutor

    trained = {family: _train(workspace, family) for family in FAMILIES}
    found = {"clip": _export_index(workspace, trained["clip"])}
    with ThreadPoolExecutor(1) as pool:
        check = pool.submit(workflows.check_model, found["clip"]["model"])
        for family in list(FAMILIES)[1:]:
            found[family] = _export_index(workspace, trained[family])
        found["clip"]["check"] = check.result()
    return found


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_trains_a_step_exports_and_indexes(runs, workspace, load_once, family):
    run = runs[family]
    model, size = FAMILIES[family]
    # One training step, with a finite loss, that moved the backbone off its initialisation: the
    # same seeded build (deterministic: weights without a gradient, such as DINOv2's mask token,
    # are still equal). Not for Xception, whose 88 MB model takes seconds to rebuild and reload:
    # its CNN training path is tests/test_train.py's, with MobileNet.
    metrics = pd.read_csv(run["run"] / "metrics.csv")
    assert len(metrics) == 1 and np.isfinite(metrics["loss"]).all()
    if family != "xception":
        trained = keras.saving.load_model(run["run"] / "embedder.keras", compile=False)
        keras.utils.set_random_seed(load_config(run["config"]).run.seed)
        initial = build_embedder(
            model["backbone"], size, model["embedding_dim"], model["pooling"], "none"
        )
        pairs = list(zip(trained.trainable_weights, initial.trainable_weights, strict=True))
        moved = [not np.allclose(a.numpy(), b.numpy()) for a, b in pairs]
        assert sum(moved) >= 0.9 * len(moved), [a.path for (a, _), m in zip(pairs, moved) if not m]
        assert moved[0]  # the backbone's first layer (the patch embedding) learned
    # The index holds, for every gallery photo, a unit vector of the model's width...
    gallery = read_gallery(workspace / "data" / "gallery.csv")
    index = load_index(run["index"])
    assert index.count == len(gallery) == run["manifest"]["count"]
    metadata = json.loads((run["model"] / METADATA).read_text())
    dim = model["embedding_dim"] or JOINT_DIM[family]
    assert index.dim == dim == metadata["embedding_dim"]
    assert metadata["backbone"] == model["backbone"]
    assert metadata["text"] == (family in TEXT_FAMILIES)
    np.testing.assert_allclose(np.linalg.norm(index.embeddings, axis=1), 1.0, atol=1e-5)
    if family == "xception":
        return  # ...its export is a CNN's, which tests/test_export.py checks in a fresh process
    # ...and the SavedModel (as loaded by that index build) is the trained Keras embedder: the
    # same vectors for the same pixels (eager Keras kernels differ from the graph's by ~1e-5),
    # different vectors for different photos.
    pixels = np.random.default_rng(0).uniform(0, 255, (3, size, size, 3)).astype(np.float32)
    served = load_once(run["model"]).embed_pixels(pixels).numpy()
    np.testing.assert_allclose(served, trained(pixels, training=False).numpy(), atol=1e-4)
    assert index.embeddings.std(axis=0).max() > 1e-2


def test_clip_text_export_reloads_in_a_fresh_process_with_the_same_outputs(runs):
    """The one fresh-process reload of this file (``vsearch export --check``): every signature of
    the tiny CLIP export, ``serve_text`` included, served from a new interpreter (TensorFlow and
    TF Text only, no vsearch code), equals the Keras embedder and text tower within 1e-5, and
    ``serve_text`` gives vectors of the image embedding's width. The weights are random, so this
    proves the text path's plumbing end to end (tokenizer and towers inside the SavedModel), not
    that a text finds the right photos."""
    report = runs["clip"]["check"]  # workflows.check_model, run by the fixture
    assert report["ok"], report["problem"]
    checks = [c["check"] for c in report["checks"]]
    assert any(c.startswith("serve_text") for c in checks)
    assert any(c.startswith("serve_pixels") for c in checks)
    outputs = {
        row["signature"]: row["shape"]
        for row in report["signatures"]
        if row["kind"] == "output" and row["name"] == "embedding"
    }
    width = JOINT_DIM["clip"]
    assert outputs == {
        name: [-1, width] for name in ("serving_default", "serve_pixels", "serve_text")
    }


def _check_text_embeddings(exported, family: str) -> None:
    """Plumbing only (random weights): text vectors have the image vectors' width and unit norm,
    different texts differ, and the SavedModel's ``serve_text`` gives the vectors the eager Keras
    text tower gave at export."""
    assert exported.metadata["text"] is True and exported.has_text
    stored = json.loads((exported.path / TEXT_CHECK).read_text())
    text = exported.embed_text(stored["texts"]).numpy()
    np.testing.assert_allclose(text, np.asarray(stored["embedding"]), atol=1e-5)
    image = exported.embed_pixels(np.zeros((1, 32, 32, 3), np.float32)).numpy()
    assert (
        text.shape == (len(stored["texts"]), JOINT_DIM[family])
        and image.shape[1] == JOINT_DIM[family]
    )
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1.0, atol=1e-5)
    assert np.abs(text[0] - text[1]).max() > 1e-4


def test_clip_search_by_text_api_and_embeddings(runs):
    """``{"text": ...}`` on ``/v1/search``; then the text vectors of the model the service
    loaded (one load of the CLIP export for both)."""
    from fastapi.testclient import TestClient

    from vsearch_tf.serving import SearchService, create_app

    service = SearchService(runs["clip"]["index"], max_batch=4, batch_wait_ms=2)
    with TestClient(create_app(service)) as client:
        answer = client.post("/v1/search", json={"text": "red sneaker", "top_k": 2})
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["results"]) == 2
        bad = client.post("/v1/search", json={"text": "", "top_k": 2})
        assert bad.status_code == 400 and "text: expected a non-empty string" in bad.text
        extra = client.post("/v1/search", json={"text": "red", "bbox": [0, 0, 1, 1]})
        assert extra.status_code == 400 and "unknown field 'bbox'" in extra.text
    _check_text_embeddings(service.holder.current.model, "clip")


def test_siglip_text_embeddings_through_its_sentencepiece_tokenizer(runs, load_once):
    """SigLIP's text path: the SentencePiece tokenizer (TF Text's op, the proto in the graph)
    and the text tower in ``serve_text``."""
    _check_text_embeddings(load_once(runs["siglip"]["model"]), "siglip")


def test_query_by_text_returns_gallery_hits(runs):
    answer = workflows.query_text(runs["clip"]["index"], ["red sneaker", "blue"], top_k=3)
    assert [q["text"] for q in answer["queries"]] == ["red sneaker", "blue"]
    for query in answer["queries"]:
        hits = query["results"]
        assert len(hits) == 3 and [h["rank"] for h in hits] == [1, 2, 3]
        assert all(-1.0 - 1e-5 <= h["score"] <= 1.0 + 1e-5 for h in hits)
        assert hits[0]["score"] >= hits[-1]["score"]


def test_query_text_is_refused_for_a_model_without_serve_text(runs):
    with pytest.raises(VSearchError, match="no serve_text signature"):
        workflows.query_text(runs["vit"]["index"], ["red sneaker"])


def test_text_export_is_refused_where_text_and_image_spaces_differ(runs, workspace):
    with pytest.raises(VSearchError, match="has no text tower"):
        workflows.export(runs["vit"]["run"], "x", root=workspace / "no", text=True)
    with pytest.raises(VSearchError, match="--flip / --localizer / --text"):
        workflows.export(
            runs["clip"]["run"], "x", root=workspace / "no", text=True, format="litert"
        )


# ----------------------------------------------------------------------- refusals, registry


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


def test_localizer_refuses_a_backbone_without_a_feature_map():
    from vsearch_tf.models.localizer import build_localizer

    with pytest.raises(VSearchError, match="config key localizer.backbone: vit_test_tiny"):
        build_localizer("vit_test_tiny", 32, "none")


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


# The image processors the keras-hub presets were converted from (their converters' scale and
# offset are 1 / 255 / std and -mean / std): ViT's and SigLIP's 0.5 / 0.5, DINOv2's ImageNet
# mean / std, OpenAI CLIP's own.
PRESET_MEAN_STD = {
    "vit_base_patch16_224": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "dinov2_small": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip_vit_base_patch16": (
        (0.48145466, 0.4578275, 0.40821073),
        (0.26862954, 0.26130258, 0.27577711),
    ),
    "siglip_base_patch16_224": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


@pytest.mark.parametrize("backbone", sorted(PRESET_MEAN_STD))
def test_normalisation_is_the_presets(backbone):
    """``weights: none`` (and the README table) normalise as the preset does; ``weights:
    imagenet`` reads the preset's converter into the ``affine`` mode, checked here on the
    arguments such a converter holds."""
    mean, std = (np.array(v, np.float32) for v in PRESET_MEAN_STD[backbone])
    pixels = np.random.default_rng(1).uniform(0, 255, (2, 4, 4, 3)).astype(np.float32)
    expected = (pixels / 255.0 - mean) / std
    spec = BACKBONES[backbone]
    got = PixelNormalization(spec.normalization)(pixels).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    affine = PixelNormalization("affine", list(1 / 255 / std), list(-mean / std))(pixels)
    np.testing.assert_allclose(affine.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_mean_pooling_leaves_the_cls_and_register_tokens_out():
    tokens = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
    np.testing.assert_allclose(TokenPooling("cls")(tokens).numpy(), tokens[:, 0])
    np.testing.assert_allclose(
        TokenPooling("mean", prefix_tokens=2)(tokens).numpy(), tokens[:, 2:].mean(axis=1)
    )
