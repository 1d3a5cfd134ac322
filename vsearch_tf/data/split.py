"""A validation split carved out of a training csv, so that the best epoch and every
hyperparameter are chosen on products that neither training nor the test benchmark sees.

A seeded fraction of the training *products* (never single images: the split is disjoint by
product) moves out of training: their seller photos become ``val_gallery.csv``, their user photos
``val_queries.csv`` (the rule of :func:`vsearch_tf.data.convert.split_roles`), the other products
``train_split.csv``. The source csv is left as it is.

By default the validation gallery also holds the seller photos of the training products, as
distractors: the MCS2023 and emoji-shop test galleries hold every product, trained ones included,
and a gallery of only the validation products would score far above the test figure and rank
choices on an easier task than the one they are made for.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from vsearch_tf.data.convert import Summary, split_roles, write_tables
from vsearch_tf.data.tables import BBOX_COLUMNS, read_training
from vsearch_tf.errors import VSearchError

VAL_GALLERY, VAL_QUERIES = "val_gallery.csv", "val_queries.csv"


def training_rows(csv: Path, root: Path) -> pd.DataFrame:
    """The csv as stripped strings, with the four box columns ("" = no box), after the checks of
    :func:`read_training` (columns, boxes, paths inside the root)."""
    read_training(csv, root, check_files=False)
    rows = pd.read_csv(csv, dtype=str, keep_default_na=False, skipinitialspace=True)
    rows.columns = [c.strip() for c in rows.columns]
    rows = rows.apply(lambda column: column.str.strip())
    return rows.assign(**{c: "" for c in BBOX_COLUMNS if c not in rows})


def split_validation(
    data_dir: str | os.PathLike,
    *,
    val_products: float = 0.1,
    seed: int = 0,
    train_csv: str = "train.csv",
    out: str | os.PathLike | None = None,
    out_train: str = "train_split.csv",
    overwrite: bool = False,
    distractors: bool = True,
) -> Summary:
    """``vsearch data split``: move ``val_products`` of the products of ``data_dir/train_csv``
    (at least one, chosen by ``seed`` from the sorted product ids: the same split on every
    machine) to ``val_gallery.csv`` / ``val_queries.csv``, the rest to ``out_train``.

    The files go to ``out`` (default ``data_dir``) with their paths unchanged, i.e. still relative
    to ``data_dir``, which stays ``data.root``. Columns other than the layout's are not copied.
    ``distractors``: the training products' seller photos join the validation gallery.
    """
    if not 0 < val_products < 1:
        raise VSearchError(f"val_products must be a fraction in (0, 1), got {val_products}")
    if out_train == train_csv:
        raise VSearchError(f"{out_train}: the split must not replace the training csv it reads")
    root = Path(data_dir)
    out = Path(out) if out is not None else root
    rows = training_rows(root / train_csv, root)
    products = np.array(sorted(rows["product_id"].unique()))
    n_val = max(1, round(val_products * len(products)))
    if n_val >= len(products):
        raise VSearchError(
            f"{root / train_csv}: {len(products)} products cannot give {n_val} for validation "
            "and keep one for training"
        )
    val = rows["product_id"].isin(np.random.default_rng(seed).permutation(products)[:n_val])
    gallery, queries = split_roles(rows[val])
    if distractors:
        gallery = pd.concat([gallery, split_roles(rows[~val])[0]])
    tables = {out_train: rows[~val], VAL_GALLERY: gallery, VAL_QUERIES: queries}
    written = write_tables(out, tables, overwrite=overwrite)
    keys = {out_train: "train_csv", VAL_GALLERY: "val_gallery_csv", VAL_QUERIES: "val_queries_csv"}
    where = {name: name if out == root else str(out.resolve() / name) for name in tables}
    notes = [
        "train on it: " + " ".join(f"--set data.{keys[n]}={where[n]}" for n in tables),
        f"{train_csv} is unchanged; paths stay relative to {root}",
    ]
    return Summary(out, written, notes)
