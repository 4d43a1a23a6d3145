"""ModelConfig: the facts of a decoder-only checkpoint, read from a Hugging Face config.json."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

FAMILY_ARCHITECTURES = {family: arch for arch, family in SUPPORTED_ARCHITECTURES.items()}
# the dtypes a config's dtype / torch_dtype may name ("auto": none given, the default)
CONFIG_DTYPES = ("bfloat16", "float16", "float32")

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def hub_id_hint(path: str) -> str:
    """For a model path that does not exist: a hint where it looks like a Hugging Face Hub id ("org/name"), which
    jaxdyn does not download."""
    path = os.fspath(path)
    if not os.path.exists(path) and re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not path.startswith("."):
        return (f" (a Hugging Face Hub id? jaxdyn reads local directories only: download it first, e.g. "
                f"`huggingface-cli download {path} --local-dir DIR`)")
    return ""


class ConfigError(ValueError):
    """A checkpoint's config.json that jaxdyn cannot serve, with the reason."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"          # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0        # llama3
    high_freq_factor: float = 4.0       # llama3
    original_max_position_embeddings: int = 8192  # llama3


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    family: str                         # llama | mistral | qwen2 | qwen3
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool                      # Qwen2, or Llama with attention_bias
    o_bias: bool                        # Llama/Qwen3 with attention_bias
    mlp_bias: bool
    qk_norm: bool                       # Qwen3: RMSNorm over head_dim on q and k
    # per layer: None (full attention) or the window in tokens (key j is seen by
    # query i when i - window < j <= i), as Hugging Face's sliding-window mask.
    sliding_windows: tuple[int | None, ...]
    dtype: str = "bfloat16"             # the checkpoint's dtype
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    quantization: str | None = None     # None | "int8" (weights only) | "fp8" (weights and activations)
    # fp8 models only: the output projection (lm_head, or the tied embedding's copy) in fp8 too
    quantize_lm_head: bool = False

    def __post_init__(self):
        if self.quantize_lm_head and self.quantization != "fp8":
            raise ConfigError(f"quantize_lm_head: only an fp8 model's lm_head is quantized (quantization is "
                              f"{self.quantization!r})")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dict(cls, hf: dict[str, Any]) -> "ModelConfig":
        if not isinstance(hf, dict):
            raise ConfigError(f"expected a JSON object, got {type(hf).__name__}")
        archs = hf.get("architectures") or []
        if not isinstance(archs, list):
            archs = [archs]
        if not archs and hf.get("model_type") in FAMILY_ARCHITECTURES:
            # no architectures (LlamaConfig().save_pretrained writes none): transformers' AutoModelForCausalLM picks
            # the model by model_type
            archs = [FAMILY_ARCHITECTURES[hf["model_type"]]]
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ConfigError(
                f"unsupported architecture {archs or hf.get('model_type')!r}; "
                f"jaxdyn serves {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        model_type = hf.get("model_type")
        if model_type is not None and model_type != family:
            # transformers' AutoModelForCausalLM picks the model by model_type: another family's math
            raise ConfigError(f"model_type {model_type!r} does not match the architecture {arch} ({family!r})")
        act = hf.get("hidden_act", "silu")
        if not isinstance(act, str):
            act = repr(act)
        if act != "silu":
            raise ConfigError(f"unsupported hidden_act {act!r} (only 'silu')")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if key not in hf:
                raise ConfigError(f"config.json lacks {key!r}")
        num_heads = _get(hf, "num_attention_heads", int, low=1)
        num_kv_heads = _get(hf, "num_key_value_heads", int, num_heads, low=1)
        if num_heads % num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={num_heads} is not a multiple of "
                f"num_key_value_heads={num_kv_heads}")
        hidden = _get(hf, "hidden_size", int, low=1)
        head_dim = _get(hf, "head_dim", int, 0, low=0) or hidden // num_heads
        if head_dim < 1:
            raise ConfigError(f"hidden_size={hidden} gives no head_dim over {num_heads} heads")
        num_layers = _get(hf, "num_hidden_layers", int, low=1)

        # the biases transformers' model of the family builds: Qwen2's q/k/v always (o never), Mistral none,
        # Llama and Qwen3 as attention_bias says; an MLP bias only in Llama (mlp_bias)
        attention_bias = _get(hf, "attention_bias", bool, False) if family in ("llama", "qwen3") else False
        qkv_bias = True if family == "qwen2" else attention_bias
        o_bias = attention_bias
        mlp_bias = _get(hf, "mlp_bias", bool, False) if family == "llama" else False

        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        if not all(type(t) is int and t >= 0 for t in eos_ids):
            raise ConfigError(f"eos_token_id must be a token id or a list of them, got {eos!r}")
        bos = hf.get("bos_token_id")
        if bos is not None and not (type(bos) is int and bos >= 0):
            raise ConfigError(f"bos_token_id must be a token id, got {bos!r}")
        dtype = hf.get("dtype") or hf.get("torch_dtype") or "auto"
        if isinstance(dtype, str) and dtype.startswith("torch."):
            dtype = dtype[len("torch."):]
        if dtype == "auto":
            dtype = "bfloat16"
        if dtype not in CONFIG_DTYPES:
            raise ConfigError(f"torch_dtype must be one of {', '.join(CONFIG_DTYPES)} or auto, got {dtype!r}")
        return cls(
            architecture=arch,
            family=family,
            vocab_size=_get(hf, "vocab_size", int, low=1),
            hidden_size=hidden,
            intermediate_size=_get(hf, "intermediate_size", int, low=1),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=_get(hf, "rms_norm_eps", float, 1e-6, low=0),
            rope=_rope_from_hf(hf),
            max_position_embeddings=_get(hf, "max_position_embeddings", int, 4096, low=1),
            tie_word_embeddings=_get(hf, "tie_word_embeddings", bool, False),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            qk_norm=family == "qwen3",
            sliding_windows=_sliding_windows_from_hf(hf, family, num_layers),
            dtype=dtype,
            bos_token_id=bos,
            eos_token_ids=eos_ids,
            quantization=_quantization(hf),
            quantize_lm_head=_quantize_lm_head(hf),
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ModelConfig":
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise ConfigError(f"{config_path}: no config.json in the checkpoint directory")
        with open(config_path, encoding="utf-8") as f:
            try:
                hf = json.load(f)
            except (ValueError, RecursionError) as e:
                raise ConfigError(f"{config_path}: not valid JSON ({e})") from e
        try:
            cfg = cls.from_dict(hf)
        except ConfigError as e:
            raise ConfigError(f"{config_path}: {e}") from None
        except (TypeError, ValueError, AttributeError, KeyError) as e:   # a value of a type no check above expects
            raise ConfigError(f"{config_path}: a value has the wrong type or form ({e!r})") from None
        # generation_config.json's EOS ids end generation too (Llama 3 lists <|eot_id|> there).
        extra = generation_config_eos_ids(path)
        if extra:
            cfg = dataclasses.replace(cfg, eos_token_ids=tuple(dict.fromkeys([*cfg.eos_token_ids, *extra])))
        return cfg


def generation_config_eos_ids(directory: str | os.PathLike) -> tuple[int, ...]:
    """The EOS ids a checkpoint directory's ``generation_config.json`` lists (() without the file), as ``ModelConfig``
    and the tokenizer both read them: integers as transformers takes them (a negative one it only warns of; the
    engine leaves out ids outside the vocabulary). A file that is not a JSON object, or an id that is not an integer
    (true included), is a ConfigError naming the file."""
    path = os.path.join(directory, "generation_config.json")
    if not os.path.isfile(path):
        return ()
    try:
        with open(path, encoding="utf-8") as f:
            gen = json.load(f)
    except (OSError, ValueError, RecursionError) as e:      # JSONDecodeError, not UTF-8: ValueError
        raise ConfigError(f"{path}: not a valid generation config ({str(e) or type(e).__name__})") from None
    if not isinstance(gen, dict):
        raise ConfigError(f"{path}: not a valid generation config (a JSON {type(gen).__name__}, not an object)")
    eos = gen.get("eos_token_id")
    ids = [] if eos is None else eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ConfigError(f"{path}: eos_token_id must be a token id or a list of them, not {json.dumps(eos)[:80]}")
    return tuple(ids)


# int8: weights only; fp8: weights and activations (w8a8) (``jaxdyn.models.llama.Linear``)
QUANTIZATIONS = ("int8", "fp8")


def _quantization(hf: dict[str, Any]) -> str | None:
    q = hf.get("jaxdyn_quantization")
    if q not in (None, *QUANTIZATIONS):
        raise ConfigError(f"jaxdyn_quantization {q!r} is not supported ({', '.join(QUANTIZATIONS)})")
    if q is None and hf.get("quantization_config"):
        raise ConfigError(f"quantization_config {hf['quantization_config'].get('quant_method', '?')!r}: "
                          "pre-quantized Hugging Face checkpoints are not supported; convert the "
                          "unquantized checkpoint with `jaxdyn convert --quant int8|fp8`")
    return q


def _quantize_lm_head(hf: dict[str, Any]) -> bool:
    q = hf.get("jaxdyn_quantize_lm_head", False)
    if not isinstance(q, bool):
        raise ConfigError(f"jaxdyn_quantize_lm_head {q!r}: expected true or false")
    return q        # with jaxdyn_quantization fp8 only: ModelConfig checks it


_REQUIRED = object()


def _get(d: dict[str, Any], key: str, kind: type, default: Any = _REQUIRED, *, low: float | None = None,
         where: str = "") -> Any:
    """``d[key]`` checked to be of ``kind`` (int: an integer, or a float that is one; float: a finite number;
    bool: true or false) and at least ``low``; ``default`` when absent or null."""
    v = d.get(key)
    name = where + key
    if v is None:
        if default is _REQUIRED:
            raise ConfigError(f"config.json lacks {name!r}")
        return default
    if kind is int:
        if not (type(v) is int or (type(v) is float and v.is_integer())):
            raise ConfigError(f"{name} must be an integer, got {v!r}")
        v = int(v)
    elif kind is float:
        if type(v) not in (int, float) or not math.isfinite(v):
            raise ConfigError(f"{name} must be a number, got {v!r}")
        v = float(v)
    elif kind is bool and type(v) is not bool:
        raise ConfigError(f"{name} must be true or false, got {v!r}")
    if low is not None and v < low:
        raise ConfigError(f"{name} must be at least {low}, got {v!r}")
    return v


def _rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
    """transformers 5 writes `rope_parameters` (theta inside); 4.x wrote `rope_theta` and `rope_scaling`. Both
    are read as transformers 5 reads them (`convert_rope_params_to_dict`, `standardize_rope_params`): a
    `rope_scaling` wins over `rope_parameters` (what a user adds to a saved config, as Qwen's model cards say
    for YaRN); theta comes from the chosen object, else the top-level `rope_theta`, else 10000; llama3's
    `original_max_position_embeddings` from the top level, else the object, else `max_position_embeddings`."""
    for key in ("rope_parameters", "rope_scaling"):
        if hf.get(key) is not None and not isinstance(hf[key], dict):
            raise ConfigError(f"{key} must be an object, got {hf[key]!r}")
    if hf.get("rope_scaling"):
        params, where = dict(hf["rope_scaling"]), "rope_scaling."
    else:
        params, where = dict(hf.get("rope_parameters") or {}), "rope_parameters."
    if params and "rope_type" not in params and "type" not in params and any(
            isinstance(v, dict) for v in params.values()):
        # transformers 5's per-layer-type form ({"full_attention": {...}, "sliding_attention": {...}})
        raise ConfigError(f"{where[:-1]}: rope parameters per layer type ({sorted(params)}) are not supported")
    for partial in (params.get("partial_rotary_factor"), hf.get("partial_rotary_factor")):
        if partial is not None and partial != 1:
            raise ConfigError(f"partial_rotary_factor {partial!r}: rotary embedding of part of a head is not "
                              "supported")
    theta = _get(params, "rope_theta", float, None, low=0, where=where) or _get(hf, "rope_theta", float, 10000.0,
                                                                                low=0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type is None and ("rope_type" in params or "type" in params) and len(params) > 1:
        raise ConfigError(f"{where}rope_type is null beside other rope parameters ({sorted(params)})")
    rope_type = rope_type or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"unsupported rope_type {rope_type!r} (in {where[:-1]}); supported: "
                          f"{SUPPORTED_ROPE_TYPES}")
    if rope_type == "default":
        return RopeConfig(theta=theta)
    # transformers' rope functions read these without defaults (a KeyError there)
    needed = ("factor",) if rope_type == "linear" else ("factor", "low_freq_factor", "high_freq_factor")
    lacking = [k for k in needed if params.get(k) is None]
    if lacking:
        raise ConfigError(f"{where[:-1]} of rope_type {rope_type!r} lacks {lacking[0]!r}")
    factor = _get(params, "factor", float, 1.0, low=0, where=where)
    if rope_type == "linear":
        return RopeConfig(theta=theta, rope_type="linear", factor=factor)
    if hf.get("original_max_position_embeddings") is not None:
        # transformers' rope functions standardize the parameters again when the model is built, and a top-level
        # key (then an attribute of the config) wins there, whatever the loaded config's rope_parameters show
        original = _get(hf, "original_max_position_embeddings", int, low=1)
    else:
        original = _get(params, "original_max_position_embeddings", int, None, low=1, where=where) or \
            _get(hf, "max_position_embeddings", int, 4096, low=1)
    return RopeConfig(
        theta=theta,
        rope_type="llama3",
        factor=factor,
        low_freq_factor=_get(params, "low_freq_factor", float, 1.0, low=0, where=where),
        high_freq_factor=_get(params, "high_freq_factor", float, 4.0, low=0, where=where),
        original_max_position_embeddings=original,
    )


def _sliding_windows_from_hf(hf: dict[str, Any], family: str, num_layers: int) -> tuple[int | None, ...]:
    """Each layer's attention window (None: full), as transformers' model of the family reads the config: Llama
    has none (it reads neither sliding_window nor layer_types); Mistral windows every layer by sliding_window (4096
    when the key is absent, none when it is null; layer_types is not read); Qwen2 / Qwen3 window nothing unless
    use_sliding_window, then the layers layer_types names "sliding_attention" (by default those from
    max_window_layers, 28 by default, on) by sliding_window (4096 by default)."""
    none = (None,) * num_layers
    if family == "llama":
        return none
    # transformers' default when the key is absent; none when it is null
    window = _get(hf, "sliding_window", int, 4096 if "sliding_window" not in hf else 0, low=0) or None
    if family == "mistral":
        return (window,) * num_layers
    layer_types = hf.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list):
            raise ConfigError(f"layer_types must be a list, got {layer_types!r}")
        if len(layer_types) != num_layers:
            raise ConfigError(f"layer_types has {len(layer_types)} entries for {num_layers} layers")
        odd = next((t for t in layer_types if t not in ("full_attention", "sliding_attention")), None)
        if odd is not None:
            raise ConfigError(f"layer_types: {odd!r} is not supported (full_attention or sliding_attention)")
    if not _get(hf, "use_sliding_window", bool, False):
        if layer_types is not None and "sliding_attention" in layer_types:
            raise ConfigError("layer_types names sliding_attention layers but use_sliding_window is false "
                              "(transformers then has no window for them and refuses the mask)")
        return none
    if not window:
        if layer_types is not None and "sliding_attention" in layer_types:
            raise ConfigError("layer_types names sliding_attention layers but sliding_window is null")
        return none
    if layer_types is not None:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    first = _get(hf, "max_window_layers", int, 28, low=0)
    return tuple(window if i >= first else None for i in range(num_layers))
