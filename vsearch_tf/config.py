"""Run configuration: typed dataclasses loaded from YAML, with ``--set key=value`` overrides.

Validation happens before any work starts: an unknown key is an error that suggests the nearest
valid key, a wrong type or an impossible value names the key. The resolved config is written
into the run directory, so every run can be reproduced from its own folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vsearch_tf.data import DEFAULT_MAX_PIXELS
from vsearch_tf.errors import VSearchError, one_line


@dataclass
class RunConfig:
    name: str = "run"  # the run directory is <out_dir>/<name>
    out_dir: str = "runs"
    seed: int = 0
    init_from: str | None = None  # a previous run directory: start from its weights
    strategy: Literal["auto", "one_device", "mirrored", "multi_worker", "tpu"] = "auto"


@dataclass
class DataConfig:
    root: str = "."  # image paths in the CSVs are relative to this folder
    train_csv: str = "train.csv"
    # Both val csvs given: validation mAP each epoch, best checkpoint by it
    val_gallery_csv: str | None = None
    val_queries_csv: str | None = None
    image_size: int = 224
    batch_size: int = 64
    augment: float = 0.5  # 0 disables; 1 is strong
    box_jitter: float = 0.1  # random box move/rescale, fraction of the box size
    cache_dir: str | None = None  # cache decoded crops here (disables box jitter)
    # Train from the shards `vsearch prepare` wrote here (photos decoded once, not every epoch)
    prepared: str | None = None
    # Context kept around each box by prepare, a fraction of the box per side: >= 2 * box_jitter
    prepared_margin: float = 0.25
    # How prepare stores the crops: raw pixels (no decode at train time, 5.5x the bytes) or JPEG
    prepared_encoding: Literal["jpeg", "raw"] = "raw"
    # pk: P products x K images per batch (pair losses, XBM)
    sampler: Literal["shuffle", "pk"] = "shuffle"
    pk_k: int = 4  # K of the pk sampler; P = batch_size / K
    # Unreadable training images are skipped; more than this fraction fails
    max_bad_fraction: float = 0.01
    # Larger images (by their header) are refused: a decompression-bomb guard
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass
class ModelConfig:
    backbone: str = "resnet50"
    weights: str = "imagenet"  # imagenet | none | path to a .weights.h5 of the backbone
    # gem | avg for feature maps; cls | mean for ViT / DINOv2 tokens; cls (CLIP), map (SigLIP)
    pooling: Literal["gem", "avg", "cls", "mean", "map"] = "gem"
    embedding_dim: int = 512  # 0 = no projection: the pooled backbone feature
    dropout: float = 0.0
    bn_momentum: float | None = None  # None keeps the backbone's; ~0.9 when training from scratch
    # CLIP / SigLIP text search: a folder with the tokenizer's files (vocabulary.json + merges.txt,
    # or vocabulary.spm); None = the preset's (weights: imagenet)
    text_tokenizer: str | None = None


@dataclass
class HeadConfig:
    type: Literal["softmax", "arcface", "none"] = "arcface"  # none: pair losses only
    scale: float = 30.0
    margin: float = 0.3
    sub_centers: int = 1
    margin_min: float | None = None  # both set: per-class adaptive margins from class frequency
    margin_max: float | None = None


@dataclass
class LossConfig:
    pair: Literal["none", "contrastive", "triplet"] = "none"  # added to the head's loss
    pair_weight: float = 1.0
    # Contrastive: negatives above this similarity; triplet: distance margin
    pair_margin: float = 0.5
    xbm_size: int = 0  # > 0: cross-batch memory of this many embeddings (needs pair: contrastive)
    xbm_weight: float = 1.0
    xbm_start_step: int = 0  # the memory term counts from this step on


@dataclass
class TrainConfig:
    epochs: int = 10  # 0 = write the initial model only (an untrained baseline)
    steps_per_epoch: int | None = None  # None = one pass over the training csv
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3  # head learning rate
    backbone_lr_mult: float = 0.1  # backbone lr = lr * this (pretrained features move slowly)
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    clip_norm: float | None = 10.0
    freeze_backbone_epochs: int = 0
    early_stopping_patience: int | None = None  # epochs without val mAP gain
    mixed_precision: Literal["off", "mixed_float16", "mixed_bfloat16"] = "off"
    jit_compile: bool = False  # XLA: slower for depthwise convolutions on CPU
    val_every: int = 1


@dataclass
class LocalizerSettings:
    """The ``localizer:`` section: a one-box product localizer (:mod:`vsearch_tf.models.localizer`)
    trained on the training csv's boxed photos (``vsearch train-localizer``). Its backbone and
    weights default to the ``model:`` section's."""

    run_name: str | None = None  # the run directory is <out_dir>/<this>; None: <run.name>_localizer
    backbone: str | None = None  # None: model.backbone
    weights: str | None = None  # None: model.weights
    bn_momentum: float | None = None  # None: the backbone's; ~0.9 when training from scratch
    image_size: int = 128  # the whole photo is squashed to this square
    head: Literal["spatial", "pooled"] = "spatial"  # spatial: 1x1 conv + flatten; pooled: GAP
    hidden: int = 256
    batch_size: int = 32
    epochs: int = 10
    steps_per_epoch: int | None = None  # None = one pass over the boxed training photos
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    zoom: float = 0.3  # random window of the photo, down to (1 - zoom) of each side, box inside
    flip: bool = True  # random horizontal flip (the box flips with it)
    colour: float = 0.5  # colour jitter strength (0 disables)
    giou_weight: float = 1.0
    l1_weight: float = 1.0
    confidence_weight: float = 1.0  # the second output, trained to predict its own box's IoU


@dataclass
class LocalizerConfig:
    """``vsearch train-localizer --config FILE``: a training config's ``run``, ``data`` and
    ``model`` sections and its ``localizer`` section (``head``, ``loss``, ``train`` are the
    embedder's and are ignored)."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    localizer: LocalizerSettings = field(default_factory=LocalizerSettings)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / (self.localizer.run_name or f"{self.run.name}_localizer")


#: The embedder's sections, which a localizer config may carry and ignores, and the other way.
_EMBEDDER_ONLY = ("head", "loss", "train")
_LOCALIZER_ONLY = ("localizer",)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name


@dataclass
class IndexSettings:
    """How an index picks and tunes its searcher. One record for all: the options of
    ``vsearch index``, a recipe's ``index:`` section, and the manifest's ``tuning`` (so that
    ``index add`` / ``remove`` / ``rebuild`` tune the way the index was built)."""

    exact_below: int = 20_000  # smaller galleries use exact search (never ScaNN below 1,000)
    num_neighbors: int = 10  # the k that ScaNN's recall is tuned for (query time)
    target_recall: float | None = 0.95  # None: ScaNN's default knobs, recall not measured
    large_k: int | None = 1_000  # a second knob set tuned for evaluation's k; None: none
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def index_settings(
    data: dict[str, Any] | None = None, source: str = "index settings"
) -> IndexSettings:
    """Typed, checked ``IndexSettings`` from a mapping (a recipe section, a manifest's
    ``tuning``); missing keys take the defaults, unknown keys and bad values are errors."""
    settings = IndexSettings()
    for name, value in (data or {}).items():
        hints = typing.get_type_hints(IndexSettings)
        if name not in hints:
            near = difflib.get_close_matches(name, list(hints), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise VSearchError(f"{source}: unknown index setting {name!r}{hint}")
        setattr(settings, name, _coerce(f"index.{name}", value, hints[name]))
    if settings.target_recall is not None and not 0 < settings.target_recall <= 1:
        raise VSearchError(f"{source}: target_recall {settings.target_recall} is not in (0, 1]")
    for name, least in (("exact_below", 0), ("num_neighbors", 1), ("large_k", 1), ("seed", 0)):
        value = getattr(settings, name)
        if value is not None and value < least:
            raise VSearchError(f"{source}: {name} must be >= {least}, got {value}")
    return settings


_POSITIVE = {
    "data.image_size",
    "data.batch_size",
    "train.lr",
    "head.scale",
    "head.sub_centers",
    "train.val_every",
    "data.pk_k",
    "data.max_pixels",
    "train.steps_per_epoch",
    "train.clip_norm",
}
_NON_NEGATIVE = {
    "train.epochs",
    "data.augment",
    "data.box_jitter",
    "data.prepared_margin",
    "model.embedding_dim",
    "model.dropout",
    "head.margin",
    "train.weight_decay",
    "train.warmup_epochs",
    "train.backbone_lr_mult",
    "train.freeze_backbone_epochs",
    "data.max_bad_fraction",
    "loss.pair_weight",
    "loss.xbm_size",
    "loss.xbm_weight",
    "loss.xbm_start_step",
}


def _all_keys(cls: type = Config, prefix: str = "", sections: bool = False) -> list[str]:
    keys = []
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            keys += ([prefix + name] if sections else []) + _all_keys(
                hint, f"{prefix}{name}.", sections
            )
        else:
            keys.append(prefix + name)
    return keys


def _suggest(key: str, root: type = Config) -> str:
    keys = _all_keys(root, sections=True)
    near = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not near:  # a right leaf under a wrong section, or the other way round
        leaf = key.rsplit(".", 1)[-1]
        near = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    return f"; did you mean {near[0]!r}?" if near else ""


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field's annotation (int, float, bool, str, Optional, Literal)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is Literal:
        if value not in args:
            raise VSearchError(
                f"config key {key}: {value!r} is not one of {', '.join(map(repr, args))}"
            )
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise VSearchError(
        f"config key {key}: expected {getattr(annotation, '__name__', annotation)}, got {value!r}"
    )


def _apply(obj: Any, data: dict[str, Any], prefix: str, source: str, root: type = Config) -> None:
    hints = typing.get_type_hints(type(obj))
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in hints:
            raise VSearchError(f"{source}: unknown config key {key!r}{_suggest(key, root)}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise VSearchError(f"{source}: config key {key} must be a mapping, got {value!r}")
            _apply(current, value, key + ".", source, root)
        else:
            setattr(obj, name, _coerce(key, value, hints[name]))


def _validate(cfg: Config) -> None:
    flat = {k: _get(cfg, k) for k in _all_keys()}
    for key in _POSITIVE:
        if flat[key] is not None and flat[key] <= 0:
            raise VSearchError(f"config key {key}: must be > 0, got {flat[key]!r}")
    for key in _NON_NEGATIVE:
        if flat[key] is not None and flat[key] < 0:
            raise VSearchError(f"config key {key}: must be >= 0, got {flat[key]!r}")
    if cfg.data.max_bad_fraction > 1:
        raise VSearchError(
            "config key data.max_bad_fraction: a fraction, must be <= 1, "
            f"got {cfg.data.max_bad_fraction}"
        )
    if cfg.model.dropout >= 1:
        raise VSearchError(f"config key model.dropout: must be < 1, got {cfg.model.dropout}")
    if (cfg.data.val_gallery_csv is None) != (cfg.data.val_queries_csv is None):
        raise VSearchError(
            "config keys data.val_gallery_csv and data.val_queries_csv: give both or neither"
        )
    if (cfg.head.margin_min is None) != (cfg.head.margin_max is None):
        raise VSearchError("config keys head.margin_min and head.margin_max: give both or neither")
    if cfg.head.type == "none" and cfg.loss.pair == "none":
        raise VSearchError(
            "config keys head.type and loss.pair: both are none, so there is nothing to train"
        )
    if cfg.loss.xbm_size and cfg.loss.pair != "contrastive":
        raise VSearchError(
            "config key loss.xbm_size: cross-batch memory needs loss.pair: contrastive"
        )
    if cfg.loss.xbm_size and cfg.model.embedding_dim == 0:
        raise VSearchError(
            "config key loss.xbm_size: needs model.embedding_dim > 0 (the memory's width)"
        )
    if cfg.data.sampler == "pk" and cfg.data.batch_size % cfg.data.pk_k:
        raise VSearchError(
            f"config key data.batch_size: {cfg.data.batch_size} is not a multiple of "
            f"data.pk_k={cfg.data.pk_k}"
        )
    if cfg.data.prepared and cfg.data.cache_dir:
        raise VSearchError(
            "config key data.cache_dir: prepared shards are decoded already; "
            "data.cache_dir caches decoded photos and cannot be used with data.prepared"
        )
    if cfg.loss.pair != "none" and cfg.data.sampler != "pk":
        raise VSearchError(
            "config key data.sampler: pair losses need sampler: pk "
            "(several images per product in a batch)"
        )


def _get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=3e-4"`` -> ``("train.lr", 0.0003)``; the value is parsed as YAML."""
    if "=" not in text:
        raise VSearchError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def read_yaml(path: Path, what: str = "config file") -> dict[str, Any]:
    """The mapping a YAML file holds (a config, a recipe); a missing file, bad YAML or anything
    but a mapping at the top is a one-line ``VSearchError`` naming the file."""
    if not path.is_file():
        raise VSearchError(f"{path}: {what} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise VSearchError(f"{path}: not valid YAML ({one_line(err)})") from None
    if not isinstance(data, dict):
        raise VSearchError(f"{path}: expected a mapping of sections at the top level")
    return data


def _apply_overrides(cfg: Any, overrides: list[str], root: type) -> None:
    """``--set key=value`` overrides, in order, onto a loaded config."""
    for text in overrides:
        key, value = parse_override(text)
        nested: dict[str, Any] = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        _apply(cfg, nested, "", f"--set {text}", root)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load a YAML config (or the defaults), apply ``key=value`` overrides, validate."""
    cfg = Config()
    if path is not None:
        data = read_yaml(Path(path))
        for section in _LOCALIZER_ONLY:  # a training config may carry its localizer's section
            data.pop(section, None)
        _apply(cfg, data, "", str(path))
    _apply_overrides(cfg, overrides, Config)
    _validate(cfg)
    if cfg.run.init_from is not None and not (Path(cfg.run.init_from) / "embedder.keras").is_file():
        raise VSearchError(
            f"config key run.init_from: {cfg.run.init_from} is not a finished run "
            "(no embedder.keras)"
        )
    return cfg


def config_from_dict(data: dict[str, Any], source: str) -> Config:
    """Rebuild a config saved in a run directory. Its ``run.init_from`` is not checked: the run
    it started from may be gone since, which changes nothing about this one."""
    cfg = Config()
    _apply(cfg, data, "", source)
    _validate(cfg)
    return cfg


def run_config(run_dir: Path) -> Config:
    """The config a run was trained with, from its ``config.yml``."""
    path = run_dir / "config.yml"
    return config_from_dict(read_yaml(path), str(path))


def _validate_localizer(cfg: LocalizerConfig) -> None:
    loc = cfg.localizer
    for name in ("image_size", "hidden", "batch_size", "lr", "steps_per_epoch"):
        value = getattr(loc, name)
        if value is not None and value <= 0:
            raise VSearchError(f"config key localizer.{name}: must be > 0, got {value!r}")
    for name in ("epochs", "weight_decay", "warmup_epochs", "colour", "giou_weight", "l1_weight"):
        if getattr(loc, name) < 0:
            raise VSearchError(
                f"config key localizer.{name}: must be >= 0, got {getattr(loc, name)!r}"
            )
    if loc.confidence_weight < 0:
        raise VSearchError(
            f"config key localizer.confidence_weight: must be >= 0, got {loc.confidence_weight!r}"
        )
    if not 0 <= loc.zoom < 1:
        raise VSearchError(f"config key localizer.zoom: must be in [0, 1), got {loc.zoom!r}")
    if loc.giou_weight == 0 and loc.l1_weight == 0:
        raise VSearchError(
            "config keys localizer.giou_weight and localizer.l1_weight: both are 0, so the box "
            "is not trained"
        )


def load_localizer_config(path: str | Path | None, overrides: list[str] = ()) -> LocalizerConfig:
    """A localizer config from YAML (a dedicated file or a training config with a ``localizer:``
    section) and ``key=value`` overrides, checked like :func:`load_config`."""
    cfg = LocalizerConfig()
    source = str(path)
    if path is not None:
        data = read_yaml(Path(path))
        for section in _EMBEDDER_ONLY:
            data.pop(section, None)
        _apply(cfg, data, "", source, LocalizerConfig)
    _apply_overrides(cfg, overrides, LocalizerConfig)
    _validate_localizer(cfg)
    return cfg


def localizer_run_config(run_dir: Path) -> LocalizerConfig:
    """The config a localizer run was trained with, from its ``config.yml``."""
    return load_localizer_config(run_dir / "config.yml")


def dump_config(cfg: Config | LocalizerConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
