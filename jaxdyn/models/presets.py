"""Named model shapes (Hugging Face config.json dicts) for dummy-weight runs and benchmarks.

``jaxdyn generate --model llama-3.1-8b --load-format dummy`` builds the real
shapes with random weights, as vLLM's ``--load-format dummy`` does: the speed of
a model does not depend on its weights, so benchmarks need no download.
"""

from __future__ import annotations

import copy

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

PRESETS: dict[str, dict] = {
    # Small enough for CPU tests and CI; the shape of the shipped demo model.
    "tiny": dict(architectures=["LlamaForCausalLM"], vocab_size=512, hidden_size=128,
                 intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 rope_theta=10000.0, tie_word_embeddings=True, torch_dtype="float32",
                 bos_token_id=1, eos_token_id=2),
    "llama-3.2-1b": dict(architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=2048,
                         intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=dict(_LLAMA3_ROPE, factor=32.0),
                         tie_word_embeddings=True, torch_dtype="bfloat16",
                         bos_token_id=128000, eos_token_id=[128001, 128008, 128009]),
    "llama-3.1-8b": dict(architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=dict(_LLAMA3_ROPE, factor=8.0),
                         tie_word_embeddings=False, torch_dtype="bfloat16",
                         bos_token_id=128000, eos_token_id=[128001, 128008, 128009]),
    "qwen3-0.6b": dict(architectures=["Qwen3ForCausalLM"], vocab_size=151936, hidden_size=1024,
                       intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                       rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
                       torch_dtype="bfloat16", bos_token_id=151643, eos_token_id=151645),
}


def preset_config(name: str) -> dict:
    try:
        return copy.deepcopy(PRESETS[name])
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
