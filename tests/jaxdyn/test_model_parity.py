"""The model matches Hugging Face transformers (CPU torch, float32) logit for logit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints.hf import load_hf_checkpoint
from jaxdyn.engine.runner import ModelRunner, RunnerConfig, SequenceWork
from jaxdyn.kv.cache import AttentionMetadata, KVCacheSpec, allocate_kv_cache
from jaxdyn.parallel.sharding import make_mesh, stored_kv_heads
from tests.support import FAMILIES, hf_greedy, hf_model, make_hf_checkpoint, rel_err

NUM_DECODE = 16
PROMPT_LEN = 37          # not a multiple of the page size: the last page is partial
TOL = 1e-4


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
    # The 1e-4 bound is for float32 arithmetic; on GPU XLA's default for a float32 dot is TF32.
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_case(request, tmp_path_factory):
    family = request.param
    path = make_hf_checkpoint(family, str(tmp_path_factory.mktemp(family)))
    prompt = np.random.default_rng(1).integers(0, 256, PROMPT_LEN).tolist()
    continuation, logits = hf_greedy(hf_model(path), prompt, NUM_DECODE)
    return family, path, prompt, continuation, logits


def _runner(path, tp, num_pages=64):
    mesh = make_mesh(tp)
    loaded = load_hf_checkpoint(path, mesh, dtype=jnp.float32)
    cfg = RunnerConfig(num_pages=num_pages, max_num_batched_tokens=64, max_num_seqs=4,
                       max_model_len=128, return_logits=True)
    return ModelRunner(loaded.graphdef, loaded.state, mesh, cfg)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_prefill_and_decode_match_hf_with_shuffled_pages_and_chunked_prefill(family_case, tp):
    """Two copies of one prompt share each step: A has shuffled pages and one prefill,
    B in-order pages and a prefill in three chunks that overlap A's decode steps."""
    if tp > len(jax.devices()):   # on one GPU the model runs with the Pallas kernels at TP 1 only
        pytest.skip(f"tensor_parallel={tp} needs {tp} devices")
    family, path, prompt, continuation, ref = family_case
    runner = _runner(path, tp)
    rng = np.random.default_rng(tp)
    perm = rng.permutation(runner.config.num_pages)
    pages_a = perm[:4].tolist()                # shuffled, not in order
    pages_b = sorted(perm[4:8].tolist())       # in order
    chunks_b = [prompt[:13], prompt[13:29], prompt[29:]]

    tokens_a, tokens_b = [], []
    done_b = 0
    for step in range(NUM_DECODE + len(chunks_b) - 1):
        work, targets = [], []
        if step == 0:
            work.append(SequenceWork(prompt, 0, pages_a))
        elif len(tokens_a) < NUM_DECODE:
            work.append(SequenceWork([tokens_a[-1]], PROMPT_LEN + len(tokens_a) - 1, pages_a))
        else:
            work.append(None)
        targets.append(PROMPT_LEN + len(tokens_a) - 1)
        if step < len(chunks_b):
            work.append(SequenceWork(chunks_b[step], done_b, pages_b))
            done_b += len(chunks_b[step])
            targets.append(done_b - 1)
        elif len(tokens_b) < NUM_DECODE:
            work.append(SequenceWork([tokens_b[-1]], PROMPT_LEN + len(tokens_b) - 1, pages_b))
            targets.append(PROMPT_LEN + len(tokens_b) - 1)
        live = [(w, t, i) for i, (w, t) in enumerate(zip(work, targets)) if w is not None]
        out = runner.step([w for w, _, _ in live])
        for j, (w, target, who) in enumerate(live):
            err = rel_err(out.logits[j], ref[target])
            assert err < TOL, f"{family} tp={tp} seq={'AB'[who]} position {target}: rel err {err:.2e}"
            if target >= PROMPT_LEN - 1:
                (tokens_a if who == 0 else tokens_b).append(int(out.next_token_ids[j]))
    assert tokens_a == continuation, family
    assert tokens_b == continuation, family


def test_prefill_logits_at_every_position_match_hf(family_case):
    """The model function itself, called with every row's logits, over a paged cache."""
    family, path, prompt, _, ref = family_case
    mesh = make_mesh(1)
    loaded = load_hf_checkpoint(path, mesh, dtype=jnp.float32)
    cfg = loaded.config
    spec = KVCacheSpec(cfg.num_layers, stored_kv_heads(cfg.num_kv_heads, 1), 8, 16, cfg.head_dim,
                       jnp.float32)
    kv = allocate_kv_cache(spec, mesh)
    pages = np.array([5, 2, 7], np.int32)
    pos = np.arange(PROMPT_LEN, dtype=np.int32)
    md = AttentionMetadata(positions=pos, slot_page=pages[pos // 16], slot_offset=pos % 16,
                           page_table=pages[None], kv_lens=np.array([PROMPT_LEN], np.int32),
                           cu_q_lens=np.array([0, PROMPT_LEN], np.int32))

    @jax.jit
    def forward(state, kv, ids, md):
        from flax import nnx
        model = nnx.merge(loaded.graphdef, state)
        kv, hidden = model(kv, ids, md)
        return model.compute_logits(hidden)

    logits = np.asarray(forward(loaded.state, kv, np.asarray(prompt, np.int32), md))
    err = rel_err(logits, ref[:PROMPT_LEN])
    assert err < TOL, f"{family}: rel err {err:.2e}"
