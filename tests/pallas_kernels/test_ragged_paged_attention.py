"""The ragged paged attention entry point against a dense NumPy attention, sequence by sequence."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ragged_paged_attention


def _dense(q, k, v, q_start_pos, scale, window):
    """q: [n, H, D] at positions q_start_pos.., k, v: [L, K, D] -> [n, H, D]."""
    n, h, d = q.shape
    group = h // k.shape[1]
    out = np.zeros_like(q)
    for i in range(n):
        pos = q_start_pos + i
        keys = np.arange(pos + 1)
        if window is not None:
            keys = keys[keys > pos - window]
        for head in range(h):
            kh = head // group
            s = k[keys, kh] @ q[i, head] * scale
            p = np.exp(s - s.max())
            p /= p.sum()
            out[i, head] = p @ v[keys, kh]
    return out


@pytest.mark.parametrize("num_q_heads,num_kv_heads,window", [(4, 2, None), (4, 1, None), (4, 4, 7),
                                                             (8, 2, 20)])
def test_mixed_prefill_chunks_and_decode_tokens_match_dense_attention(num_q_heads, num_kv_heads, window):
    rng = np.random.default_rng(num_q_heads * 10 + num_kv_heads)
    page_size, num_pages, head_dim, pages_per_seq = 4, 40, 16, 8
    # (tokens already cached, new query tokens): a fresh prefill, a later chunk, decodes.
    seqs = [(0, 9), (11, 6), (20, 1), (3, 1), (31, 1)]
    k_pages = rng.standard_normal((num_kv_heads, num_pages, page_size, head_dim)).astype(np.float32)
    v_pages = rng.standard_normal((num_kv_heads, num_pages, page_size, head_dim)).astype(np.float32)
    perm = rng.permutation(num_pages)
    page_table = perm[:len(seqs) * pages_per_seq].reshape(len(seqs), pages_per_seq).astype(np.int32)
    num_tokens = sum(n for _, n in seqs)
    padded = num_tokens + 5                       # bucket padding rows
    q = rng.standard_normal((padded, num_q_heads, head_dim)).astype(np.float32)
    kv_lens = np.array([c + n for c, n in seqs], np.int32)
    cu = np.concatenate([[0], np.cumsum([n for _, n in seqs])]).astype(np.int32)
    # one padding sequence (q_len 0) as the runner's buckets add
    page_table = np.concatenate([page_table, np.zeros((1, pages_per_seq), np.int32)])
    kv_lens = np.concatenate([kv_lens, [0]]).astype(np.int32)
    cu = np.concatenate([cu, [num_tokens]]).astype(np.int32)

    scale = head_dim ** -0.5
    out = np.asarray(ragged_paged_attention(
        jnp.asarray(q), jnp.asarray(k_pages), jnp.asarray(v_pages), jnp.asarray(kv_lens),
        jnp.asarray(page_table), jnp.asarray(cu), sm_scale=scale, sliding_window=window))

    for s, (cached, n) in enumerate(seqs):
        length = cached + n
        pages = page_table[s, :(length + page_size - 1) // page_size]
        k = k_pages[:, pages].transpose(1, 2, 0, 3).reshape(-1, num_kv_heads, head_dim)[:length]
        v = v_pages[:, pages].transpose(1, 2, 0, 3).reshape(-1, num_kv_heads, head_dim)[:length]
        want = _dense(q[cu[s]:cu[s + 1]], k, v, cached, scale, window)
        np.testing.assert_allclose(out[cu[s]:cu[s + 1]], want, rtol=1e-5, atol=1e-5)
    assert np.all(out[num_tokens:] == 0), "padding rows must be zero"
