"""ModelConfig from Hugging Face config.json dictionaries of every supported family."""

import copy
import json
import re

import numpy as np
import pytest

from jaxdyn.config import ConfigError, ModelConfig
from jaxdyn.models.llama import rope_inv_freq

LLAMA = {"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64,
         "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2}


def test_transformers4_and_5_rope_keys_read_the_same():
    v4 = {**LLAMA, "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}}
    v5 = {**LLAMA, "rope_parameters": {"rope_theta": 500000.0, **v4["rope_scaling"]}}
    assert ModelConfig.from_dict(v4).rope == ModelConfig.from_dict(v5).rope
    assert ModelConfig.from_dict(v4).rope.rope_type == "llama3"


def test_llama3_rope_scaling_matches_transformers():
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    hf_cfg = LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "architectures"},
                         rope_theta=500000.0, rope_scaling=scaling)
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, torch.device("cpu"))
    ours = rope_inv_freq(ModelConfig.from_dict({**LLAMA, **hf_cfg.to_dict(),
                                                "architectures": ["LlamaForCausalLM"]}).rope, 16)
    np.testing.assert_allclose(ours, want.numpy(), rtol=1e-6)


def test_family_flags():
    qwen2 = ModelConfig.from_dict({**LLAMA, "architectures": ["Qwen2ForCausalLM"]})
    assert qwen2.qkv_bias and not qwen2.o_bias and not qwen2.qk_norm
    qwen3 = ModelConfig.from_dict({**LLAMA, "architectures": ["Qwen3ForCausalLM"], "head_dim": 32})
    assert qwen3.qk_norm and qwen3.head_dim == 32
    llama_bias = ModelConfig.from_dict({**LLAMA, "attention_bias": True})
    assert llama_bias.qkv_bias and llama_bias.o_bias
    mqa = ModelConfig.from_dict({**LLAMA, "num_key_value_heads": 1})
    assert mqa.num_kv_heads == 1 and mqa.head_dim == 16


def test_sliding_windows_per_layer():
    mistral = ModelConfig.from_dict({**LLAMA, "architectures": ["MistralForCausalLM"],
                                     "sliding_window": 4096})
    assert mistral.sliding_windows == (4096, 4096)
    qwen = ModelConfig.from_dict({**LLAMA, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 64,
                                  "use_sliding_window": True, "layer_types": ["full_attention", "sliding_attention"]})
    assert qwen.sliding_windows == (None, 64)
    off = ModelConfig.from_dict({**LLAMA, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 64,
                                 "use_sliding_window": False})
    assert off.sliding_windows == (None, None)


def test_sliding_windows_as_transformers_reads_each_family():
    """transformers 5's models: Llama has no window whatever the config says; Mistral windows every layer (4096
    when sliding_window is absent, none when null) and does not read layer_types; Qwen2/Qwen3 window nothing
    without use_sliding_window, and with it the layers from max_window_layers (28 by default) by sliding_window
    (4096 by default). Configs transformers cannot run are refused."""
    def windows(arch, **kw):
        return ModelConfig.from_dict({**LLAMA, "num_hidden_layers": 30, "architectures": [arch], **kw}).sliding_windows
    both = ["full_attention", "sliding_attention"] * 15
    assert windows("LlamaForCausalLM", sliding_window=64, layer_types=both) == (None,) * 30
    assert windows("MistralForCausalLM") == (4096,) * 30
    assert windows("MistralForCausalLM", sliding_window=None) == (None,) * 30
    assert windows("MistralForCausalLM", sliding_window=64, layer_types=both) == (64,) * 30
    assert windows("Qwen2ForCausalLM", sliding_window=64, layer_types=["full_attention"] * 30) == (None,) * 30
    assert windows("Qwen3ForCausalLM", use_sliding_window=True) == (None,) * 28 + (4096,) * 2
    assert windows("Qwen2ForCausalLM", use_sliding_window=True, sliding_window=64, max_window_layers=10) == \
        (None,) * 10 + (64,) * 20
    for kw, words in (({"layer_types": both, "sliding_window": 64}, "use_sliding_window is false"),
                      ({"layer_types": ["chunked_attention"] * 30, "use_sliding_window": True}, "chunked_attention"),
                      ({"layer_types": both, "use_sliding_window": True, "sliding_window": None}, "null")):
        with pytest.raises(ConfigError, match=words):
            windows("Qwen2ForCausalLM", **kw)


def test_biases_and_model_type_as_transformers_reads_each_family():
    """Mistral builds no biases and Qwen2/Qwen3 no MLP bias whatever attention_bias / mlp_bias say (a checkpoint
    with such tensors is then refused by the loader, not served with them); a model_type of another family (which
    transformers' auto class would load instead) is refused."""
    on = {"attention_bias": True, "mlp_bias": True}
    m = ModelConfig.from_dict({**LLAMA, "architectures": ["MistralForCausalLM"], **on})
    assert not (m.qkv_bias or m.o_bias or m.mlp_bias)
    q = ModelConfig.from_dict({**LLAMA, "architectures": ["Qwen3ForCausalLM"], **on})
    assert q.qkv_bias and q.o_bias and not q.mlp_bias
    q2 = ModelConfig.from_dict({**LLAMA, "architectures": ["Qwen2ForCausalLM"], **on})
    assert q2.qkv_bias and not q2.o_bias and not q2.mlp_bias
    llama = ModelConfig.from_dict({**LLAMA, **on, "model_type": "llama"})
    assert llama.qkv_bias and llama.o_bias and llama.mlp_bias
    with pytest.raises(ConfigError, match="model_type 'mistral' does not match the architecture LlamaForCausalLM"):
        ModelConfig.from_dict({**LLAMA, "model_type": "mistral"})


@pytest.mark.parametrize("change,message", [
    ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
    # rope configs transformers cannot run (a KeyError or a shape mismatch there), refused rather than defaulted
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks 'low_freq_factor'"),
    ({"rope_scaling": {"rope_type": "linear"}}, "lacks 'factor'"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}},
     "partial_rotary_factor 0.25"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6}}}, "per layer type"),
    ({"rope_scaling": {"rope_type": None, "type": "yarn"}}, "rope_type is null"),
    ({"num_key_value_heads": 3}, "not a multiple"),
])
def test_unsupported_configs_are_named(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({**LLAMA, **change})


@pytest.mark.parametrize("change,message", [
    ({"hidden_size": None}, "lacks 'hidden_size'"),
    ({"hidden_size": "64"}, "hidden_size must be an integer, got '64'"),
    ({"num_hidden_layers": 2.5}, "num_hidden_layers must be an integer, got 2.5"),
    ({"num_attention_heads": 0}, "num_attention_heads must be at least 1"),
    ({"rms_norm_eps": "abc"}, "rms_norm_eps must be a number"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a number"),
    ({"max_position_embeddings": 0}, "max_position_embeddings must be at least 1"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
    ({"rope_parameters": "oops"}, "rope_parameters must be an object"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "x"}}, "rope_scaling.factor must be a number"),
    ({"eos_token_id": "x"}, "eos_token_id must be a token id"),
    ({"eos_token_id": [1, -2]}, "eos_token_id must be a token id"),
    ({"bos_token_id": 1.5}, "bos_token_id must be a token id"),
    ({"architectures": ["MistralForCausalLM"], "sliding_window": "abc"}, "sliding_window must be an integer"),
    ({"architectures": ["MistralForCausalLM"], "sliding_window": -5}, "sliding_window must be at least 0"),
    ({"architectures": "LlamaForCausalLM", "hidden_act": ["silu"]}, "hidden_act"),
])
def test_values_of_the_wrong_type_are_named(change, message):
    """A config.json value of the wrong type or range is a ConfigError naming it, not a TypeError or a value
    silently truncated (2.5 layers) or read as true ("yes")."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        ModelConfig.from_dict({**LLAMA, **change})


def test_a_config_json_that_is_not_an_object_is_named(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(ConfigError, match=r"config\.json: expected a JSON object, got list"):
        ModelConfig.from_pretrained(tmp_path)


def test_missing_config_json_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA, "architectures": ["BertModel"]}))
    with pytest.raises(ConfigError, match=r"config\.json: unsupported architecture"):
        ModelConfig.from_pretrained(tmp_path)


def test_generation_config_eos_ids_join_the_config_ones(tmp_path):
    import json
    from jaxdyn.config import ModelConfig
    hf = dict(architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=32, intermediate_size=64,
              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, eos_token_id=5)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 9]}))
    assert ModelConfig.from_pretrained(str(tmp_path)).eos_token_ids == (5, 9)


@pytest.mark.parametrize("content", [b"[" * 5000 + b"]" * 5000, b'{"eos_token_id": "\xff"}', b"[5]", b"{"])
def test_a_generation_config_that_cannot_be_read_is_named(tmp_path, content):
    hf = dict(architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=32, intermediate_size=64,
              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, eos_token_id=5)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    (tmp_path / "generation_config.json").write_bytes(content)
    with pytest.raises(ConfigError, match=r"generation_config\.json: not a valid generation config"):
        ModelConfig.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("eos", [True, [5, False], "9", [9.0]])
def test_generation_config_eos_ids_that_are_not_ids_are_named_as_the_tokenizer_names_them(tmp_path, eos):
    """ModelConfig and the tokenizer read generation_config.json's EOS ids with one reader: ``true`` (an int to
    Python) was id 1 to ModelConfig and an error to the tokenizer."""
    from jaxdyn.engine.tokenizer import Tokenizer, TokenizerError
    from tests.support import make_byte_tokenizer
    hf = dict(architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=32, intermediate_size=64,
              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, eos_token_id=5)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    make_byte_tokenizer(str(tmp_path))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    with pytest.raises(ConfigError, match=r"generation_config\.json: eos_token_id must be a token id"):
        ModelConfig.from_pretrained(str(tmp_path))
    with pytest.raises(TokenizerError, match=r"generation_config\.json: eos_token_id must be a token id"):
        Tokenizer.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("case", ["scaling_beside_parameters", "llama3_without_original", "original_on_top"])
def test_rope_is_read_as_transformers_5_reads_it(case):
    """Where a config holds both keys, or leaves llama3's pretraining length out, the rotary frequencies are
    transformers 5's: a user's ``rope_scaling`` over the saved ``rope_parameters`` (Qwen's model cards tell users
    to add one for long context); llama3's ``original_max_position_embeddings`` from the top level, else the rope
    object, else ``max_position_embeddings``. Read otherwise, the model runs silently wrong."""
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0}
    extra = {
        "scaling_beside_parameters": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
                                      "rope_scaling": {"type": "linear", "factor": 4.0}},
        "llama3_without_original": {"rope_parameters": llama3, "max_position_embeddings": 512},
        "original_on_top": {"rope_parameters": {**llama3, "original_max_position_embeddings": 32},
                            "original_max_position_embeddings": 64, "max_position_embeddings": 512},
    }[case]
    d = {**LLAMA, **extra}
    hf = LlamaConfig.from_dict(copy.deepcopy({k: v for k, v in d.items() if k != "architectures"}))  # it edits them
    rope_type = hf.rope_parameters["rope_type"]
    init = ROPE_INIT_FUNCTIONS.get(rope_type, LlamaRotaryEmbedding.compute_default_rope_parameters)
    want, _ = init(hf, torch.device("cpu"))
    ours = ModelConfig.from_dict(d).rope
    assert ours.rope_type == rope_type
    np.testing.assert_allclose(rope_inv_freq(ours, 16), want.numpy(), rtol=1e-6)
    if case == "scaling_beside_parameters":
        assert ours.factor == 4.0
    else:
        assert ours.original_max_position_embeddings == {"llama3_without_original": 512, "original_on_top": 64}[case]


def test_an_unsupported_rope_scaling_beside_saved_parameters_is_refused():
    d = {**LLAMA, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
         "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}}
    with pytest.raises(ConfigError, match=r"unsupported rope_type 'yarn' \(in rope_scaling\)"):
        ModelConfig.from_dict(d)


def test_a_config_without_architectures_is_read_by_its_model_type():
    """LlamaConfig().save_pretrained writes no architectures; transformers' AutoModelForCausalLM picks the model by
    model_type, and so does jaxdyn now (it refused "unsupported architecture 'llama'")."""
    from transformers import LlamaConfig, Qwen2Config
    for cls, arch in ((LlamaConfig, "LlamaForCausalLM"), (Qwen2Config, "Qwen2ForCausalLM")):
        hf = cls(**{k: v for k, v in LLAMA.items() if k != "architectures"}).to_dict()
        assert not hf.get("architectures")
        assert ModelConfig.from_dict(hf).architecture == arch
    with pytest.raises(ConfigError, match="unsupported architecture 'gpt2'"):
        ModelConfig.from_dict({k: v for k, v in LLAMA.items() if k != "architectures"} | {"model_type": "gpt2"})


def test_config_dtypes_are_checked_where_they_are_read():
    """An unknown dtype in config.json was taken and failed later as a raw TypeError ("data type 'x' not
    understood", a traceback from `jaxdyn worker`); "auto" (none given) is the default and "torch.float16" is
    float16."""
    assert ModelConfig.from_dict({**LLAMA, "torch_dtype": "auto"}).dtype == "bfloat16"
    assert ModelConfig.from_dict({**LLAMA, "dtype": "torch.float16"}).dtype == "float16"
    assert ModelConfig.from_dict({**LLAMA, "torch_dtype": "float32"}).dtype == "float32"
    for bad in ("fp17", 3, "int8"):
        with pytest.raises(ConfigError, match="torch_dtype must be one of bfloat16, float16, float32 or auto"):
            ModelConfig.from_dict({**LLAMA, "torch_dtype": bad})
