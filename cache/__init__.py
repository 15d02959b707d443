"""logitcache.cache: the logit-dataset format, its writer and reader, and teacher capture."""

__version__ = "0.1.0"
