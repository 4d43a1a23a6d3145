"""Which model class serves which Hugging Face architecture, and how to build it abstractly."""

from __future__ import annotations

from flax import nnx
from jax.sharding import Mesh

from jaxdyn.config import SUPPORTED_ARCHITECTURES, ConfigError, ModelConfig
from jaxdyn.models.llama import LlamaForCausalLM

# Every supported architecture is a flag set of the one Llama-family decoder.
MODEL_CLASSES = {arch: LlamaForCausalLM for arch in SUPPORTED_ARCHITECTURES}


def model_class(cfg: ModelConfig) -> type[nnx.Module]:
    try:
        return MODEL_CLASSES[cfg.architecture]
    except KeyError:
        raise ConfigError(f"unsupported architecture {cfg.architecture!r}") from None


def build_abstract_model(cfg: ModelConfig, mesh: Mesh, dtype) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graph and a state of ShapeDtypeStructs: shapes only, no memory."""
    cls = model_class(cfg)
    abstract = nnx.eval_shape(lambda: cls(cfg, mesh=mesh, dtype=dtype))
    return nnx.split(abstract)
