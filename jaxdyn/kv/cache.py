"""The paged KV cache: its layout, its allocation on a mesh, and the in-step write.

Layout
------
One pair of arrays per layer (a Python list, so each layer's pages are a
separate buffer that the jitted step donates and updates in place)::

    k_pages[layer], v_pages[layer]: [num_kv_heads, num_pages, page_size, head_dim]

* ``num_kv_heads`` leads so tensor parallelism shards it (PartitionSpec
  ``("model", None, None, None)``) and one (head, page) tile is a contiguous
  ``page_size * head_dim`` run: a kernel reads a page of one head with one
  contiguous copy, no gather.
* A token at position ``pos`` of a sequence whose page list is ``pages`` lives
  at ``[:, pages[pos // page_size], pos % page_size, :]``.
* Page ids are indices into axis 1. The allocator (engine) hands them out; the
  cache itself knows nothing of sequences.
* Padding tokens of a bucketed step carry the page id ``num_pages`` (out of
  range); the write drops them, so padding never touches a real page.
* The pages' dtype is the model's (``kv_cache_dtype="auto"``) or fp8
  (``"fp8"``: float8_e4m3fn, half the bytes of bf16, as vLLM's and SGLang's
  ``--kv-cache-dtype fp8``). fp8 pages hold the values themselves (a scale of
  1.0, vLLM's default without calibrated scales), clipped to e4m3's range of
  +-448 when written (a plain cast would make NaN of larger values); the
  attention kernels widen each loaded tile as they read it (to float16 for a
  16-bit query: ``pallas_kernels.paged_decode.compute_dtype``).

Why a list per layer rather than one stacked array: the model's layers are
unrolled in Python (a ``lax.scan`` over stacked weights measured 3x slower on
the H100, see shared GPU notes), and separate buffers let XLA alias each
layer's donated input to its output with a plain in-place scatter.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from jaxdyn.parallel.sharding import kv_cache_partition_spec
from pallas_kernels import rope_kv

KVCache = list[tuple[jax.Array, jax.Array]]   # per layer: (k_pages, v_pages)

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # "fp8_e4m3" = "fp8" (vLLM's names)
FP8_KV_DTYPE = rope_kv.FP8_PAGES_DTYPE            # float8_e4m3fn


def check_kv_cache_dtype(name) -> str:
    """``name``'s canonical form ("fp8_e4m3" is "fp8") if it is a KV cache dtype this cache stores (ValueError
    naming the choices otherwise)."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype: expected one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}")
    return "fp8" if name == "fp8_e4m3" else name


# ``x`` in the pages' dtype (fp8 saturating at +-448), and a step's K/V scattered into their pages (in place when
# the cache is donated; padding's out-of-range slots dropped): the fused kernel's module holds both, as its reference
to_pages_dtype = rope_kv.to_pages_dtype
write_kv = rope_kv.write_pages


@dataclasses.dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int      # heads stored (after replication for tensor parallelism)
    num_pages: int
    page_size: int
    head_dim: int
    dtype: jnp.dtype

    @property
    def page_shape(self) -> tuple[int, int, int, int]:
        return (self.num_kv_heads, self.num_pages, self.page_size, self.head_dim)

    @property
    def bytes_per_page(self) -> int:
        """Bytes one page occupies over all layers, K and V."""
        return (2 * self.num_layers * self.num_kv_heads * self.page_size * self.head_dim
                * jnp.dtype(self.dtype).itemsize)

    def pages_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.page_size)


def allocate_kv_cache(spec: KVCacheSpec, mesh: Mesh) -> KVCache:
    """Zero-filled pages (``abstract_kv_cache``'s), sharded over kv heads on the mesh's model axis."""
    page = abstract_kv_cache(spec, mesh)[0][0]
    zeros = jax.jit(lambda: jnp.zeros(page.shape, page.dtype), out_shardings=page.sharding)
    return [(zeros(), zeros()) for _ in range(spec.num_layers)]


def abstract_kv_cache(spec: KVCacheSpec, mesh: Mesh) -> list[tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]]:
    """``allocate_kv_cache``'s pages as shapes (with their sharding): what steps compile against before the
    pages are allocated."""
    sharding = NamedSharding(mesh, kv_cache_partition_spec(mesh, spec.num_kv_heads))
    page = jax.ShapeDtypeStruct(spec.page_shape, jnp.dtype(spec.dtype), sharding=sharding)
    return [(page, page) for _ in range(spec.num_layers)]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """How one step's packed tokens address the paged cache (all device arrays)."""

    positions: jax.Array     # i32[T]    position of each token in its sequence
    slot_page: jax.Array     # i32[T]    page the token's K/V is written to (num_pages: padding)
    slot_offset: jax.Array   # i32[T]    offset inside that page
    page_table: jax.Array    # i32[S, P] pages of each sequence, in order
    kv_lens: jax.Array       # i32[S]    cached tokens per sequence after this step's write
    cu_q_lens: jax.Array     # i32[S+1]  row offsets of each sequence's tokens in the batch
