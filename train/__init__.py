"""logitcache.train: a streaming student trainer over logit datasets (docs/TRAINING.md).

It reads shards only through ``logitcache.cache``'s reader; the teacher is never loaded.
``trainer.train`` is the loop; docs/ARCHITECTURE.md names the file of each step.
"""
