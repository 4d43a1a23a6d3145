"""Moving a request's KV pages from one engine to another (disaggregated prefill and decode).

A *KV block* is what travels: one array

    block: [num_layers, 2 (K, V), num_kv_heads, n_pages, page_size, head_dim]

of the model's own kv heads (the copies a cache keeps when tensor parallelism
exceeds the kv heads are dropped before sending and made again on arrival, so
meshes of different TP degrees exchange the same block), sharded over kv heads
on the mesh's ``model`` axis when they divide evenly, replicated otherwise. The
token ids of the same slots travel beside it (for penalties).

* ``KVGather`` (source side): one compiled gather per page-count bucket reads a
  request's pages out of the paged cache into a block, on the source mesh.
* ``to_mesh`` moves a block onto another mesh with ``jax.device_put`` to a
  ``NamedSharding`` there: a device-to-device copy in one process (resharded by
  XLA when the two TP degrees differ); the host never touches the bytes.
* ``KVScatter`` (destination side): one compiled scatter per bucket writes a
  block into the pages reserved for the request, donating the cache (in place).

Page-count buckets are powers of two; padding page ids are ``0`` on the source
(read, never used) and ``num_pages`` on the destination (dropped by the write).
Everything is dispatched asynchronously: a gather is ordered after the step
that wrote the pages, a scatter before the step that reads them, because each
runs on its own mesh's stream in program order.

Across processes the block goes to host memory and is sent over gRPC, or is
pulled with ``jax.experimental.transfer`` (see ``serving/workers``).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxdyn.kv.cache import KVCacheSpec, allocate_kv_cache, to_pages_dtype
from jaxdyn.parallel.sharding import MODEL_AXIS, kv_cache_partition_spec, model_parallel_size, replicated


def page_buckets(max_pages: int) -> tuple[int, ...]:
    out, b = [], 1
    while b < max_pages:
        out.append(b)
        b *= 2
    out.append(max_pages if not out or out[-1] < max_pages else b)
    return tuple(sorted(set(out)))


def _bucket(buckets: tuple[int, ...], n: int) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} pages exceed the largest transfer bucket {buckets[-1]}")


def block_sharding(mesh: Mesh, num_kv_heads: int) -> NamedSharding:
    axis = MODEL_AXIS if num_kv_heads % model_parallel_size(mesh) == 0 else None
    return NamedSharding(mesh, P(None, None, axis, None, None, None))


def to_mesh(block: jax.Array, mesh: Mesh, num_kv_heads: int) -> jax.Array:
    """The block on ``mesh`` (device to device; resharded if the TP degrees differ)."""
    return jax.device_put(block, block_sharding(mesh, num_kv_heads))


def block_nbytes(num_layers: int, num_kv_heads: int, n_pages: int, page_size: int, head_dim: int,
                 itemsize: int) -> int:
    return 2 * num_layers * num_kv_heads * n_pages * page_size * head_dim * itemsize


class PagedKV:
    """A paged KV cache on a mesh without a model: what ``KVGather`` / ``KVScatter`` need of a
    ``ModelRunner`` (benchmarks of the transfer alone)."""

    def __init__(self, spec: KVCacheSpec, mesh: Mesh):
        self.kv_spec, self.mesh = spec, mesh
        self.kv_cache = allocate_kv_cache(spec, mesh)
        self._replicated = replicated(mesh)
        self.token_pages = jax.device_put(np.zeros((spec.num_pages, spec.page_size), np.int32),
                                          self._replicated)

    def _kv_shardings(self):
        s = NamedSharding(self.mesh, kv_cache_partition_spec(self.mesh, self.kv_spec.num_kv_heads))
        return [(s, s)] * self.kv_spec.num_layers


class _Side:
    def __init__(self, runner, num_kv_heads: int, max_pages: int):
        self.runner = runner
        spec = runner.kv_spec
        self.num_kv_heads = num_kv_heads                      # the model's own
        self.stored = spec.num_kv_heads                       # the cache's (replicated for TP)
        if self.stored % num_kv_heads:
            raise ValueError(f"cache holds {self.stored} kv heads, not a multiple of {num_kv_heads}")
        self.reps = self.stored // num_kv_heads
        self.buckets = page_buckets(max_pages)
        self.sharding = block_sharding(runner.mesh, num_kv_heads)
        self._compiled: dict[int, jax.stages.Compiled] = {}

    def block_shape(self, n: int) -> tuple[int, ...]:
        s = self.runner.kv_spec
        return (s.num_layers, 2, self.num_kv_heads, n, s.page_size, s.head_dim)

    def warmup(self, *args) -> None:
        for b in self.buckets:
            self._compile(b, *args)


class KVGather(_Side):
    """Reads pages of a runner's cache into a KV block on the runner's mesh."""

    def __init__(self, runner, num_kv_heads: int, max_pages: int):
        super().__init__(runner, num_kv_heads, max_pages)
        reps = self.reps

        def gather(kv_cache, ids):
            return jnp.stack([jnp.stack([k[::reps, ids], v[::reps, ids]]) for k, v in kv_cache])

        kv = runner._kv_shardings()
        self._jitted = jax.jit(gather, in_shardings=(kv, runner._replicated), out_shardings=self.sharding)

    def _compile(self, b: int):
        if b not in self._compiled:
            ids = jax.ShapeDtypeStruct((b,), jnp.int32)
            self._compiled[b] = self._jitted.lower(self.runner.kv_cache, ids).compile()
        return self._compiled[b]

    def __call__(self, pages: list[int]) -> jax.Array:
        """The block of ``pages``, padded to a bucket (dispatched, not awaited)."""
        b = _bucket(self.buckets, len(pages))
        ids = np.zeros(b, np.int32)
        ids[:len(pages)] = pages
        ids = jax.device_put(ids, self.runner._replicated)
        return self._compile(b)(self.runner.kv_cache, ids)


class KVScatter(_Side):
    """Writes a KV block into pages of a runner's cache (donated, in place)."""

    def __init__(self, runner, num_kv_heads: int, max_pages: int):
        super().__init__(runner, num_kv_heads, max_pages)
        reps = self.reps

        def scatter(kv_cache, token_pages, ids, block, toks):
            if reps > 1:
                block = jnp.repeat(block, reps, axis=2)
            new = []
            for layer, (k, v) in enumerate(kv_cache):
                # a block of another dtype (a bf16 prefill's, fp8 pages here) rounded as a step's write rounds
                new.append((k.at[:, ids].set(to_pages_dtype(block[layer, 0], k.dtype), mode="drop"),
                            v.at[:, ids].set(to_pages_dtype(block[layer, 1], v.dtype), mode="drop")))
            return new, token_pages.at[ids].set(toks, mode="drop")

        kv = runner._kv_shardings()
        rep = runner._replicated
        self._jitted = jax.jit(scatter, in_shardings=(kv, rep, rep, self.sharding, rep),
                               out_shardings=(kv, rep), donate_argnums=(0, 1))

    def _compile(self, b: int, dtype=None):
        """The scatter of a block of ``b`` pages of ``dtype`` (None: the cache's own)."""
        dtype = jnp.dtype(dtype or self.runner.kv_spec.dtype)
        if (b, dtype) not in self._compiled:
            sd = jax.ShapeDtypeStruct
            self._compiled[(b, dtype)] = self._jitted.lower(
                self.runner.kv_cache, self.runner.token_pages, sd((b,), jnp.int32), sd(self.block_shape(b), dtype),
                sd((b, self.runner.kv_spec.page_size), jnp.int32)).compile()
        return self._compiled[(b, dtype)]

    def refusal(self, pages: list[int], block, token_ids) -> str | None:
        """Why ``block`` cannot be written into ``pages`` (None: it can): its shape must be ``block_shape`` of a
        bucket of at least ``len(pages)`` pages (a block from an engine of another page size, model or head
        count is not), its dtype a float, and ``token_ids`` must fit the pages."""
        shape, dtype = tuple(getattr(block, "shape", ())), getattr(block, "dtype", None)
        b = shape[3] if len(shape) == 6 else None
        if b is None or shape != self.block_shape(b):
            return (f"a KV block of shape {list(shape)}; this engine's blocks are {list(self.block_shape(0))[:3]} + "
                    f"[pages] + {list(self.block_shape(0))[4:]} (layers, K/V, kv heads, pages, page size, head dim)")
        if b not in self.buckets or b < len(pages):
            return f"a block of {b} pages cannot fill {len(pages)} pages"
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            return f"a KV block of dtype {dtype}, not a float"
        if len(token_ids) > len(pages) * self.runner.kv_spec.page_size:
            return f"{len(token_ids)} tokens do not fit {len(pages)} pages"
        return None

    def __call__(self, pages: list[int], block, token_ids) -> None:
        """Write ``block`` (a bucket >= len(pages); on any mesh, or host numpy) into ``pages``;
        ``token_ids``: the tokens whose KV it holds (the prompt), for the penalties' history. ValueError
        (``refusal``) for a block that does not fit."""
        problem = self.refusal(pages, block, token_ids)
        if problem is not None:
            raise ValueError(problem)
        b = block.shape[3]
        ps = self.runner.kv_spec.page_size
        ids = np.full(b, self.runner.kv_spec.num_pages, np.int32)
        ids[:len(pages)] = pages
        toks = np.zeros(b * ps, np.int32)
        toks[:len(token_ids)] = token_ids
        ids, toks = jax.device_put((ids, toks.reshape(b, ps)), self.runner._replicated)
        if isinstance(block, np.ndarray) or block.sharding != self.sharding:
            block = jax.device_put(block, self.sharding)
        r = self.runner
        # a block of another dtype than the pages' is converted inside the scatter (compiled once a bucket and
        # dtype; ``warmup(dtype)`` compiles an expected one ahead)
        r.kv_cache, r.token_pages = self._compile(b, block.dtype)(r.kv_cache, r.token_pages, ids, block, toks)


def measure_handoff(gather: KVGather, scatter: KVScatter, src_pages: list[int], dst_pages: list[int],
                    token_ids, repeats: int = 5) -> dict[str, float]:
    """Seconds (median) of gather, device-to-device transfer and scatter of one request's pages."""
    times = {"gather": [], "transfer": [], "scatter": [], "total": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        block = gather(src_pages)
        jax.block_until_ready(block)
        t1 = time.perf_counter()
        moved = jax.device_put(block, scatter.sharding)
        jax.block_until_ready(moved)
        t2 = time.perf_counter()
        scatter(dst_pages, moved, token_ids)
        jax.block_until_ready(scatter.runner.kv_cache)
        t3 = time.perf_counter()
        for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
            times[key].append(dt)
    return {k: float(np.median(v)) for k, v in times.items()}

