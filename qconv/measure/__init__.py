"""Measuring: the float model's outputs on held rows computed once (``Reference``), error sums and agreement counts
that add up over feeds and merge over shards (``Tally``), the thresholds gates and tuning share (``Thresholds``),
and A/B latency. Evaluation, tuning and the Dask shard tasks all measure through these.

``stats``, ``tally`` and ``thresholds`` are pure numpy; ``compare``, ``reference`` and ``latency`` run sessions.
"""
