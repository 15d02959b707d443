"""Benchmarks: scripts that print ratios measured side by side in one run (docs/BENCHMARKS.md).

    python -m logitcache.tools.bench.format    # bytes/position, write/read speed, codec error
    python -m logitcache.tools.bench.capture   # capture throughput ÷ bare teacher forward
    python -m logitcache.tools.bench.train     # training step and loader throughput
    python -m logitcache.tools.bench.loss      # chunked loss vs dense: time and peak memory
    python -m logitcache.tools.bench.engines   # generate-mode capture on HF, vLLM, served ÷ bare

Each takes ``--help``. The real teacher and text come from tools/teachers.py and tools/corpus.py.
"""
