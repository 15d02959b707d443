"""Reliability trials (GitHub issue 6): corruption, flaky object storage, crashes, memory.

Each subcommand prints the figures that docs/RELIABILITY.md quotes:

    python -m logitcache.tools.reliability flips --all-footer-bits  # bit flips: verify vs plain
    python -m logitcache.tools.reliability s3             # S3 (moto) behind a fault-injecting proxy
    python -m logitcache.tools.reliability capture-crash  # SIGKILL `logitcache build`, rerun it
    python -m logitcache.tools.reliability torchrun-crash # the same, one of 2 torchrun ranks
    python -m logitcache.tools.reliability train-crash    # SIGKILL `logitcache train`, --resume
    python -m logitcache.tools.reliability rss            # peak RSS streaming 1×/10×/100× buffer

Everything runs locally (moto serves S3 on 127.0.0.1; the models are tools/tiny.py's, the
synthetic datasets and snapshots tools/synth.py's) and nothing is downloaded. torch is imported
only by the subcommands that capture, train or stream. Modules: ``flips``, ``s3``
(``FlakyS3``), ``memory``, ``crashes``; tests/reliability/ imports their helpers. ``__main__``
holds the command line.
"""
