"""benchmarks/gpu/sampler_probe.py: its inputs turn every part of ``full`` on, and its sorted and sort-free forms
draw the same (the timings themselves are a GPU's; its table was run by hand on the CPU)."""

import numpy as np

from benchmarks.gpu import sampler_probe
from jaxdyn.engine.sampler import FULL, sample


def test_the_probes_inputs_use_every_part_and_both_full_forms_agree():
    logits, (s, hist) = sampler_probe.sampling_inputs(3, 2000, history=64)
    assert bool(s.row_uses_filters().all()) and bool(s.row_uses_penalties().all())
    assert logits.shape == (3, 2000) and hist[0].shape == (3, 64)
    a = sample(logits, lambda: hist, s, FULL)
    b = sample(logits, lambda: hist, s, FULL, sort_free=True)
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)

