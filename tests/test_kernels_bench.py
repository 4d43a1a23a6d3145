"""benchmarks/kernels.py's entry-point halves, on the CPU (Pallas interpret mode): the two kernels a decode-only step
runs, each alone, give the entry point's result between them (the timings are the GPU's)."""

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import kernels
from pallas_kernels.ragged_paged_attention import ragged_paged_attention


@pytest.mark.parametrize("live, slots, context", [(2, 4, 256), (3, 40, 64)])   # 4 slots: context splits; 40: in place
def test_the_entry_halves_make_the_entry_points_decode_only_step(live, slots, context):
    from pallas_kernels import paged_decode
    q, k_pages, v_pages, lens, tables = kernels._decode_inputs(np.random.default_rng(0), live, context, 128)
    blocks = paged_decode.decode_block_sizes(128, kernels.PAGE, k_pages.dtype, slots)
    splits = paged_decode.grid_splits(slots, kernels.KV_HEADS, context // kernels.PAGE, blocks)
    assert (splits > 1) == (slots == 4)
    pad = slots - live
    q = jnp.pad(q, ((0, pad), (0, 0), (0, 0)))
    lens = jnp.pad(lens, (0, pad))
    table = jnp.pad(tables[0], ((0, pad), (0, 0)))
    cu = jnp.minimum(jnp.arange(slots + 1, dtype=jnp.int32), live)
    entry = ragged_paged_attention(q, k_pages, v_pages, lens, table, cu, sm_scale=128 ** -0.5, impl="interpret")
    decode_half, prefill_half = kernels.entry_halves(cu)
    # every slot's row (zeros where no sequence is), in place or from the splits' combination
    decode = np.asarray(decode_half(q, k_pages, v_pages, lens, table), np.float32)
    np.testing.assert_array_equal(decode, np.asarray(entry, np.float32))
    assert np.abs(np.asarray(entry, np.float32)[:live]).max() > 0
    # the prefill kernel finds no sequence of more than one query token: its output is the zeros it was given
    assert not np.asarray(prefill_half(q, k_pages, v_pages, lens, table), np.float32).any()


@pytest.mark.parametrize("argv, message", [
    (["--decode-chunks", "2,x"], "expected integers"),
    (["--decode-chunks", "9"], "from 0 to 8"),
    (["--decode-chunks", "-1"], "from 0 to 8"),
    (["--decode-chunks", "2", "--attention-programs", "0,264"], "needs --attention-programs 0")])
def test_decode_chunks_out_of_range_or_with_persistent_programs_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        kernels.main(["--entry-only"] + argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
