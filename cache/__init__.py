"""Exact and semantic response cache: keys, embedder, vector index, entry stores, admission policy.

No HTTP in here: the proxy package translates requests into cache keys and cache results into responses.
"""

# Here rather than in cache.embedder so that the command line can offer them without importing numpy.
EMBEDDER_BACKENDS = ("onnx", "onnx-int8", "torch")
