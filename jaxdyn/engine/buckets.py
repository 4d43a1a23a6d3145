"""The runner's bucket lists, without JAX: the token and page buckets a runner compiles and its ``seq_buckets``
pairs (``RunnerConfig``), also read where JAX must not be imported (the CLI before the engine starts, the GPU
suite's driver: ``benchmarks/gpu/gpu.py`` ``engine_with``)."""

from __future__ import annotations

from collections.abc import Sequence


def is_count(v) -> bool:
    """An integer >= 0 (not a bool): a token-count option's value."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
    """lo, 2lo, 4lo, ... up to and including hi (hi itself always ends the list)."""
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    out.append(hi)
    return tuple(out)


def token_buckets_for(token_buckets, max_num_batched_tokens: int) -> tuple[int, ...]:
    """The token buckets a runner compiles: ``token_buckets`` sorted, or (None) powers of two from 16 up to
    ``max_num_batched_tokens``."""
    return tuple(sorted(token_buckets or powers_of_two(min(16, max_num_batched_tokens), max_num_batched_tokens)))


def seq_bucket_fits(tokens: int, slots: int, token_buckets: Sequence[int], max_num_seqs: int) -> bool:
    """Whether a runner of ``token_buckets`` and ``max_num_seqs`` can have the ``seq_buckets`` pair (``tokens``,
    ``slots``): ``tokens`` one of its buckets, with fewer slots than that bucket's own, ``min(tokens,
    max_num_seqs)``."""
    return tokens in token_buckets and slots < min(tokens, max_num_seqs)


def check_seq_buckets(value, tokens: Sequence[int] | None = None, max_num_seqs: int | None = None
                      ) -> tuple[tuple[int, int], ...]:
    """``value`` as sorted (tokens, sequence slots) pairs of integers >= 1; with ``tokens``, each a token bucket of
    them with fewer slots than its own, ``min(tokens, max_num_seqs)`` (ValueError naming the field otherwise)."""
    try:
        pairs = sorted({(a, b) for a, b in value})
    except (TypeError, ValueError):
        raise ValueError(f"seq_buckets: expected (tokens, sequence slots) pairs, got {value!r}") from None
    for t, s in pairs:
        if not (is_count(t) and is_count(s) and t >= 1 and s >= 1):
            raise ValueError(f"seq_buckets: expected pairs of integers >= 1, got {value!r}")
        if tokens is not None and not seq_bucket_fits(t, s, tokens, max_num_seqs):
            raise ValueError(f"seq_buckets: ({t!r}, {s!r}) must pair a token bucket ({', '.join(map(str, tokens))}) "
                             f"with fewer sequence slots than its own, min(tokens, max_num_seqs={max_num_seqs})")
    return tuple(pairs)
