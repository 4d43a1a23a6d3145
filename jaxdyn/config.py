"""ModelConfig: the facts of a decoder-only checkpoint, read from a Hugging Face config.json."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


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
        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ConfigError(
                f"unsupported architecture {archs or hf.get('model_type')!r}; "
                f"jaxdyn serves {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"unsupported hidden_act {act!r} (only 'silu')")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if key not in hf:
                raise ConfigError(f"config.json lacks {key!r}")
        num_heads = int(hf["num_attention_heads"])
        num_kv_heads = int(hf.get("num_key_value_heads") or num_heads)
        if num_heads % num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={num_heads} is not a multiple of "
                f"num_key_value_heads={num_kv_heads}")
        hidden = int(hf["hidden_size"])
        head_dim = int(hf.get("head_dim") or hidden // num_heads)
        num_layers = int(hf["num_hidden_layers"])

        attention_bias = bool(hf.get("attention_bias", False))
        qkv_bias = True if family == "qwen2" else attention_bias
        o_bias = False if family == "qwen2" else attention_bias

        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            architecture=arch,
            family=family,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=_rope_from_hf(hf),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=family == "qwen3",
            sliding_windows=_sliding_windows_from_hf(hf, family, num_layers),
            dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "bfloat16"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            quantization=_quantization(hf),
            quantize_lm_head=_quantize_lm_head(hf),
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ModelConfig":
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise ConfigError(f"{config_path}: no config.json in the checkpoint directory")
        with open(config_path) as f:
            try:
                hf = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{config_path}: not valid JSON ({e})") from e
        try:
            cfg = cls.from_dict(hf)
        except ConfigError as e:
            raise ConfigError(f"{config_path}: {e}") from None
        # generation_config.json's EOS ids end generation too (Llama 3 lists <|eot_id|> there).
        gen_path = os.path.join(path, "generation_config.json")
        if os.path.isfile(gen_path):
            try:
                with open(gen_path) as f:
                    eos = json.load(f).get("eos_token_id")
            except (json.JSONDecodeError, AttributeError) as e:
                raise ConfigError(f"{gen_path}: not a valid generation config ({e})") from None
            extra = eos if isinstance(eos, list) else ([] if eos is None else [eos])
            if not all(isinstance(t, int) for t in extra):
                raise ConfigError(f"{gen_path}: eos_token_id must be an integer or a list of integers")
            cfg = dataclasses.replace(cfg, eos_token_ids=tuple(dict.fromkeys([*cfg.eos_token_ids, *extra])))
        return cfg


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


def _rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
    # transformers 5 writes `rope_parameters` (theta inside); 4.x wrote
    # `rope_theta` and `rope_scaling`. Accept both.
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    if not params:
        params = dict(scaling)
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"unsupported rope_type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")
    if rope_type == "default":
        return RopeConfig(theta=theta)
    factor = float(params.get("factor", 1.0))
    if rope_type == "linear":
        return RopeConfig(theta=theta, rope_type="linear", factor=factor)
    return RopeConfig(
        theta=theta,
        rope_type="llama3",
        factor=factor,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def _sliding_windows_from_hf(hf: dict[str, Any], family: str, num_layers: int) -> tuple[int | None, ...]:
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
    if not window:
        return (None,) * num_layers
    window = int(window)
    if layer_types is not None:
        if len(layer_types) != num_layers:
            raise ConfigError(f"layer_types has {len(layer_types)} entries for {num_layers} layers")
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if family == "mistral":
        return (window,) * num_layers
    if hf.get("use_sliding_window", False):
        first = int(hf.get("max_window_layers", num_layers))
        return tuple(window if i >= first else None for i in range(num_layers))
    return (None,) * num_layers
