"""The ArcFace head and the contrastive, triplet semi-hard and XBM losses against plain numpy
references."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from vsearch_tf.config import Config
from vsearch_tf.losses import (
    XBM,
    ContrastiveLoss,
    TripletSemiHardLoss,
    build_pair_loss,
    contrastive_loss,
)
from vsearch_tf.models.heads import ArcFace, adaptive_margins

EPS = 1e-7


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def random_unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    return unit(rng.normal(size=(n, d))).astype(np.float32)


# ---------------------------------------------------------------- numpy references


def np_arcface(emb, kernel, labels, num_classes, k, scale, margins):
    cos = unit(emb.astype(np.float64)) @ unit(kernel.astype(np.float64)).T
    cos = np.clip(cos.reshape(len(emb), num_classes, k).max(-1), -1 + EPS, 1 - EPS)
    if labels is None:
        return scale * cos
    out = cos.copy()
    for i, y in enumerate(labels):
        m, c = margins[y], cos[i, y]
        theta = math.acos(c)
        out[i, y] = math.cos(theta + m) if theta + m < math.pi else c - math.sin(math.pi - m) * m
    return scale * out


def np_contrastive(emb, labels, ref_emb, ref_labels, margin=0.5):
    """Line by line the research-xbm ContrastiveLoss.forward."""
    sim = emb.astype(np.float64) @ ref_emb.astype(np.float64).T
    total = 0.0
    for i in range(len(emb)):
        pos = sim[i][labels[i] == ref_labels]
        pos = pos[pos < 1 - 1e-5]
        neg = sim[i][labels[i] != ref_labels]
        neg = neg[neg > margin]
        total += np.sum(1 - pos) + np.sum(neg)
    return total / len(emb)


def np_triplet_semihard(emb, labels, margin=1.0):
    e = emb.astype(np.float64)
    d = ((e[:, None, :] - e[None, :, :]) ** 2).sum(-1)
    total, pairs = 0.0, 0
    for a in range(len(e)):
        negs = d[a][labels != labels[a]]
        for p in range(len(e)):
            if p == a or labels[p] != labels[a]:
                continue
            outside = negs[negs > d[a, p]]
            d_an = outside.min() if outside.size else (negs.max() if negs.size else 0.0)
            total += max(margin + d[a, p] - d_an, 0.0)
            pairs += 1
    return total / pairs if pairs else 0.0


# ---------------------------------------------------------------- ArcFace


def make_arcface(emb_dim=8, **kwargs) -> ArcFace:
    layer = ArcFace(**kwargs)
    layer.build((None, emb_dim))
    return layer


@pytest.mark.parametrize("k", [1, 3])
def test_arcface_matches_numpy(k):
    rng = np.random.default_rng(k)
    layer = make_arcface(num_classes=5, sub_centers=k, scale=30.0, margin=0.5)
    emb = random_unit(rng, 7, 8)
    labels = np.array([0, 1, 2, 3, 4, 0, 2])
    kernel = layer.kernel.numpy()
    margins = np.full(5, 0.5)
    got = layer(emb, tf.constant(labels)).numpy()
    np.testing.assert_allclose(got, np_arcface(emb, kernel, labels, 5, k, 30.0, margins), atol=2e-4)
    got = layer(emb).numpy()
    np.testing.assert_allclose(got, np_arcface(emb, kernel, None, 5, k, 30.0, margins), atol=2e-4)


def test_arcface_fallback_when_theta_plus_margin_exceeds_pi():
    layer = make_arcface(emb_dim=2, num_classes=2, scale=10.0, margin=0.5)
    layer.kernel.assign(np.array([[1.0, 0.0], [0.0, 1.0]], np.float32))
    angle = math.pi - 0.25  # theta + m > pi, but cos is not at the clip
    emb = np.array([[-1.0, 0.0], [math.cos(angle), math.sin(angle)], [1.0, 1.0]], np.float32)
    labels = np.array([0, 0, 0])
    got = layer(emb, tf.constant(labels)).numpy()
    want = np_arcface(emb, layer.kernel.numpy(), labels, 2, 1, 10.0, np.full(2, 0.5))
    np.testing.assert_allclose(got, want, atol=1e-4)
    mm = math.sin(math.pi - 0.5) * 0.5
    assert got[0, 0] == pytest.approx(10 * (-1 - mm), abs=1e-4)
    assert got[1, 0] == pytest.approx(10 * (math.cos(angle) - mm), abs=1e-4)
    assert got[2, 0] == pytest.approx(10 * math.cos(math.pi / 4 + 0.5), abs=1e-4)


def test_adaptive_margins_rare_classes_get_larger_margins():
    counts = [1, 16, 81, 10000]
    margins = adaptive_margins(counts, 0.2, 0.5)
    x = np.array(counts, float) ** -0.25
    np.testing.assert_allclose(margins, 0.2 + 0.3 * (x - x.min()) / (x.max() - x.min()), rtol=1e-6)
    assert margins[0] == pytest.approx(0.5) and margins[-1] == pytest.approx(0.2)
    np.testing.assert_allclose(adaptive_margins([3, 3], 0.2, 0.5), [0.5, 0.5])

    rng = np.random.default_rng(0)
    layer = make_arcface(num_classes=4, margin_min=0.2, margin_max=0.5, class_counts=counts)
    np.testing.assert_allclose(layer.margins, margins)
    emb, labels = random_unit(rng, 6, 8), np.array([0, 1, 2, 3, 3, 0])
    got = layer(emb, tf.constant(labels)).numpy()
    want = np_arcface(emb, layer.kernel.numpy(), labels, 4, 1, 30.0, margins)
    np.testing.assert_allclose(got, want, atol=2e-4)


def test_arcface_gradients_finite_at_cos_plus_minus_one():
    layer = make_arcface(emb_dim=4, num_classes=3, sub_centers=2)
    w = layer.kernel.numpy()
    emb = tf.Variable(np.stack([w[0], -w[2], -w[4]]))  # cos = +1, -1, -1 with its own class
    labels = tf.constant([0, 1, 2])
    with tf.GradientTape() as tape:
        logits = layer(emb, labels)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, logits)
    grads = tape.gradient(loss, [emb, layer.kernel.value])
    assert all(np.isfinite(g.numpy()).all() for g in grads)
    assert np.isfinite(logits.numpy()).all()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_arcface_low_precision_inputs_give_float32(dtype):
    rng = np.random.default_rng(1)
    layer = make_arcface(num_classes=5)
    low = tf.cast(random_unit(rng, 4, 8), dtype)
    labels = tf.constant([0, 1, 2, 3])
    out = layer(low, labels)
    assert out.dtype == tf.float32
    want = layer(tf.cast(low, tf.float32), labels).numpy()
    np.testing.assert_allclose(out.numpy(), want, atol=1e-5)
    mixed = ArcFace(5, dtype=f"mixed_{dtype}")
    assert mixed(low, labels).dtype == tf.float32 and mixed(low).dtype == tf.float32


def test_arcface_config_round_trip():
    counts = np.array([5, 1, 20])
    layer = make_arcface(
        num_classes=3,
        scale=16.0,
        sub_centers=2,
        margin_min=0.1,
        margin_max=0.4,
        class_counts=counts,
    )
    config = layer.get_config()
    assert config["class_counts"] == [5, 1, 20]
    json.dumps(config)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(clone, ArcFace) and clone.get_config() == config
    assert clone.built  # from the serialised build config
    clone.set_weights(layer.get_weights())
    emb, labels = random_unit(np.random.default_rng(2), 3, 8), tf.constant([2, 1, 0])
    np.testing.assert_allclose(clone(emb, labels).numpy(), layer(emb, labels).numpy())
    with pytest.raises(ValueError):
        ArcFace(3, margin_min=0.1, margin_max=0.4)


# ---------------------------------------------------------------- contrastive, triplet


def test_contrastive_known_value():
    a = math.radians(60)
    emb = np.array([[1, 0], [math.cos(a), math.sin(a)], [0, 1]], np.float32)
    labels = np.array([0, 0, 1])
    # rows: 0.5 (positive at s=0.5), 0.5 + 0.866 (positive, negative above 0.5), 0.866
    want = (1 + 2 * math.sin(a)) / 3
    assert float(ContrastiveLoss()(labels, emb)) == pytest.approx(want, abs=1e-6)


def test_contrastive_matches_reference():
    rng = np.random.default_rng(3)
    emb, labels = random_unit(rng, 12, 4), rng.integers(0, 3, 12)
    emb[5] = emb[2]  # an exact duplicate pair is not a positive, as in the reference
    labels[5] = labels[2]
    for margin in (0.0, 0.5):
        got = float(ContrastiveLoss(margin=margin)(labels, emb))
        assert got == pytest.approx(np_contrastive(emb, labels, emb, labels, margin), abs=1e-5)
    ref, ref_labels = random_unit(rng, 9, 4), rng.integers(0, 3, 9)
    got = float(tf.reduce_mean(contrastive_loss(labels, emb, ref_labels, ref)))
    assert got == pytest.approx(np_contrastive(emb, labels, ref, ref_labels), abs=1e-5)
    config = ContrastiveLoss(margin=0.3).get_config()
    assert ContrastiveLoss.from_config(config).margin == 0.3


def test_triplet_semihard_known_value():
    emb = np.array([[0.0], [1.0], [2.0], [4.0]], np.float32)
    labels = np.array([0, 0, 1, 1])
    # Squared distances d01=1 d02=4 d03=16 d12=1 d13=9 d23=4; only (2, 3) has no semi-hard
    # negative and takes the farthest one, d20=4: max(1 + 4 - 4, 0) = 1, over 4 positive pairs.
    assert float(TripletSemiHardLoss()(labels, emb)) == pytest.approx(0.25)
    assert np_triplet_semihard(emb, labels) == pytest.approx(0.25)


def test_triplet_semihard_matches_reference():
    rng = np.random.default_rng(4)
    emb, labels = random_unit(rng, 10, 5), rng.integers(0, 3, 10)
    for margin in (0.2, 1.0):
        got = float(TripletSemiHardLoss(margin=margin)(labels, emb))
        assert got == pytest.approx(np_triplet_semihard(emb, labels, margin), abs=1e-5)
    low = tf.cast(emb, tf.bfloat16)
    assert TripletSemiHardLoss()(labels, low).dtype == tf.float32
    assert float(TripletSemiHardLoss()(np.arange(4), emb[:4])) == 0.0  # no positives: 0, not NaN
    same = np.zeros(4, int)  # no negatives: the farthest negative counts as distance 0
    assert float(TripletSemiHardLoss()(same, emb[:4])) == pytest.approx(
        np_triplet_semihard(emb[:4], same), abs=1e-5
    )


def test_build_pair_loss_follows_the_config():
    cfg = Config()
    assert build_pair_loss(cfg) is None
    cfg.loss.pair, cfg.loss.pair_margin = "triplet", 0.3
    triplet = build_pair_loss(cfg)
    assert isinstance(triplet, TripletSemiHardLoss) and triplet.margin == pytest.approx(0.3)
    cfg.loss.pair = "contrastive"
    assert isinstance(build_pair_loss(cfg), ContrastiveLoss)
    cfg.loss.xbm_size, cfg.model.embedding_dim = 16, 8
    xbm = build_pair_loss(cfg)
    assert isinstance(xbm, XBM) and (xbm.memory_size, xbm.embedding_dim) == (16, 8)
    assert xbm.margin == pytest.approx(0.3)


# ---------------------------------------------------------------- XBM


def test_xbm_enqueue_wraps_and_reports_only_filled_part():
    xbm = XBM(memory_size=5, embedding_dim=2)
    emb, labels = xbm.memory()
    assert emb.shape == (0, 2) and labels.shape == (0,)

    def batch(start: int, n: int) -> np.ndarray:
        return np.arange(start, start + n, dtype=np.float32)[:, None] * [1, -1]

    xbm.enqueue(batch(0, 3), np.array([0, 0, 1]))  # label 0 is a real label
    emb, labels = xbm.memory()
    np.testing.assert_array_equal(emb.numpy()[:, 0], [0, 1, 2])
    np.testing.assert_array_equal(labels.numpy(), [0, 0, 1])
    assert (int(xbm.pointer), int(xbm.filled)) == (3, 3)
    xbm.enqueue(batch(3, 3), np.array([2, 0, 3]))  # crosses the end: slots 3, 4, 0
    emb, labels = xbm.memory()
    np.testing.assert_array_equal(emb.numpy()[:, 0], [5, 1, 2, 3, 4])
    np.testing.assert_array_equal(labels.numpy(), [3, 0, 1, 2, 0])
    assert (int(xbm.pointer), int(xbm.filled)) == (1, 5)
    xbm.enqueue(batch(10, 7), np.arange(7))  # larger than the memory: the last 5 rows
    emb, _ = xbm.memory()
    np.testing.assert_array_equal(emb.numpy()[:, 0], [16, 12, 13, 14, 15])
    assert (int(xbm.pointer), int(xbm.filled)) == (1, 5)


def test_xbm_loss_warm_up_and_reference_value():
    rng = np.random.default_rng(5)
    xbm = XBM(memory_size=20, embedding_dim=4, weight=0.5, start_step=3)  # 16 filled
    past, past_labels = random_unit(rng, 10, 4), rng.integers(0, 3, 10)
    xbm.enqueue(past, past_labels)
    emb, labels = random_unit(rng, 6, 4), rng.integers(0, 3, 6)
    xbm.enqueue(emb, labels)  # reference order: enqueue, then the loss
    mem = np.concatenate([past, emb]), np.concatenate([past_labels, labels])
    batch_term = np_contrastive(emb, labels, emb, labels)
    memory_term = np_contrastive(emb, labels, *mem)
    assert memory_term > 0
    assert float(xbm.loss(emb, labels, step=2)) == pytest.approx(batch_term, abs=1e-5)
    want = batch_term + 0.5 * memory_term
    got = float(xbm.loss(emb, labels, step=tf.constant(3, tf.int64)))
    assert got == pytest.approx(want, abs=1e-5)

    x = tf.Variable(emb)
    with tf.GradientTape() as tape:
        loss = xbm.loss(x, labels, step=3)
    assert np.isfinite(tape.gradient(loss, x).numpy()).all()


def test_xbm_compiles_under_xla():
    """Keras compiles train_step with XLA on a single GPU (jit_compile="auto")."""
    xbm = XBM(memory_size=8, embedding_dim=4)
    emb, labels = random_unit(np.random.default_rng(6), 6, 4), np.array([0, 1, 0, 2, 1, 0])

    @tf.function(jit_compile=True)
    def step(x, y):
        xbm.enqueue(x, y)
        return xbm.loss(x, y, step=0)

    first = float(step(emb[:3], labels[:3]))
    assert first == pytest.approx(2 * np_contrastive(emb[:3], labels[:3], emb[:3], labels[:3]))
    second = float(step(emb[3:], labels[3:]))
    want = np_contrastive(emb[3:], labels[3:], emb[3:], labels[3:]) + np_contrastive(
        emb[3:], labels[3:], emb, labels
    )
    assert second == pytest.approx(want, abs=1e-5)


def test_xbm_is_saved_with_its_model(tmp_path):
    class Holder(keras.Model):
        def __init__(self):
            super().__init__()
            self.xbm = XBM(4, 3, start_step=7)

        def call(self, x):
            return x

    model, restored = Holder(), Holder()
    model(np.zeros((1, 3), np.float32))
    restored(np.zeros((1, 3), np.float32))
    model.xbm.enqueue(np.ones((3, 3), np.float32), np.array([0, 5, 7]))
    model.save_weights(tmp_path / "m.weights.h5")
    restored.load_weights(tmp_path / "m.weights.h5")
    emb, labels = restored.xbm.memory()
    np.testing.assert_array_equal(labels.numpy(), [0, 5, 7])
    assert int(restored.xbm.pointer) == 3
    assert XBM.from_config(model.xbm.get_config()).get_config() == model.xbm.get_config()


_MIRRORED = textwrap.dedent(
    """
    import json
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from vsearch_tf.losses import XBM

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        xbm = XBM(memory_size=6, embedding_dim=2)
    emb = np.array([[1, 0], [0, 1], [0.6, 0.8], [0.8, 0.6]], np.float32)
    labels = np.array([0, 1, 0, 1])
    data = tf.data.Dataset.from_tensor_slices((emb, labels)).batch(4)

    @tf.function
    def step(x, y):
        def replica_fn(x, y):
            xbm.enqueue(x, y)
            return xbm.loss(x, y, step=0)
        return strategy.run(replica_fn, (x, y))

    losses = [
        float(v) for v in strategy.experimental_local_results(
            step(*next(iter(strategy.experimental_distribute_dataset(data))))
        )
    ]
    copies = xbm.embeddings.value.values
    print(json.dumps({
        "losses": losses,
        "memory": [c.numpy().tolist() for c in copies],
        "labels": [c.numpy().tolist() for c in xbm.labels.value.values],
        "filled": int(xbm.filled.value.values[1].numpy()),
    }))
    """
)


def test_xbm_under_mirrored_strategy_gathers_replicas():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(
        [sys.executable, "-c", _MIRRORED],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    emb = np.array([[1, 0], [0, 1], [0.6, 0.8], [0.8, 0.6]], np.float32)
    labels = np.array([0, 1, 0, 1])
    assert result["filled"] == 4
    for memory, memory_labels in zip(result["memory"], result["labels"]):  # identical copies
        np.testing.assert_allclose(memory[:4], emb)
        assert memory_labels[:4] == labels.tolist()
    for replica, loss in enumerate(result["losses"]):
        part = slice(2 * replica, 2 * replica + 2)
        want = np_contrastive(emb[part], labels[part], emb[part], labels[part]) + np_contrastive(
            emb[part], labels[part], emb, labels
        )
        assert loss == pytest.approx(want / 2, abs=1e-5)  # divided by num_replicas_in_sync
