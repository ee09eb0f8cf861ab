"""Layer 1, the kNN-MT math: from neighbours to probabilities (:mod:`.distribution`: ``p_kNN``, the
adaptive weights and the interpolation with ``p_MT``). Pure torch; only ``core`` below."""
