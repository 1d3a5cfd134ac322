"""Gallery embeddings on disk, nearest-neighbour searchers, and saved index folders.

Embeddings are L2-normalised, so every searcher ranks by inner product (= cosine). The package:

- ``base``: the :class:`Searcher` protocol every backend implements, and the registry of the
  backends an index folder can store;
- ``exact``, ``scann``, ``milvus``: one backend each (Milvus is optional, imported lazily, and
  serves a folder's vectors rather than being stored in it);
- ``build``: which backend a gallery gets (``build_searcher``, from ``IndexSettings``);
- ``tuning``: recall against exact search, and the ScaNN knobs that meet the target;
- ``store``: the resumable chunk store an indexing job writes;
- ``folder``: the index folder (manifest, ids.csv, embeddings.npy), ``Index``, save and load;
- ``updates``: live add / remove / rebuild of a folder.
"""

from vsearch_tf.index.base import Searcher
from vsearch_tf.index.build import build_searcher
from vsearch_tf.index.exact import ExactSearcher
from vsearch_tf.index.folder import EMBEDDINGS, IDS, MANIFEST, Index, load_index, save_index
from vsearch_tf.index.scann import ScannSearcher
from vsearch_tf.index.store import EmbeddingStore
from vsearch_tf.index.updates import (
    add_to_index,
    check_new_ids,
    read_withdrawn,
    rebuild_index,
    remove_from_index,
)

__all__ = [
    "EMBEDDINGS",
    "IDS",
    "MANIFEST",
    "EmbeddingStore",
    "ExactSearcher",
    "Index",
    "ScannSearcher",
    "Searcher",
    "add_to_index",
    "build_searcher",
    "check_new_ids",
    "load_index",
    "read_withdrawn",
    "rebuild_index",
    "remove_from_index",
    "save_index",
]
