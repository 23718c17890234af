"""Exact and semantic response cache: keys, embedder, vector index, entry stores, admission policy.

No HTTP in here: the proxy package translates requests into cache keys and cache results into responses.
"""
