"""Which searcher a gallery gets: exact search below ``IndexSettings.exact_below`` vectors, else
ScaNN trained and then tuned to ``target_recall``."""

from __future__ import annotations

import numpy as np

from vsearch_tf.config import IndexSettings, index_settings
from vsearch_tf.errors import VSearchError
from vsearch_tf.index.base import StoredSearcher
from vsearch_tf.index.exact import ExactSearcher
from vsearch_tf.index.scann import ScannSearcher
from vsearch_tf.index.tuning import tune

# Below this many vectors ScaNN's tree and quantisers have too little to train on, and exact
# search is instant anyway: whatever exact_below says.
_SCANN_MIN_POINTS = 1_000


def wants_exact(count: int, settings: IndexSettings) -> bool:
    """Whether ``build_searcher`` picks exact search for a gallery of ``count`` vectors."""
    return count < max(settings.exact_below, _SCANN_MIN_POINTS)


def build_searcher(embeddings: np.ndarray, settings: IndexSettings | None = None) -> StoredSearcher:
    """Pick and build the searcher for a gallery of L2-normalised float32 embeddings.

    Fewer than ``settings.exact_below`` vectors (and never fewer than 1,000): exact search, which
    is both fast and perfect there. Otherwise ScaNN with ~sqrt(N) leaves, its search knobs tuned
    for ``target_recall`` at k = ``num_neighbors`` and k = ``large_k``. ``settings`` are checked
    as a recipe's would be, since a caller may have built them by hand.
    """
    settings = index_settings((settings or IndexSettings()).to_dict(), "index settings")
    embeddings = embeddings if isinstance(embeddings, np.memmap) else np.asarray(embeddings)
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise VSearchError(f"nothing to index: embeddings have shape {embeddings.shape}")
    if wants_exact(embeddings.shape[0], settings):
        return ExactSearcher(embeddings, settings)
    return tune(ScannSearcher.train(embeddings, settings), embeddings)
