"""Where a request's prompt is computed: on the prefill mesh (remote) or the decode mesh (local).

Remote prefill keeps long prompts from stalling the decode batch (DistServe);
it costs a KV transfer and a queue. The policy keeps a prompt local when that
cost is not worth paying, as Dynamo's disaggregated router does:

* ``short_prompt``: fewer than ``min_remote_tokens`` prompt tokens;
* ``prefix_hit``: the decode side's prefix cache already holds all but fewer
  than ``min_remote_tokens`` of them;
* ``prefill_queue``: ``max_prefill_queue`` prompts are already waiting for or
  running on the prefill side;
* ``n``: several completions of one prompt (they share its pages locally);
* ``prompt_logprobs``: the request scores its prompt's tokens (the decode side's step returns them; a
  prefill's hand-over carries KV only);
* ``decode_full``: the decode side cannot reserve pages for the KV now;
* ``prefill_down``: the prefill side has failed;
* ``prefill_unreachable``: sent remote, but no prefill worker could be reached before it answered (the
  decode side computes the prompt; counted here instead of ``remote``).

Every decision is counted (``EngineMetrics.prefill_decisions``, exported as
``jaxdyn:disagg_prefill_decisions_total{decision=...}``); a remote one once its prefill is over (handed off,
failed or aborted), since one that no worker answers becomes ``prefill_unreachable``.
"""

from __future__ import annotations

import dataclasses

REMOTE = "remote"


# a remote prefill's timeout at most a day: a gRPC deadline of 1e12 s or inf is exceeded at once (grpcio 1.85)
MAX_PREFILL_TIMEOUT_S = 86400.0


@dataclasses.dataclass(frozen=True)
class DisaggPolicy:
    min_remote_tokens: int = 64
    max_prefill_queue: int = 64
    prefill_timeout_s: float = 120.0      # a remote prefill not done by then ends with an error

    def __post_init__(self):
        # NaN compares false
        if (self.min_remote_tokens < 0 or self.max_prefill_queue < 0
                or not 0 < self.prefill_timeout_s <= MAX_PREFILL_TIMEOUT_S):
            raise ValueError(f"invalid disaggregation policy {self}")

    def decide(self, *, prompt_len: int, decode_cached: int, prefill_queue: int, n: int,
               prefill_alive: bool, prompt_logprobs: bool = False) -> str:
        """``REMOTE`` or the reason the prompt stays local (before page reservation)."""
        if not prefill_alive:
            return "prefill_down"
        if n != 1:
            return "n"
        if prompt_logprobs:
            return "prompt_logprobs"
        if prompt_len < self.min_remote_tokens:
            return "short_prompt"
        if prompt_len - decode_cached < self.min_remote_tokens:
            return "prefix_hit"
        if prefill_queue >= self.max_prefill_queue:
            return "prefill_queue"
        return REMOTE
