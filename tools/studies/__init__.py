"""Studies: experiments whose figures docs/RESULTS.md reports, each a subpackage run with
``python -m``.

    python -m logitcache.tools.studies.fidelity --help   # stored targets vs online full KD
"""
