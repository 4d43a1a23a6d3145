"""benchmarks/gpu/prefill_probe.py on the CPU: its given steps (``--long``) parsed and refused by name, their inputs
in one shape, and a variant (split included) checked against the reference in interpret mode."""

import numpy as np
import pytest

from benchmarks.gpu import prefill_probe as pp


def test_long_steps_are_parsed_and_bad_ones_refused():
    assert pp.parse_long("2048@8192,1024@16384+1024@1024") == [
        ("long 0 (2048@8192)", [(2048, 8192)]), ("long 1 (1024@16384+1024@1024)", [(1024, 16384), (1024, 1024)])]
    for bad, message in (("1@5", "1 < Q <= KV"), ("2048@1000", "1 < Q <= KV"), ("1500@4000+600@600", "more than"),
                         ("x", "invalid literal")):
        with pytest.raises(ValueError, match=message):
            pp.parse_long(bad)
    with pytest.raises(SystemExit):
        pp.main(["--long", "5@3"])


def test_long_steps_share_one_shape_and_the_chunks_own_distinct_pages():
    steps = pp.parse_long("2048@4096,1024@16384+1024@1024")
    shape = (1024, 1088)      # the widest slot's pages, the largest pool
    got = [pp.step_inputs(seqs, 1, np.random.default_rng(0), shape=shape) for _, seqs in steps]
    for (_, seqs), (q, ((k, v),), kv_lens, table, cu) in zip(steps, got):
        assert q.shape == (pp.TOKENS, pp.Q_HEADS, pp.HEAD_DIM) and table.shape == (1024, 1024)
        assert k.shape == v.shape == (pp.KV_HEADS, 1088, pp.PAGE, pp.HEAD_DIM)
        assert np.asarray(kv_lens)[:len(seqs)].tolist() == [kv for _, kv in seqs]
        assert np.asarray(cu)[len(seqs)] == sum(q for q, _ in seqs)
        need = [-(-kv // pp.PAGE) for _, kv in seqs]
        pages = np.concatenate([np.asarray(table)[s, :n] for s, n in enumerate(need)])
        assert len(set(pages.tolist())) == len(pages) == sum(need)      # no page shared between chunks


def test_interpret_mode_checks_a_variant_against_the_reference(capsys):
    assert pp.main(["--interpret", "--variants", "128:4:4:3:1056,16:1:4:3:8"]) == 0
    out = capsys.readouterr().out
    assert "16:1:4:3:8: max |diff|" in out and "MISMATCH" not in out
