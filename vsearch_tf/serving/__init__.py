"""`vsearch serve`: an HTTP search API and a web page over an index folder.

The index's own exported model embeds each query through the same decode/crop path as
`vsearch index`; concurrent queries share model calls (micro-batching), and a replaced index
folder is swapped in while the server runs (hot reload).
"""

from vsearch_tf.serving.app import create_app, serve
from vsearch_tf.serving.service import SearchService

__all__ = ["SearchService", "create_app", "serve"]
