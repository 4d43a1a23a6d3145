"""One way in for every model source: a converted (Orbax) or Hugging Face directory, or a preset."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from checkpoints.convert import is_converted, load_converted
from checkpoints.dummy import init_dummy_weights
from checkpoints.hf import CheckpointError, LoadedModel, load_hf_checkpoint
from jaxdyn.config import ConfigError, ModelConfig
from jaxdyn.engine.tokenizer import Tokenizer, TokenizerError
from jaxdyn.models.presets import PRESETS, preset_config
from jaxdyn.parallel.sharding import make_mesh

LOAD_FORMATS = ("auto", "dummy")


def load_model(model: str, *, tp: int = 1, dtype=None, load_format: str = "auto", mesh=None
               ) -> tuple[jax.sharding.Mesh, LoadedModel, Tokenizer | None]:
    """(mesh, weights, tokenizer or None). Raises CheckpointError naming what is wrong."""
    if load_format not in LOAD_FORMATS:
        raise CheckpointError(f"load format {load_format!r}: expected one of {', '.join(LOAD_FORMATS)}")
    if mesh is None:
        if tp < 1 or tp > len(jax.devices()):
            raise CheckpointError(f"tensor parallelism {tp}: this machine has {len(jax.devices())} device(s)")
        mesh = make_mesh(tp)
    dt = jnp.dtype(dtype) if dtype else None
    tokenizer = None
    try:
        if load_format == "dummy":
            if model in PRESETS:
                cfg = ModelConfig.from_dict(preset_config(model))
            elif os.path.isdir(model):
                cfg = ModelConfig.from_pretrained(model)
            else:
                raise CheckpointError(f"model {model!r}: neither a directory nor a preset "
                                      f"({', '.join(sorted(PRESETS))})")
            loaded = init_dummy_weights(cfg, mesh, dtype=dt)
        else:
            if not os.path.isdir(model):
                raise CheckpointError(f"model {model!r}: no such directory (or use load format dummy "
                                      f"with a preset: {', '.join(sorted(PRESETS))})")
            loaded = (load_converted(model, mesh, dtype=dt) if is_converted(model)
                      else load_hf_checkpoint(model, mesh, dtype=dt))
        if os.path.isdir(model) and os.path.exists(os.path.join(model, "tokenizer.json")):
            tokenizer = Tokenizer.from_pretrained(model)
    except (ConfigError, TokenizerError) as e:
        raise CheckpointError(str(e)) from None
    return mesh, loaded, tokenizer


def model_config_and_tokenizer(model: str, *, load_format: str = "auto") -> tuple[ModelConfig, Tokenizer | None]:
    """The config and tokenizer of ``model`` without its weights (a frontend over workers)."""
    try:
        if load_format == "dummy" and model in PRESETS:
            return ModelConfig.from_dict(preset_config(model)), None
        if not os.path.isdir(model):
            raise CheckpointError(f"model {model!r}: no such directory")
        cfg = ModelConfig.from_pretrained(model)
        tok = (Tokenizer.from_pretrained(model)
               if os.path.exists(os.path.join(model, "tokenizer.json")) else None)
        return cfg, tok
    except (ConfigError, TokenizerError) as e:
        raise CheckpointError(str(e)) from None
