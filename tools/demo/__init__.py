"""`logitcache demo`: offline context distillation end to end on a real teacher.

``run`` is the pipeline (capture with the context, train without it, measure before and after),
``behaviour`` the context and the measure of what it induces, ``data/`` the context and the
prompts. tools/cmd_demo.py is the command line over :func:`run_demo`.
"""

from .run import DemoConfig, run_demo

__all__ = ["DemoConfig", "run_demo"]
