"""Top-k's and top-p's thresholds of each row of logits without a sort (Pallas, GPU), and the same in ``jax.numpy``.

The sampler's top-k keeps every logit at least the k-th largest, and its top-p, over those, the largest ones whose
mass before them (in descending order) is under ``top_p``. A vocabulary sort finds both, but on a GPU XLA sends a
sort of 32 rows or more to CUB, a call its CUDA graphs cannot hold (``jaxdyn.engine.sampler``). Here both are a
radix search over order-preserving u32 keys of the logits (``order_keys``): the answer is built digit by digit
from the high end, each digit the largest whose candidate still satisfies the search's predicate (at least k keys
at or above it; a mass above it of at least ``top_p`` of the kept mass).

- ``sampling_thresholds_reference``: ``jax.numpy``, each candidate a reduction over the row (XLA reads the row once
  a candidate: ``32 / DIGIT_BITS x (2**DIGIT_BITS - 1)`` reads a search), ``DIGIT_BITS`` a pass;
- ``sampling_thresholds_kernel``: one program a row, looping over it in tiles; a pass reads the row once and counts
  the 15 candidates of a 4-bit digit in registers: 8 passes a search (2 searches, 2 passes for the mass), a row
  with top-k off skipping the first search and one with top_p 1 the second;
- ``sampling_thresholds_passes`` (what a GPU runs): the same search as one Pallas call a pass, a program a (row,
  chunk of ``CHUNK_TILES`` tiles) summing the 16 lanes over its chunk, the chunks' sums added and the digit picked
  in ``jax.numpy`` between calls: 18 calls (8 + the keys above the k-th + the kept mass + 8), every
  multiprocessor busy in each, where the kernel above runs a row's passes one after another in one program; a row
  that needs no search starts programs that read nothing, and top-p's search takes the leading digits its
  answer's bracket fixes (between max(k-th, min-p's floor) - 1 and the row max) without reading the row. Every call
  is the same kernel (what it sums is an input), lowered and compiled once a step.

Top-k's threshold is exact. Top-p's sums the mass in another order than a sort's running sum, so a token whose
mass before it is within float rounding of ``top_p`` may be kept by one and not the other.

``sampling_thresholds`` is the entry point: the passes on a GPU, the reference elsewhere (or a form named by ``impl``).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.paged_decode import kernel_zeros, on_gpu

# Bits of the answer a pass of the reference settles (1, 2, 4 or 8: a pass tries 2**bits - 1 candidates, and XLA
# reads the row once a candidate: 32 reads a search at 1 bit, 48 at 2, 120 at 4). On a 2-core CPU at 64 rows x
# 128,256, 4 bits compiled in 1.1 s against 1.8 s at 1 bit and ran 0.95 s against 0.57; at 4 rows 2 bits ran as
# fast as 1 and twice as fast as 4. On an H100 (the whole ``full`` sampler, 1,024 rows): 25.2 ms at 1 bit, 28.7 at 2,
# 52.0 at 4 (``benchmarks/results/gpu_suite_h200.md``, thirtieth session); a GPU runs the passes instead.
DIGIT_BITS = 2
# "auto": the passes on a GPU, else the reference; "reference" / "passes" / "kernel" / "passes-interpret" /
# "interpret" force one (the probe; or the
# environment's JAXDYN_SAMPLING_THRESHOLDS, read at import, e.g. to run the reference on a GPU)
IMPL = os.environ.get("JAXDYN_SAMPLING_THRESHOLDS", "auto")
TILE = 512              # logits a program loads at once (the kernel)
BLOCK_TILES = 16        # tiles a thread sums alone before the program's sum of them (the kernel's row_sum)
_KERNEL_BITS = 4        # the kernel's digit: 15 candidates counted in registers a pass


def order_keys(x: jax.Array) -> jax.Array:
    """u32 keys of f32 ``x`` in the floats' order (``a < b`` exactly where ``key(a) < key(b)``; -0.0 is 0.0): the
    sign bit set for a positive number, every bit flipped for a negative one."""
    bits = lax.bitcast_convert_type(jnp.where(x == 0, jnp.float32(0), x.astype(jnp.float32)), jnp.uint32)
    return bits ^ jnp.where(bits >> 31 == 1, jnp.uint32(0xFFFFFFFF), jnp.uint32(0x80000000))


def _largest_key_where(pred, rows: int, bits: int, zero: jax.Array | None = None,
                       known: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """u32[rows]: each row's largest key ``t`` with ``pred(t)`` true (``pred``: u32[rows, n] -> bool[rows, n], true
    below wherever it is true), 0 where it holds nowhere above 0: from the high digit down, each pass trying the
    ``2**bits - 1`` values of the next digit at once, ``32 / bits`` passes, unrolled (no sort, no loop). ``zero``:
    u32[rows] zeros to start from (a kernel's, where a constant would be a memset). ``known`` (u32[rows] ``value``,
    i32[rows] ``shared``): the answer's leading ``shared`` bits are ``value``'s; a digit within them is taken from
    ``value``, and ``pred`` is called as ``pred(t, settled)`` with ``settled`` (bool[rows]) the rows whose digit
    that pass is (whose ``pred`` is not read)."""
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"DIGIT_BITS must be 1, 2, 4 or 8, not {bits}")
    digits = (jnp.arange(1, 1 << bits, dtype=jnp.uint32))[None, :]
    ans = jnp.zeros((rows,), jnp.uint32) if zero is None else zero
    for shift in range(32 - bits, -1, -bits):
        t = ans[:, None] | (digits << shift)
        if known is None:
            digit = jnp.sum(pred(t), axis=-1).astype(jnp.uint32)         # true for a prefix of the digits
        else:
            value, shared = known
            settled = shared >= 32 - shift
            digit = jnp.where(settled, (value >> shift) & jnp.uint32((1 << bits) - 1),
                              jnp.sum(pred(t, settled), axis=-1).astype(jnp.uint32))
        ans = ans | (digit << shift)
    return ans


def sampling_thresholds_reference(logits: jax.Array, k: jax.Array, top_p: jax.Array
                                  ) -> tuple[jax.Array, jax.Array]:
    """(kth u32[S], cutoff u32[S]): the order key of each row's k-th largest logit (``k`` i32[S] in [1, V]; the entry
    point makes k = V key 0), and
    the key below which top-p (``top_p`` f32[S] > 0) drops a logit among those at or above it; 0 keeps all. Top-p
    is over the k largest alone, the k-th value's ties counted as a sort orders them (enough to fill k). (The entry
    point makes a top_p of 1 keep all.)"""
    S, V = logits.shape
    bits = DIGIT_BITS
    keys = order_keys(logits)
    k = k[:, None]
    kth = _largest_key_where(lambda t: jnp.sum(keys[:, None, :] >= t[:, :, None], axis=-1) >= k, S, bits)[:, None]
    kept = jnp.where(keys < kth, -jnp.inf, logits)
    m = jnp.max(kept, axis=-1, keepdims=True)
    e = jnp.exp(kept - m)
    above = keys > kth
    kth_value = jnp.max(jnp.where(keys == kth, logits, -jnp.inf), axis=-1, keepdims=True)
    fill = (k - jnp.sum(above, axis=-1, keepdims=True)).astype(jnp.float32)
    need = top_p[:, None] * (jnp.sum(jnp.where(above, e, 0.0), axis=-1, keepdims=True) + fill * jnp.exp(kth_value - m))

    def heavy(t):       # u32[S, n]: the kept mass strictly above key t reaches top_p, so t is below the cutoff
        return jnp.sum(jnp.where(keys[:, None, :] > t[:, :, None], e[:, None, :], 0.0), axis=-1) >= need

    below = _largest_key_where(heavy, S, bits)
    cutoff = jnp.where(heavy(jnp.zeros((S, 1), jnp.uint32))[:, 0], below + jnp.uint32(1), jnp.uint32(0))
    return kth[:, 0], cutoff


def _kernel(x_ref, k_ref, p_ref, kth_ref, cut_ref, *, vocab: int, tiles: int, interpret: bool):
    # x_ref: this row's logits [V] (interpret mode: padded to tiles * TILE); k_ref, p_ref: [1]; outputs [1]
    k, top_p = k_ref[0], p_ref[0]
    lanes = jnp.arange(1 << _KERNEL_BITS, dtype=jnp.uint32)
    offsets = jnp.arange(TILE, dtype=jnp.int32)

    def tile(i):
        """(logits f32[TILE], keys u32[TILE], valid bool[TILE]) of tile i; past the row: key 0, logit -inf."""
        valid = i * TILE + offsets < vocab
        if interpret:
            x = x_ref[pl.ds(i * TILE, TILE)]
        else:
            x = pltriton.load(x_ref.at[pl.ds(i * TILE, TILE)], mask=valid, other=0.0)
        x = jnp.where(valid, x, -jnp.inf)
        return x, jnp.where(valid, order_keys(x), jnp.uint32(0)), valid

    blocks = pl.cdiv(tiles, BLOCK_TILES)

    def row_sum(terms, width: int):
        """f32[width]: ``terms(x, keys, valid) -> f32[TILE, width]`` summed over the row. Each thread adds its own
        elements tile after tile (no reduction across the program's warps in the loop), ``BLOCK_TILES`` tiles at a
        time; each block's sum is then reduced and added with Kahan's compensation (a serial float32 sum over the
        row's tiles drifted by several boundary tokens' mass at top_p 0.999 and 128,256 logits)."""
        def block(b, carry):
            total, comp = carry

            def one(j, acc):
                x, keys, valid = tile(b * BLOCK_TILES + j)
                return acc + terms(x, keys, valid)

            acc = lax.fori_loop(0, jnp.minimum(BLOCK_TILES, tiles - b * BLOCK_TILES), one,
                                jnp.zeros((TILE, width), jnp.float32))
            y = jnp.sum(acc, axis=0) - comp
            t = total + y
            return t, (t - total) - y

        zeros = jnp.zeros((width,), jnp.float32)
        return lax.fori_loop(0, blocks, block, (zeros, zeros))[0]

    def search(terms, passes):
        """The largest key whose total (``terms(x, keys, valid, candidates u32[16]) -> f32[TILE, 16]`` summed over
        the row) ``passes`` (f32[16] -> bool[16]), lane 0 (the answer so far) passing by construction."""
        ans = jnp.uint32(0)
        for shift in range(32 - _KERNEL_BITS, -1, -_KERNEL_BITS):
            cands = ans | (lanes << shift)
            total = row_sum(lambda x, keys, valid, c=cands: terms(x, keys, valid, c), lanes.shape[0])
            digit = jnp.maximum(jnp.sum(passes(total).astype(jnp.int32)) - 1, 0)
            ans = ans | (digit.astype(jnp.uint32) << shift)
        return ans

    # top-k: at least k keys at or above the candidate (counts in float32: exact to 2**24, past any vocabulary); a
    # row with k = V (top-k off, most requests) skips the search: key 0 keeps every logit (and then no tie fills k)
    kf = k.astype(jnp.float32)
    zero_key = (k - k).astype(jnp.uint32)     # a value, not a literal: Triton's conditional yields values
    kth = lax.cond(k < vocab, lambda: search(
        lambda x, keys, valid, c: jnp.where(valid[:, None] & (keys[:, None] >= c[None, :]), 1.0, 0.0),
        lambda count: count >= kf), lambda: zero_key)

    def stats(i, acc):          # the row's max, the k-th value, how many keys are above the k-th
        m, kth_value, above = acc
        x, keys, _ = tile(i)
        return (jnp.maximum(m, jnp.max(x)), jnp.maximum(kth_value, jnp.max(jnp.where(keys == kth, x, -jnp.inf))),
                above + jnp.sum((keys > kth).astype(jnp.float32)))

    m, kth_value, above = lax.fori_loop(0, tiles, stats, (jnp.float32(-jnp.inf), jnp.float32(-jnp.inf),
                                                          jnp.float32(0)))

    two = jnp.arange(2, dtype=jnp.int32)

    def kept_mass(x, keys, valid):      # [TILE, 2]: the mass above the k-th, and all the kept mass (its ties too)
        e = jnp.exp(x - m)[:, None]
        return jnp.where(two[None, :] == 0, jnp.where(keys > kth, 1.0, 0.0)[:, None] * e,
                         jnp.where(keys >= kth, 1.0, 0.0)[:, None] * e)

    masses = row_sum(kept_mass, 2)      # (no slicing in Pallas' Triton lowering: each taken by a masked sum)
    mass_above, kept = jnp.sum(jnp.where(two == 0, masses, 0.0)), jnp.sum(jnp.where(two == 1, masses, 0.0))
    need = top_p * (mass_above + (kf - above) * jnp.exp(kth_value - m))

    def mass_above_cands(x, keys, valid, c):     # the kept mass strictly above each candidate
        e = jnp.where(keys >= kth, jnp.exp(x - m), 0.0)
        return jnp.where(keys[:, None] > c[None, :], e[:, None], 0.0)

    # top_p's share strictly above: the candidate is below the cutoff (a row with top_p 1 skips the search: it keeps
    # every token, sampling_thresholds)
    below = lax.cond(top_p < 1.0, lambda: search(mass_above_cands, lambda mass: mass >= need),
                     lambda: zero_key)
    # the kept mass above key 0 (all of it) under top_p's share: every kept logit stays
    cutoff = jnp.where(kept >= need, below + jnp.uint32(1), jnp.uint32(0))
    kth_ref[...] = jnp.full((1,), kth, jnp.uint32)
    cut_ref[...] = jnp.full((1,), cutoff, jnp.uint32)


CHUNK_TILES = 16        # tiles a program of the passes form reads (16 x 512 logits: 16 programs a row at 128,256)
_LANES = 1 << _KERNEL_BITS


def from_key(key: jax.Array) -> jax.Array:
    """``order_keys``' inverse: the f32 whose key is ``key`` (u32)."""
    bits = jnp.where(key >> 31 == 1, key ^ jnp.uint32(0x80000000), ~key)
    return lax.bitcast_convert_type(bits, jnp.float32)


COUNT, MASS = 1, 2      # a pass's ``on`` for a row: 0 reads nothing, COUNT counts keys, MASS sums the kept mass


def _pass_kernel(x_ref, m_ref, kth_ref, on_ref, scale_ref, floor_ref, hi_ref, prefix_ref, cand_ref, out_ref, *,
                 vocab: int, interpret: bool, scaled: bool, skip: bool):
    """One program of a pass: 16 sums over one chunk of one row (``_pass``), of the row scaled by its ``scale``
    (where ``scaled``) and with the logits under its ``floor`` dropped: lane j sums, over the keys at or above
    candidate j, 1 (the row's ``on`` COUNT) or the kept mass ``exp(x - m)`` of a key at or above ``kth`` (MASS);
    ``on`` 0: zeros, nothing read. What a pass sums is data, not the kernel's code, so every pass of a step is the
    same kernel (one lowering, one Triton compilation an executable). With ``skip``, a key whose bits above the
    pass's digit (``hi``) are above the answer's (``prefix``) is at or above every candidate and one below them
    under none (``hi`` 0: every key compared), so those are one [TILE] sum; only keys that share the answer's
    prefix meet the 16 candidates, and a tile without one skips that (past the first passes most tiles: the pass
    reads the row and adds one term an element instead of 16)."""
    c = pl.program_id(1)
    offsets = jnp.arange(TILE, dtype=jnp.int32)

    def sums():
        m, kth, cands, floor = m_ref[0], kth_ref[0], cand_ref[...], floor_ref[0]
        hi, prefix, mass = hi_ref[0], prefix_ref[0], on_ref[0] == MASS

        def tile(j, carry):     # a loop, not unrolled: the kernel traces and lowers in a sixteenth of the time
            acc, base = carry
            start = (c * CHUNK_TILES + j) * TILE
            valid = start + offsets < vocab
            if interpret:
                x = x_ref[pl.ds(start, TILE)]
            else:
                x = pltriton.load(x_ref.at[pl.ds(start, TILE)], mask=valid, other=0.0)
            if scaled:
                x = x * scale_ref[0]
            x = jnp.where(valid & (x >= floor), x, -jnp.inf)
            keys = jnp.where(valid, order_keys(x), jnp.uint32(0))
            w = jnp.where(mass, jnp.where(keys >= kth, jnp.exp(x - m), 0.0), jnp.where(valid, 1.0, 0.0))

            def lanes_of(w):     # [TILE, 16]: each element's term in each candidate's sum
                return jnp.where(keys[:, None] >= cands[None, :], w[:, None], 0.0)

            if not skip:
                return acc + lanes_of(w), base
            high = keys & hi
            base = base + jnp.where(high > prefix, w, 0.0)
            w = jnp.where(high == prefix, w, 0.0)
            return lax.cond(jnp.max(w) > 0, lambda a: a + lanes_of(w), lambda a: a, acc), base

        acc, base = lax.fori_loop(0, CHUNK_TILES, tile, (jnp.zeros((TILE, _LANES), jnp.float32),
                                                         jnp.zeros((TILE,), jnp.float32)))
        return jnp.sum(acc, axis=0) + jnp.sum(base) if skip else jnp.sum(acc, axis=0)

    # a row that does not need this pass (top-k off, top_p 1) reads nothing: its program writes zeros
    out_ref[...] = lax.cond(on_ref[0] != 0, sums, lambda: jnp.zeros((_LANES,), jnp.float32))


@functools.partial(jax.jit, static_argnames=("vocab", "interpret", "skip", "warps", "stages"))
def _pass(x, m, kth, on, cands, hi, prefix, scale, floor, *, vocab: int, interpret: bool, skip: bool = True,
          warps: int = 4, stages: int = 1):
    """f32[S, 16]: each row's 16 sums (``_pass_kernel``; ``on`` i32[S]: 0, COUNT or MASS), a grid of (row, chunk)
    programs whose chunk sums are added here (a tree of float32 sums, no serial sum over the row). Jitted, so that
    a step's passes are one function of its lowered module, lowered once (JAX caches a nested jit's lowering
    within a module): one Pallas lowering a step instead of 18."""
    S = x.shape[0]
    chunks = pl.cdiv(vocab, CHUNK_TILES * TILE)
    row = pl.BlockSpec((None, x.shape[1]), lambda s, c: (s, 0))
    one = pl.BlockSpec((1,), lambda s, c: (s,))
    out = pl.pallas_call(
        functools.partial(_pass_kernel, vocab=vocab, interpret=interpret, scaled=scale is not None, skip=skip),
        grid=(S, chunks),
        in_specs=[row, one, one, one, one, one, one, one, pl.BlockSpec((None, _LANES), lambda s, c: (s, 0))],
        out_specs=pl.BlockSpec((None, None, _LANES), lambda s, c: (s, c, 0)),
        out_shape=jax.ShapeDtypeStruct((S, chunks, _LANES), jnp.float32),
        interpret=interpret,
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=warps, num_stages=stages),
        name="sampling_thresholds_pass",
    )(x, m, kth, on.astype(jnp.int32), m if scale is None else scale, floor, hi, prefix, cands)
    return jnp.sum(out, axis=1)


@functools.partial(jax.jit, static_argnames=("interpret", "skip", "bracket", "warps", "stages"))
def sampling_thresholds_passes(logits: jax.Array, k: jax.Array, top_p: jax.Array, row_max: jax.Array | None = None,
                               scale: jax.Array | None = None, floor: jax.Array | None = None, *,
                               interpret: bool = False, skip: bool = True, bracket: bool = True, warps: int = 4,
                               stages: int = 1) -> tuple[jax.Array, jax.Array]:
    """The kernel as passes (same contract as the reference): each pass one Pallas call of a program a (row, chunk
    of 8,192 logits), which sums the 15 candidates of a 4-bit digit (and the first again, a 16th lane) over its
    chunk; the digit is picked here between calls. 8 passes for top-k (rows with top-k off read nothing), one
    counting the keys above the k-th (rows with both filters), one for the kept mass, 8 for top-p (rows with top_p
    1 read nothing). A pass reads the rows once with every multiprocessor busy, where the one-program-a-row kernel
    runs each row's 18 reads in one program. ``row_max``: the rows'
    largest logits where the caller has them (one read of the rows less; of the scaled rows where ``scale`` is
    given). ``scale``, ``floor`` (f32[S]): the thresholds of ``where(logits * scale < floor, -inf, logits *
    scale)``, each program scaling and flooring what it reads (no scaled copy of the rows written). ``skip``
    (default): a tile none of whose keys share the answer's bits above the pass's digit adds one term an element,
    not 16 (``_pass_kernel``); False compares every key with every candidate (the probe's comparison).
    ``bracket`` (default): top-p's search takes the digits its answer's bracket fixes (between the k-th or the
    floor and the row max: with top-k or min-p, several of its 8 passes) without reading the row; False searches
    every digit (the probe's comparison). ``warps``, ``stages``: Triton's for each pass's programs (4 and 1 by
    default: the [512, 16] sums are 64 registers a thread at 4 warps; the probe times others)."""
    S, V = logits.shape
    x = logits.astype(jnp.float32)
    if interpret:       # interpret mode's loads take no mask: the row padded to whole chunks (the pad is masked)
        width = CHUNK_TILES * TILE
        x = jnp.pad(x, ((0, 0), (0, pl.cdiv(V, width) * width - V)))
    k = k.astype(jnp.int32)
    if row_max is None:
        row_max = jnp.max(logits, axis=-1) if scale is None else jnp.max(logits, axis=-1) * scale
    m = jnp.where(jnp.isfinite(row_max), row_max, 0.0).astype(jnp.float32)
    if floor is None:       # a value, not a constant (a constant operand is a memset on a GPU)
        floor = jnp.where(m > jnp.inf, m, -jnp.inf)
    kf = k.astype(jnp.float32)
    top_p = top_p.astype(jnp.float32)
    run = functools.partial(_pass, x, m, scale=scale, floor=floor.astype(jnp.float32), vocab=V, interpret=interpret,
                            skip=skip, warps=warps, stages=stages)

    # zeros as a kernel's output, not constants: XLA fills a constant operand of a call by a memset, which ends
    # the step's CUDA graph (and keeps a conditional around it out of the graph)
    zero = kernel_zeros((S,), jnp.uint32, k[0])
    lanes = jnp.arange(_LANES, dtype=jnp.uint32)

    def search(kth, on, strict, passes, known=None):
        """A radix search, a pass a digit: the pass's 16 candidates are the digit's 15 and the first again (a
        power of two of lanes; dropped after). Its lane 1 (the answer so far with digit 1) gives the bits above
        the digit (``hi``: its lowest set bit is the digit's lowest; none on the first pass) and the answer's
        (``prefix``). ``strict``: sums over the keys above each candidate (at or above the next key). ``known``:
        ``_largest_key_where``'s; a row whose digit it knows reads nothing in that pass."""
        def pred(t, settled=None):
            first = t[:, 0]
            hi = ~(((first & (~first + jnp.uint32(1))) << _KERNEL_BITS) - jnp.uint32(1))
            cands = jnp.concatenate([t[:, :1], t], axis=1)
            if strict:      # (no key is all ones: a NaN logit is dropped)
                cands = jnp.where(cands == jnp.uint32(0xFFFFFFFF), cands, cands + jnp.uint32(1))
            row_on = on if settled is None else jnp.where(settled, 0, on)
            return passes(run(kth, row_on, cands, hi, first & hi))[:, 1:]
        return _largest_key_where(pred, S, _KERNEL_BITS, zero, known)

    top_k_on, cut_on = k < V, top_p < 1.0
    kth = jnp.where(top_k_on, search(zero, top_k_on.astype(jnp.int32) * COUNT, False,
                                     lambda count: count >= kf[:, None]), zero)
    # the keys above the k-th (where top-k and top-p both are on), then the kept mass above it and at or above it
    # (lanes 0 and 1), every key compared (``hi`` 0)
    above = run(kth, (top_k_on & cut_on).astype(jnp.int32) * COUNT,
                jnp.broadcast_to((kth + jnp.uint32(1))[:, None], (S, _LANES)), zero, zero)[:, 0]
    masses = run(kth, cut_on.astype(jnp.int32) * MASS, jnp.where(lanes == 0, kth[:, None] + jnp.uint32(1),
                                                                  kth[:, None]), zero, zero)
    mass_above, kept = masses[:, 0], masses[:, 1]
    # the k-th value's ties a sort's order counts to fill k (none with top-k off)
    fill = jnp.where(top_k_on, kf - above, 0.0)
    need = top_p * (mass_above + jnp.where(fill > 0, fill * jnp.exp(from_key(kth) - m), 0.0))
    known = None
    if bracket:
        # top-p's search finds the largest key with at least ``need`` of the kept mass above it. Every key with
        # mass lies in [max(k-th, the floor's key), the row max's key] (``row_max`` must be the largest the passes
        # see), so the leading bits bottom and top share are every such key's: in a pass of those digits no key with
        # mass is above the answer's prefix, the sums at the candidates at or below the prefix add the kept mass's
        # own terms in its own order (bit for bit ``kept``, at least ``need``: true) and those above it nothing
        # (``need`` > 0: false). So the whole search takes top's digits there, and the row's programs need not read.
        ok = jnp.isfinite(row_max) & ~jnp.isnan(floor) & (need > 0) & (kept >= need)
        top = jnp.where(ok, order_keys(row_max), jnp.uint32(0xFFFFFFFF))
        bottom = jnp.where(ok, jnp.maximum(kth, order_keys(floor)) - jnp.uint32(1), zero)
        known = (top, lax.clz(bottom ^ top).astype(jnp.int32))
    below = search(kth, cut_on.astype(jnp.int32) * MASS, True, lambda mass: mass >= need[:, None], known)
    cutoff = jnp.where(kept >= need, below + jnp.uint32(1), jnp.uint32(0))
    return kth, cutoff


@functools.partial(jax.jit, static_argnames=("interpret",))
def sampling_thresholds_kernel(logits: jax.Array, k: jax.Array, top_p: jax.Array, *, interpret: bool = False
                               ) -> tuple[jax.Array, jax.Array]:
    """The kernel (one program a row; same contract as the reference)."""
    S, V = logits.shape
    tiles = pl.cdiv(V, TILE)
    x = logits.astype(jnp.float32)
    if interpret:       # interpret mode's loads take no mask: the row padded to whole tiles (the pad is masked)
        x = jnp.pad(x, ((0, 0), (0, tiles * TILE - V)))
    row = pl.BlockSpec((None, x.shape[1]), lambda s: (s, 0))
    one = pl.BlockSpec((1,), lambda s: (s,))
    kth, cutoff = pl.pallas_call(
        functools.partial(_kernel, vocab=V, tiles=tiles, interpret=interpret),
        grid=(S,),
        in_specs=[row, one, one],
        out_specs=[one, one],
        out_shape=[jax.ShapeDtypeStruct((S,), jnp.uint32), jax.ShapeDtypeStruct((S,), jnp.uint32)],
        interpret=interpret,
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=8, num_stages=3),
        name="sampling_thresholds",
    )(x, k.astype(jnp.int32), top_p.astype(jnp.float32))
    return kth, cutoff


def scale_and_floor(logits, scale, floor):
    """``logits * scale`` (f32[S] or None: unscaled) with what is not at least ``floor`` (f32[S] or None) -inf: the
    array whose thresholds ``sampling_thresholds(scale=, floor=)`` finds (a NaN is dropped too)."""
    x = logits if scale is None else logits * scale[:, None]
    return x if floor is None else jnp.where(x >= floor[:, None], x, -jnp.inf)


def sampling_thresholds(logits: jax.Array, k: jax.Array, top_p: jax.Array, impl: str | None = None,
                        row_max: jax.Array | None = None, scale: jax.Array | None = None,
                        floor: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Entry point. ``impl`` (default ``IMPL``): ``auto`` (the passes on a GPU, else the reference), ``passes``,
    ``kernel`` (one program a row), ``passes-interpret``, ``interpret`` or ``reference``. ``row_max`` (f32[S], each
    row's largest logit): spares the passes their own reading of it; the other forms ignore it. ``scale``,
    ``floor`` (f32[S]): the thresholds of ``where(logits * scale < floor, -inf, logits * scale)`` (``row_max``
    then the scaled rows'), which the passes apply as they read; the other forms are given that array."""
    impl = impl or IMPL
    if impl == "auto":
        impl = "passes" if on_gpu() else "reference"
    if impl == "reference":
        kth, cutoff = sampling_thresholds_reference(scale_and_floor(logits, scale, floor), k, top_p)
    elif impl in ("kernel", "interpret"):
        kth, cutoff = sampling_thresholds_kernel(scale_and_floor(logits, scale, floor), k, top_p,
                                                 interpret=impl == "interpret")
    elif impl in ("passes", "passes-interpret"):
        kth, cutoff = sampling_thresholds_passes(logits, k, top_p, row_max, scale, floor,
                                                 interpret=impl == "passes-interpret")
    else:
        raise ValueError(f"impl must be auto, passes, kernel, passes-interpret, interpret or reference, not {impl!r}")
    # top_p 1 keeps every token: the tail's mass before it can round to 1 in float32, which would drop it; k = V
    # (top-k off) is key 0 in both forms (the kernel skips that search)
    return jnp.where(k >= logits.shape[1], jnp.uint32(0), kth), jnp.where(top_p >= 1.0, jnp.uint32(0), cutoff)
