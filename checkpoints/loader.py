"""One way in for every model source: a converted (Orbax) or Hugging Face directory, or a preset."""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
from flax import nnx

from checkpoints.convert import is_converted, load_converted, read_marker
from checkpoints.dummy import init_dummy_weights
from checkpoints.hf import CheckpointError, LoadedModel, load_hf_checkpoint, untie_a_distinct_head
from checkpoints.safetensors_io import CheckpointFiles, SafetensorsError
from jaxdyn.config import QUANTIZATIONS, ConfigError, ModelConfig, hub_id_hint
from jaxdyn.engine.tokenizer import Tokenizer, TokenizerError
from jaxdyn.models.presets import PRESETS, preset_config
from jaxdyn.models.registry import build_abstract_model
from jaxdyn.parallel.sharding import make_mesh

LOAD_FORMATS = ("auto", "dummy")

log = logging.getLogger("jaxdyn.loader")


@dataclasses.dataclass(frozen=True)
class ModelPlan:
    """What loading ``model`` will produce, known before any weight is read: its mesh, config and dtype, the
    model's graph and a state of ``ShapeDtypeStruct``s (what an engine's steps are compiled against, so
    compiling can start while the weights load), and its tokenizer."""
    model: str
    source: str                  # "dummy", "converted" or "hf"
    mesh: jax.sharding.Mesh
    config: ModelConfig
    dtype: jnp.dtype
    graphdef: nnx.GraphDef
    abstract: nnx.State
    tokenizer: Tokenizer | None


def plan_model(model: str, *, tp: int = 1, dtype=None, load_format: str = "auto", mesh=None,
               quantization: str | None = None, quantize_lm_head: bool = False) -> ModelPlan:
    """Check ``model`` and read its config, dtype and tokenizer; no weights. Raises CheckpointError naming
    what is wrong. ``quantization`` ("fp8": w8a8; "int8": weights only): a Hugging Face checkpoint of float
    weights quantized as it loads, on the devices, to what ``jaxdyn convert --quant`` would write (vLLM's
    ``--quantization fp8``); random weights made quantized; a converted checkpoint must already be.
    ``quantize_lm_head``: an fp8 model's output projection in fp8 too (``ModelConfig.quantize_lm_head``), on the
    same terms."""
    if load_format not in LOAD_FORMATS:
        raise CheckpointError(f"load format {load_format!r}: expected one of {', '.join(LOAD_FORMATS)}")
    if quantization not in (None, *QUANTIZATIONS):
        raise CheckpointError(f"quantization {quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")
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
            source, dt = "dummy", dt or jnp.dtype(cfg.dtype)
        elif not os.path.isdir(model):
            raise CheckpointError(f"model {model!r}: no such directory{hub_id_hint(model)} (or use load format "
                                  f"dummy with a preset: {', '.join(sorted(PRESETS))})")
        elif is_converted(model):
            source, marker = "converted", read_marker(model)
            cfg = ModelConfig.from_pretrained(model)
            dt = dt or jnp.dtype(marker["dtype"])
        else:
            source = "hf"
            cfg = ModelConfig.from_pretrained(model)
            try:
                cfg = untie_a_distinct_head(cfg, CheckpointFiles(model), model)
            except SafetensorsError as e:
                raise CheckpointError(str(e)) from None
            dt = dt or jnp.dtype(cfg.dtype)
        if os.path.isdir(model) and os.path.exists(os.path.join(model, "tokenizer.json")):
            tokenizer = Tokenizer.from_pretrained(model)
        elif os.path.isdir(model):
            other = [n for n in ("tokenizer.model", "vocab.json") if os.path.exists(os.path.join(model, n))]
            log.warning("%s: no tokenizer.json%s: it is served without a tokenizer (requests must send token ids; "
                        "text prompts and chat are refused)", model,
                        f" (found {other[0]}, which jaxdyn does not read: save the tokenizer with transformers' "
                        f"fast tokenizer to get a tokenizer.json)" if other else "")
    except (ConfigError, TokenizerError) as e:
        raise CheckpointError(str(e)) from None
    if quantization is not None and quantization != cfg.quantization:
        if source == "converted":
            raise CheckpointError(
                f"{model}: a converted checkpoint of {cfg.quantization or 'float'} weights; quantization "
                f"{quantization} needs the Hugging Face checkpoint (quantized as it loads) or `jaxdyn convert "
                f"--quant {quantization}`")
        if cfg.quantization is not None:
            raise CheckpointError(f"{model}: already quantized ({cfg.quantization}), not {quantization}")
        cfg = dataclasses.replace(cfg, quantization=quantization)
    if quantize_lm_head and not cfg.quantize_lm_head:
        try:                # ModelConfig refuses a head quantized without fp8 weights
            cfg = dataclasses.replace(cfg, quantize_lm_head=True)
        except ConfigError as e:
            raise CheckpointError(f"--quantize-lm-head, {model}: {e} (add --quantization fp8)") from None
        if source == "converted":
            raise CheckpointError(f"{model}: a converted checkpoint with a float lm_head; --quantize-lm-head needs "
                                  f"the Hugging Face checkpoint or `jaxdyn convert --quant fp8 --quantize-lm-head`")
    graphdef, abstract = build_abstract_model(cfg, mesh, dt)
    return ModelPlan(model, source, mesh, cfg, dt, graphdef, abstract, tokenizer)


def load_weights(plan: ModelPlan) -> LoadedModel:
    """The weights ``plan`` describes, in the shapes, dtypes and shardings of ``plan.abstract``."""
    abstract = (plan.graphdef, plan.abstract)
    if plan.source == "dummy":
        return init_dummy_weights(plan.config, plan.mesh, dtype=plan.dtype, abstract=abstract)
    if plan.source == "converted":
        return load_converted(plan.model, plan.mesh, dtype=plan.dtype, config=plan.config, abstract=abstract)
    return load_hf_checkpoint(plan.model, plan.mesh, dtype=plan.dtype, config=plan.config, abstract=abstract)


def load_model(model: str, *, tp: int = 1, dtype=None, load_format: str = "auto", mesh=None,
               quantization: str | None = None, quantize_lm_head: bool = False,
               ) -> tuple[jax.sharding.Mesh, LoadedModel, Tokenizer | None]:
    """(mesh, weights, tokenizer or None). Raises CheckpointError naming what is wrong."""
    plan = plan_model(model, tp=tp, dtype=dtype, load_format=load_format, mesh=mesh, quantization=quantization,
                      quantize_lm_head=quantize_lm_head)
    return plan.mesh, load_weights(plan), plan.tokenizer


def model_config_and_tokenizer(model: str, *, load_format: str = "auto") -> tuple[ModelConfig, Tokenizer | None]:
    """The config and tokenizer of ``model`` without its weights (a frontend over workers)."""
    try:
        if load_format == "dummy" and model in PRESETS:
            return ModelConfig.from_dict(preset_config(model)), None
        if not os.path.isdir(model):
            raise CheckpointError(f"model {model!r}: no such directory{hub_id_hint(model)}")
        cfg = ModelConfig.from_pretrained(model)
        tok = (Tokenizer.from_pretrained(model)
               if os.path.exists(os.path.join(model, "tokenizer.json")) else None)
        return cfg, tok
    except (ConfigError, TokenizerError) as e:
        raise CheckpointError(str(e)) from None
