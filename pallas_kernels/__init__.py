"""Attention kernels for the paged KV cache: each op beside its jax.numpy reference."""

from pallas_kernels.ragged_paged_attention import (  # noqa: F401
    ragged_paged_attention, ragged_paged_attention_reference)
