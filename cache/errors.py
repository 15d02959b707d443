"""Errors raised on bad datasets and bad input.

Every message says what was wrong, where (dataset, shard, field), the value seen and the fix.
"""

from __future__ import annotations


class LogitCacheError(Exception):
    """Base class of every error logitcache raises on user data."""


class ManifestError(LogitCacheError):
    """manifest.json is missing, malformed, of an unknown version, or out of step with the shards."""


class ShardError(LogitCacheError):
    """A shard is missing, truncated, fails its checksum, or does not match the manifest."""


class IncompatibleError(LogitCacheError):
    """Two datasets (or a dataset and a tokenizer) cannot be used together."""


class InputError(LogitCacheError):
    """A prompt record, config value or flag is wrong."""
