"""Attention kernels for the paged KV cache: each op beside its jax.numpy reference."""

from pallas_kernels.paged_decode import (  # noqa: F401
    paged_decode_attention, paged_decode_attention_reference)
from pallas_kernels.ragged_paged_attention import (  # noqa: F401
    ragged_paged_attention, ragged_paged_attention_reference)
