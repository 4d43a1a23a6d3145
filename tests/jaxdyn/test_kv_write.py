"""write_kv: a step's K/V rows land in their (page, offset) slots; padding rows (page = num_pages) are dropped."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxdyn.kv.cache import write_kv


def test_rows_land_in_their_slots_and_padding_is_dropped():
    heads, pages, page, dim = 2, 5, 4, 8
    rng = np.random.default_rng(0)
    k_pages = jnp.asarray(rng.normal(size=(heads, pages, page, dim)), jnp.float32)
    v_pages = jnp.asarray(rng.normal(size=(heads, pages, page, dim)), jnp.float32)
    t = 7                      # 4 real rows, then 3 padding rows that all point at the same (dropped) slot
    k = jnp.asarray(rng.normal(size=(t, heads, dim)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(t, heads, dim)), jnp.float32)
    slot_page = jnp.asarray([3, 3, 0, 4, pages, pages, pages], jnp.int32)
    slot_offset = jnp.asarray([1, 2, 3, 0, 0, 0, 0], jnp.int32)
    nk, nv = jax.jit(write_kv)(k_pages, v_pages, k, v, slot_page, slot_offset)
    want_k, want_v = np.asarray(k_pages).copy(), np.asarray(v_pages).copy()
    for row, (p, o) in enumerate(zip([3, 3, 0, 4], [1, 2, 3, 0])):
        want_k[:, p, o] = np.asarray(k)[row]
        want_v[:, p, o] = np.asarray(v)[row]
    np.testing.assert_array_equal(np.asarray(nk), want_k)
    np.testing.assert_array_equal(np.asarray(nv), want_v)


def test_fp8_pages_store_the_rows_rounded_and_saturate_instead_of_nan():
    # e4m3 has no infinity: a plain cast of 500 is NaN; the write clips to +-448 first
    heads, pages, page, dim = 1, 3, 2, 4
    k_pages = jnp.zeros((heads, pages, page, dim), jnp.float8_e4m3fn)
    v_pages = jnp.zeros((heads, pages, page, dim), jnp.float8_e4m3fn)
    k = jnp.asarray([[[500.0, -1000.0, 3.3, 0.1]], [[1.0, 2.0, 3.0, 4.0]]], jnp.bfloat16)
    v = -k
    nk, nv = jax.jit(write_kv)(k_pages, v_pages, k, v, jnp.asarray([1, 3], jnp.int32), jnp.asarray([0, 0], jnp.int32))
    assert nk.dtype == jnp.float8_e4m3fn
    got = np.asarray(nk.astype(jnp.float32))
    np.testing.assert_array_equal(got[0, 1, 0], [448.0, -448.0, 3.25, 0.1015625])
    np.testing.assert_array_equal(np.asarray(nv.astype(jnp.float32))[0, 1, 0], [-448.0, 448.0, -3.25, -0.1015625])
    assert not np.isnan(got).any()
    assert np.all(got[0, [0, 2]] == 0) and np.all(got[0, 1, 1] == 0)   # only the real row's slot moved
