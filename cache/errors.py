"""The cache package's exception hierarchy; the proxy maps these to HTTP in one place."""


class CacheError(Exception):
    """Base class of every error raised by the cache package."""


class StoreError(CacheError):
    """The entry store failed (disk, database or network)."""


class EmbedderError(CacheError):
    """The embedder could not be loaded or could not embed."""


class ConfigError(CacheError):
    """A cache setting is invalid (raised at start-up, with the setting named)."""
