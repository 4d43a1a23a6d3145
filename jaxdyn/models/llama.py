"""One decoder for the Llama family: Llama 2/3/3.x, Mistral, Qwen2/2.5, Qwen3 (Flax NNX).

The families differ only by flags of ``ModelConfig``: qkv bias (Qwen2),
q/k RMSNorm over head_dim (Qwen3), rope scaling (Llama 3.1+), sliding window
(Mistral), tied embeddings (Llama 3.2 1B/3B, small Qwens), GQA/MQA.

The model is functional about its KV cache::

    kv_cache, hidden = model(kv_cache, token_ids, md)   # hidden: [T, hidden_size]
    logits = model.compute_logits(hidden[rows])          # f32[N, vocab]

Parameter names mirror Hugging Face's (``layers/3/self_attn/o_proj/kernel``)
with kernels stored ``[in, out]``, but for ``self_attn/qkv_proj``: Hugging Face's q, k and v projections
as one (``merge_qkv``; the loaders merge them). Layers are unrolled in Python: a
``lax.scan`` over stacked layer weights copied each layer's slice on the GPU. A forward traces one layer and inlines
its jaxpr for every layer (``nested_layers``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from jaxdyn.config import ModelConfig, RopeConfig
from jaxdyn.kv.cache import AttentionMetadata, KVCache, write_kv
from jaxdyn.parallel.sharding import MODEL_AXIS, model_parallel_size, stored_kv_heads
from pallas_kernels.fp8_matmul import FP8_KERNEL_MAX_ROWS, fp8_weight_matmul
from pallas_kernels.fp8_quantize import FP8_MAX, quantize_rows_fp8, quantize_rows_fp8_reference  # noqa: F401
from pallas_kernels.ragged_paged_attention import ragged_paged_attention
from pallas_kernels.rms_norm_fp8 import add_rms_norm_fp8, rms_norm_reference
from pallas_kernels.rope_kv import apply_rope, kernel_supports, rope_write_kv


QUANT_DTYPES = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}


def is_quantized(dtype, quantization: str | None) -> bool:
    """Whether a parameter of ``dtype`` is a quantized ``Linear``'s weight (or int8 kernel) under
    ``quantization``: it holds the quantization's type (the decoder's linears, and an fp8 lm_head)."""
    return quantization is not None and jnp.dtype(dtype) == jnp.dtype(QUANT_DTYPES[quantization])


def quantize_fp8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x in float8_e4m3fn, its f32 scales [..., 1]): one scale a row (a token), its absolute maximum / 448, found
    on the device. A row's result depends on its own values only, not on the batch it runs in (with one scale for
    the whole tensor it did); the scales multiply the product's rows afterwards, so the product itself stays one
    fp8 x fp8 product. (The demo model's top-1 agreement with bf16: 0.864 with a scale a row, 0.867 with one a
    tensor, 0.904 with fp8 weights alone: ``benchmarks/quant_quality.py``.) XLA's form of
    ``pallas_kernels.fp8_quantize``'s."""
    return quantize_rows_fp8_reference(x)


@dataclasses.dataclass(frozen=True)
class Fp8Options:
    """How an fp8 (w8a8) model's products run in a step (the runner's options, static under jit):

    - ``kernel_rows``: calls of at most this many rows (and at most ``FP8_KERNEL_MAX_ROWS``) take
      ``pallas_kernels.fp8_matmul`` (w8a16, ``Linear``);
    - ``fused_quantize``: which row-parallel products' inputs ``pallas_kernels.fp8_quantize`` quantizes, one
      kernel each instead of XLA's reduction and conversion: "off", "o_proj" (the attention's output) or
      "all" (o_proj's and down_proj's, ``silu(gate) * up`` made in the kernel in float32 and rounded once, where
      XLA rounds ``silu(gate)`` first: not bit-identical in bf16); at one device on the model axis only (shards'
      rows would need one maximum across them): under tensor parallelism the option changes nothing;
    - ``fused_min_rows``: ``fused_quantize`` in calls of at least this many rows only (and of more than
      ``kernel_rows``);
    - ``fused_norm``: each layer's residual add, RMSNorm and input quantization in one
      ``pallas_kernels.rms_norm_fp8`` kernel (``DecoderLayer.fuses_norm`` says where)."""
    kernel_rows: int = 0
    fused_quantize: str = "off"
    fused_min_rows: int = 0
    fused_norm: bool = False


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """How a step's attention runs (the runner's options, static under jit): ``ragged_paged_attention``'s
    ``in_place``, ``attention_programs``, ``skip_idle_prefill`` and ``fp8_products``; ``fused_rope_kv``: q's and
    k's rotation and the K/V write in one ``pallas_kernels.rope_kv`` kernel a layer (``Attention.fuses_rope_kv``
    says where)."""
    in_place: bool = True
    programs: int = 0
    prefill_programs: int | None = None     # the prefill kernel's programs (None: ``programs``)
    skip_idle_prefill: bool = False
    fp8_products: str = "off"
    fused_rope_kv: bool = False


def fp8_dot(xq: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """``xq [..., K]`` float8_e4m3fn times ``w [N, K]`` float8_e4m3fn, unscaled, in ``dtype``: one fp8 x fp8
    product (cuBLASLt's on a GPU)."""
    return jax.lax.dot_general(xq, w, (((xq.ndim - 1,), (1,)), ((), ())), preferred_element_type=dtype)


def fp8_scale(raw: jax.Array, sx: jax.Array, scale: jax.Array, out_dtype) -> jax.Array:
    """An fp8 product's raw result ``raw [..., N]`` scaled in float32 by its rows' (``sx [..., 1]``) and its
    channels' (``scale [N]``) scales, in ``out_dtype``."""
    return (raw.astype(jnp.float32) * (sx * scale)).astype(out_dtype)


def fp8_scaled_dot(xq: jax.Array, sx: jax.Array, w: jax.Array, scale: jax.Array, dtype, out_dtype=None
                   ) -> jax.Array:
    """``xq [..., K]`` float8_e4m3fn with its rows' scales ``sx [..., 1]`` times ``w [N, K]`` float8_e4m3fn:
    ``fp8_dot`` in ``dtype`` scaled in float32 by the rows' and the channels' (``scale [N]``) scales, in
    ``out_dtype`` (default ``dtype``)."""
    return fp8_scale(fp8_dot(xq, w, dtype), sx, scale, out_dtype or dtype)


def fp8_product(x: jax.Array, w: jax.Array, scale: jax.Array) -> jax.Array:
    """w8a8: ``x [..., K]`` quantized per row (``quantize_fp8``) times ``w [N, K]`` float8_e4m3fn, in x's dtype."""
    xq, sx = quantize_fp8(x)
    return fp8_scaled_dot(xq, sx, w, scale, x.dtype)


# the fp8 lm_head's product type (``fp8_logits``): bf16, as the decoder's w8a8 products (its rounding, 2**-9 of a
# logit, is far under fp8's own). An H200 took 0.79x / 0.62x the bf16 head's time at 16 / 64 rows with it, and
# 1.01x / 0.83x with a float32 product (``benchmarks/gpu/lm_head_probe.py``)
FP8_LOGITS_PRODUCT = jnp.bfloat16


def fp8_logits(hidden: jax.Array, weight: jax.Array, scale: jax.Array, product_dtype=None) -> jax.Array:
    """f32[N, vocab] logits of an fp8 lm_head (``weight`` [vocab, hidden] float8_e4m3fn, ``scale`` [vocab]): the
    rows quantized as every w8a8 product's input (``quantize_fp8``), one fp8 x fp8 product in ``product_dtype``
    (default ``FP8_LOGITS_PRODUCT``), made float32 and scaled by the rows' and the vocabulary rows' scales."""
    xq, sx = quantize_fp8(hidden)
    return fp8_scaled_dot(xq, sx, weight, scale, product_dtype or FP8_LOGITS_PRODUCT, jnp.float32)


class Linear(nnx.Module):
    """``x @ kernel (+ bias)``, the kernel ``[in, out]``. Quantized (``quant``), with a float32 scale per
    output channel:

    - ``int8``: the kernel int8 ``[in, out]``, made x's dtype inside the jitted product: ``(x @ q) * scale``
      (weights only);
    - ``fp8``: ``weight`` float8_e4m3fn ``[out, in]`` (Hugging Face's layout: the contracting dimension minor,
      the one cuBLASLt's fp8 products take; ``[in, out]`` was transposed on every call) and the input quantized
      to fp8 with one scale a row (``quantize_fp8``): one fp8 x fp8 product, its result times the rows' and the
      channels' scales (weights and activations, w8a8: 0.65x bf16's time on an H200 at 768-2,048 rows with one
      activation scale a tensor, ``benchmarks/gpu/fp8_probe.py``). A call of at most ``Fp8Options.kernel_rows`` rows
      (a step of few tokens, bound by the weights' read) takes ``pallas_kernels.fp8_matmul`` instead: the
      input stays bf16 and each weight tile is made bf16 as it is read (w8a16: no activation quantization,
      and the fp8 weights read at the copy rate rather than cuBLASLt's half of it at 16 rows). Under tensor
      parallelism that call runs per shard (``jax.shard_map``, ``mesh`` and ``split``: "column" splits the
      output features, "row" the input features and sums the shards' products)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype, quant: str | None = None,
                 mesh: Mesh | None = None, split: str | None = None):
        if split not in (None, "column", "row"):
            raise ValueError(f"split must be None, 'column' or 'row', not {split!r}")
        self.mesh, self.split = mesh, split
        if quant is None:
            self.kernel = nnx.Param(jnp.zeros((in_features, out_features), dtype))
            self.weight = self.scale = None
        else:
            if quant == "fp8":
                self.weight = nnx.Param(jnp.zeros((out_features, in_features), QUANT_DTYPES[quant]))
                self.kernel = None
            else:
                self.kernel = nnx.Param(jnp.zeros((in_features, out_features), QUANT_DTYPES[quant]))
                self.weight = None
            self.scale = nnx.Param(jnp.ones((out_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None

    def __call__(self, x: jax.Array, *, fp8: Fp8Options = Fp8Options()) -> jax.Array:
        if self.scale is None:
            y = x @ self.kernel[...]
        elif self.weight is not None and x.ndim == 2 and x.shape[0] <= min(fp8.kernel_rows, FP8_KERNEL_MAX_ROWS):
            y = self._fp8_few_rows(x)
        elif self.weight is not None:
            y = fp8_product(x, self.weight[...], self.scale[...])
        else:
            y = jnp.dot(x, self.kernel[...].astype(x.dtype), preferred_element_type=jnp.float32)
            y = (y * self.scale[...]).astype(x.dtype)
        if self.bias is not None:
            y = y + self.bias[...]
        return y

    def fuses_quantize(self, x: jax.Array, fp8: Fp8Options, sites: tuple[str, ...]) -> bool:
        """Whether this layer's input ``x`` is to be quantized by ``pallas_kernels.fp8_quantize``
        (``Fp8Options.fused_quantize`` among ``sites``) and given to ``quantized``."""
        return (self.weight is not None and fp8.fused_quantize in sites and x.ndim == 2
                and x.shape[0] > fp8.kernel_rows and x.shape[0] >= fp8.fused_min_rows
                and (self.mesh is None or model_parallel_size(self.mesh) == 1))

    def quantized(self, xq: jax.Array, sx: jax.Array, dtype) -> jax.Array:
        """The fp8 layer on an input already quantized per row (``xq`` float8_e4m3fn, its scales ``sx [..., 1]``)."""
        y = fp8_scaled_dot(xq, sx, self.weight[...], self.scale[...], dtype)
        return y if self.bias is None else y + self.bias[...]

    def _fp8_few_rows(self, x: jax.Array) -> jax.Array:
        w, scale = self.weight[...], self.scale[...]
        tp = 1 if self.mesh is None else model_parallel_size(self.mesh)
        if tp == 1 or self.split is None:
            return fp8_weight_matmul(x, w, scale)
        if w.shape[0 if self.split == "column" else 1] % tp:
            # the sharding rules left this weight whole (a width TP does not divide): the w8a8 product
            return fp8_product(x, w, scale)
        if self.split == "column":
            specs = (P(), P(MODEL_AXIS, None), P(MODEL_AXIS))
            out, body = P(None, MODEL_AXIS), fp8_weight_matmul
        else:
            specs = (P(None, MODEL_AXIS), P(None, MODEL_AXIS), P())
            out = P()

            def body(xs, ws, ss):
                # the shards' partial sums in float32 (the scale is per output channel: it commutes with the sum)
                y = fp8_weight_matmul(xs, ws, ss, out_dtype=jnp.float32)
                return jax.lax.psum(y, MODEL_AXIS).astype(x.dtype)
        return jax.shard_map(body, mesh=self.mesh, in_specs=specs, out_specs=out, check_vma=False)(x, w, scale)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        # the weight multiplies in float32, before the one rounding (``rms_norm_reference``): one fusion makes the
        # output that every consumer reads (rounding first, as Hugging Face does, left XLA a separate multiply that
        # it made again for each of the projections that read it: 1 ms a 2,048-token 8B step on an H200)
        return rms_norm_reference(x, self.weight[...], self.eps)


class Embed(nnx.Module):
    def __init__(self, vocab_size: int, dim: int, *, dtype):
        self.embedding = nnx.Param(jnp.zeros((vocab_size, dim), dtype))

    def __call__(self, token_ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], token_ids, axis=0)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """f32[head_dim // 2] inverse frequencies, with linear / llama3 scaling applied."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
    inv_freq = (1.0 / (rope.theta ** exponents)).astype(np.float32)
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin: [T, head_dim] in the rotate-half layout Hugging Face uses."""
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def merge_qkv(q, k, v, tp: int):
    """The ``qkv_proj`` layout from q [..., q_size] and k, v [..., kv_size] (host arrays): for each of the
    ``tp`` column shards in turn, its q columns, its k columns, its v columns -- so that a column split over
    ``tp`` devices gives each device its own heads of all three."""
    parts = [a.reshape(*a.shape[:-1], tp, a.shape[-1] // tp) for a in (q, k, v)]
    return np.concatenate(parts, axis=-1).reshape(*q.shape[:-1], -1)


def split_qkv(qkv, q_size: int, kv_size: int, tp: int):
    """(q, k, v) of a ``merge_qkv`` layout of ``tp`` shards; q [..., q_size], k and v [..., kv_size]."""
    x = qkv.reshape(*qkv.shape[:-1], tp, -1)
    nq, nk = q_size // tp, kv_size // tp
    lead = qkv.shape[:-1]
    return (x[..., :nq].reshape(*lead, q_size), x[..., nq:nq + nk].reshape(*lead, kv_size),
            x[..., nq + nk:].reshape(*lead, kv_size))


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, *, mesh: Mesh, dtype):
        tp = model_parallel_size(mesh)
        if cfg.num_heads % tp:
            raise ValueError(f"num_heads={cfg.num_heads} is not divisible by tensor_parallel={tp}")
        self.num_heads = cfg.num_heads
        self.num_kv_heads = stored_kv_heads(cfg.num_kv_heads, tp)
        self.head_dim = cfg.head_dim
        self.sliding_window = cfg.sliding_windows[layer_idx]
        self.mesh = mesh
        d, hd = cfg.hidden_size, cfg.head_dim
        qt = cfg.quantization
        self.tp = tp
        # q, k and v as one product (``merge_qkv``'s layout): one matrix product a layer instead of three
        self.qkv_proj = Linear(d, (self.num_heads + 2 * self.num_kv_heads) * hd, bias=cfg.qkv_bias,
                               dtype=dtype, quant=qt, mesh=mesh, split="column")
        self.o_proj = Linear(self.num_heads * hd, d, bias=cfg.o_bias, dtype=dtype, quant=qt, mesh=mesh, split="row")
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, kv: tuple[jax.Array, jax.Array], x, md: AttentionMetadata,
                 cos: jax.Array, sin: jax.Array, *, attention: AttentionOptions = AttentionOptions(),
                 fp8: Fp8Options = Fp8Options(), raw_output: bool = False):
        """``x``: the normalized input [T, hidden], or ``(values, scales, dtype)``: it quantized per row already
        (float8_e4m3fn [T, hidden], f32 [T, 1]) for an fp8 ``qkv_proj``, its output in ``dtype``. Returns (kv,
        o_proj's output); with ``raw_output`` (an fp8 ``o_proj`` without bias) o_proj's raw product, its rows'
        scales and its channels' scales instead (``fp8_dot``; ``fp8_scaled_dot`` scales it so)."""
        fuses_rope_kv = self.fuses_rope_kv(attention)
        scales = ()
        if isinstance(x, tuple):
            xq, sx, dtype = x
            if fuses_rope_kv and self.qkv_proj.bias is None:
                # the raw product: the rope kernel scales it as it reads it (one kernel a layer fewer)
                qkv = fp8_dot(xq, self.qkv_proj.weight[...], dtype)
                scales = (sx.reshape(-1), self.qkv_proj.scale[...].reshape(-1, self.head_dim))
            else:
                qkv = self.qkv_proj.quantized(xq, sx, dtype)
        else:
            qkv = self.qkv_proj(x, fp8=fp8)
        t = qkv.shape[0]
        hd = self.head_dim
        heads = P(None, MODEL_AXIS, None)
        if fuses_rope_kv:
            # merge_qkv's layout: each model shard's columns are its q heads, its k heads, its v heads in turn (the
            # channels' scales split as the columns)
            write_and_attend, args, specs = self._rope_write_and_attend, (qkv.reshape(t, -1, hd), cos, sin, *scales), \
                (heads, P(), P(), *((P(), P(MODEL_AXIS, None)) if scales else ()))
        else:
            q, k, v = split_qkv(qkv, self.num_heads * hd, self.num_kv_heads * hd, self.tp)
            q = q.reshape(t, self.num_heads, hd)
            k = k.reshape(t, self.num_kv_heads, hd)
            v = v.reshape(t, self.num_kv_heads, hd)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            write_and_attend, args, specs = self._write_and_attend, (q, k, v), (heads, heads, heads)
        pages = P(MODEL_AXIS, None, None, None)
        rep = P()
        local = jax.shard_map(
            functools.partial(write_and_attend, attention=attention),
            mesh=self.mesh,
            in_specs=(pages, pages, rep, rep, rep, rep, rep, *specs),
            out_specs=(pages, pages, heads),
            check_vma=False,
        )
        k_pages, v_pages, o = local(kv[0], kv[1], md.slot_page, md.slot_offset, md.kv_lens, md.page_table,
                                    md.cu_q_lens, *args)
        o = o.reshape(t, self.num_heads * self.head_dim)
        fused = self.o_proj.fuses_quantize(o, fp8, ("o_proj", "all"))
        if raw_output:
            oq, so = quantize_rows_fp8(o) if fused else quantize_fp8(o)
            return (k_pages, v_pages), (fp8_dot(oq, self.o_proj.weight[...], o.dtype), so, self.o_proj.scale[...])
        if fused:
            return (k_pages, v_pages), self.o_proj.quantized(*quantize_rows_fp8(o), o.dtype)
        return (k_pages, v_pages), self.o_proj(o, fp8=fp8)

    def fuses_rope_kv(self, attention: AttentionOptions) -> bool:
        """Whether this layer rotates q and k and writes K/V in one ``rope_write_kv`` kernel: under
        ``attention.fused_rope_kv``, without q/k norms (which come between the product and the rotation), where
        the kernel takes a shard's heads (``kernel_supports``)."""
        return (attention.fused_rope_kv and self.q_norm is None
                and kernel_supports(self.num_heads // self.tp, self.num_kv_heads // self.tp, self.head_dim))

    def _write_and_attend(self, k_pages, v_pages, slot_page, slot_offset, kv_lens, page_table, cu_q_lens, q, k, v,
                          *, attention: AttentionOptions):
        k_pages, v_pages = write_kv(k_pages, v_pages, k, v, slot_page, slot_offset)
        return k_pages, v_pages, self._attend(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, attention)

    def _rope_write_and_attend(self, k_pages, v_pages, slot_page, slot_offset, kv_lens, page_table, cu_q_lens, qkv,
                               cos, sin, *scales, attention: AttentionOptions):
        """A shard's ``qkv [T, its q + k + v heads, head_dim]``: rotated and written by one kernel, then attended.
        ``scales``: none, or an fp8 product's rows' [T] and the shard's channels' [its heads, head_dim] (``qkv``
        its raw result, ``rope_write_kv(scales=)``)."""
        t = qkv.shape[0]
        q, k_pages, v_pages = rope_write_kv(qkv.reshape(t, -1), cos, sin, k_pages, v_pages, slot_page, slot_offset,
                                            num_q_heads=self.num_heads // self.tp,
                                            num_kv_heads=self.num_kv_heads // self.tp,
                                            scales=(scales[0], scales[1].reshape(-1)) if scales else None)
        return k_pages, v_pages, self._attend(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, attention)

    def _attend(self, q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, attention: AttentionOptions):
        return ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens,
                                      sm_scale=self.head_dim ** -0.5,
                                      sliding_window=self.sliding_window, in_place=attention.in_place,
                                      attention_programs=attention.programs,
                                      prefill_programs=attention.prefill_programs,
                                      skip_idle_prefill=attention.skip_idle_prefill,
                                      fp8_products=attention.fp8_products)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, mesh: Mesh | None = None):
        d, f = cfg.hidden_size, cfg.intermediate_size
        qt = cfg.quantization
        self.gate_proj = Linear(d, f, bias=cfg.mlp_bias, dtype=dtype, quant=qt, mesh=mesh, split="column")
        self.up_proj = Linear(d, f, bias=cfg.mlp_bias, dtype=dtype, quant=qt, mesh=mesh, split="column")
        self.down_proj = Linear(f, d, bias=cfg.mlp_bias, dtype=dtype, quant=qt, mesh=mesh, split="row")

    def __call__(self, x: jax.Array, *, fp8: Fp8Options = Fp8Options()) -> jax.Array:
        if self.down_proj.fuses_quantize(x, fp8, ("all",)):
            return self.down_proj.quantized(*self._hidden_quantized(*quantize_fp8(x), x.dtype, fused=True), x.dtype)
        gate, up = self.gate_proj(x, fp8=fp8), self.up_proj(x, fp8=fp8)
        return self.down_proj(jax.nn.silu(gate) * up, fp8=fp8)

    def raw_product(self, xq: jax.Array, sx: jax.Array, dtype, *, fp8: Fp8Options = Fp8Options()):
        """The MLP of fp8 weights (down_proj without bias) on an input quantized per row (``xq`` float8_e4m3fn,
        its scales ``sx [T, 1]``), as ``__call__`` makes it: (down_proj's raw product in ``dtype``, its rows'
        scales, its channels' scales)."""
        fused = self.down_proj.fuses_quantize(xq, fp8, ("all",))
        hq, hs = self._hidden_quantized(xq, sx, dtype, fused=fused)
        return fp8_dot(hq, self.down_proj.weight[...], dtype), hs, self.down_proj.scale[...]

    def _hidden_quantized(self, xq: jax.Array, sx: jax.Array, dtype, *, fused: bool):
        """``silu(gate) * up`` quantized per row (values, scales [T, 1]) from the fp8 input quantized per row;
        ``fused``: by ``pallas_kernels.fp8_quantize``, which without biases takes gate's and up's raw products
        (one quantized input) and scales them itself; else XLA's ``quantize_fp8`` of the scaled products."""
        if fused and self.gate_proj.bias is None and self.up_proj.bias is None:
            gate = fp8_dot(xq, self.gate_proj.weight[...], dtype)
            up = fp8_dot(xq, self.up_proj.weight[...], dtype)
            return quantize_rows_fp8(up, gate, scales=(sx, self.up_proj.scale[...], self.gate_proj.scale[...]))
        gate, up = self.gate_proj.quantized(xq, sx, dtype), self.up_proj.quantized(xq, sx, dtype)
        return quantize_rows_fp8(up, gate) if fused else quantize_fp8(jax.nn.silu(gate) * up)


class Residual(NamedTuple):
    """A layer's output under ``Fp8Options.fused_norm``: the residual stream ``x`` and the MLP's output not yet
    added to it, as down_proj's raw fp8 product with its rows' and channels' scales (the next layer's norm kernel
    adds it)."""
    x: jax.Array
    raw: jax.Array
    row_scale: jax.Array
    col_scale: jax.Array

    def added(self) -> jax.Array:
        """``x`` plus the product scaled and rounded as ``fp8_scaled_dot`` makes it: the unfused layer's output."""
        return self.x + fp8_scale(self.raw, self.row_scale, self.col_scale, self.x.dtype)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, *, mesh: Mesh, dtype):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(cfg, layer_idx, mesh=mesh, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(cfg, dtype=dtype, mesh=mesh)

    def fuses_norm(self, rows: int, fp8: Fp8Options) -> bool:
        """Whether this layer, in a call of ``rows`` tokens, adds, normalizes and quantizes its inputs in one
        kernel each (``pallas_kernels.rms_norm_fp8``) and leaves its MLP's output to the next layer's kernel
        (``Residual``): under ``Fp8Options.fused_norm``, with fp8 weights, no bias on o_proj and down_proj, one
        device on the model axis (a row's scale needs the whole row) and more than ``Fp8Options.kernel_rows`` rows
        (fewer take the fp8-weight kernel, whose inputs are not quantized)."""
        a, m = self.self_attn, self.mlp
        return (fp8.fused_norm and a.qkv_proj.weight is not None and m.down_proj.weight is not None
                and a.o_proj.bias is None and m.down_proj.bias is None and rows > fp8.kernel_rows
                and model_parallel_size(a.mesh) == 1)

    def __call__(self, kv, x, md, cos, sin, *, attention: AttentionOptions = AttentionOptions(),
                 fp8: Fp8Options = Fp8Options()):
        """``x``: the residual stream [T, hidden], or a ``Residual`` (the previous layer's, fused). Returns (kv,
        the residual stream), a ``Residual`` where ``fuses_norm``."""
        rows = (x.x if isinstance(x, Residual) else x).shape[0]
        if not self.fuses_norm(rows, fp8):
            if isinstance(x, Residual):
                x = x.added()
            kv, attn = self.self_attn(kv, self.input_layernorm(x), md, cos, sin, attention=attention, fp8=fp8)
            x = x + attn
            return kv, x + self.mlp(self.post_attention_layernorm(x), fp8=fp8)
        n1, n2 = self.input_layernorm, self.post_attention_layernorm
        if isinstance(x, Residual):
            x, q, s = add_rms_norm_fp8(x.x, n1.weight[...], n1.eps, (x.raw, x.row_scale, x.col_scale))
        else:       # the first layer: nothing to add (XLA's fusions)
            q, s = quantize_fp8(n1(x))
        kv, o = self.self_attn(kv, (q, s, x.dtype), md, cos, sin, attention=attention, fp8=fp8, raw_output=True)
        x, q, s = add_rms_norm_fp8(x, n2.weight[...], n2.eps, o)
        return kv, Residual(x, *self.mlp.raw_product(q, s, x.dtype, fp8=fp8))


class LlamaForCausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, mesh: Mesh, dtype=jnp.bfloat16):
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.inv_freq = tuple(float(f) for f in rope_inv_freq(cfg.rope, cfg.head_dim))
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nnx.List(
            [DecoderLayer(cfg, i, mesh=mesh, dtype=dtype) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        # ``cfg.quantize_lm_head`` (fp8 models): an fp8 lm_head [vocab, hidden] with a scale a vocabulary row; with
        # tied embeddings it is the embedding's quantized copy (the lookup keeps the float table)
        if cfg.tie_word_embeddings and not cfg.quantize_lm_head:
            self.lm_head = None
        else:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype,
                                  quant="fp8" if cfg.quantize_lm_head else None)

    def __call__(self, kv_cache: KVCache, token_ids: jax.Array, md: AttentionMetadata, *,
                 attention_in_place: bool = True, fp8_kernel_rows: int = 0,
                 fp8_fused_quantize: str = "off", fp8_fused_min_rows: int = 0,
                 attention_programs: int = 0, skip_idle_prefill: bool = False,
                 attention_fp8_products: str = "off", nested_layers: bool = True,
                 fp8_fused_norm: bool = False, fused_rope_kv: bool = False,
                 prefill_programs: int | None = None) -> tuple[KVCache, jax.Array]:
        """token_ids: i32[T] -> (kv_cache, hidden [T, hidden_size]).

        ``attention_in_place``: the attention kernels store into one output, no merge
        (``ragged_paged_attention(in_place=True)``; the same numbers). ``fp8_kernel_rows``, ``fp8_fused_quantize``,
        ``fp8_fused_min_rows``: how an fp8 model's products run (``Fp8Options``). ``attention_programs``: the
        attention kernels' programs (``ragged_paged_attention``; 0: a program an item); ``prefill_programs``: the
        prefill kernel's alone (None: ``attention_programs``). ``skip_idle_prefill``: the
        prefill kernel only in steps with a chunk of more than one token (``ragged_paged_attention``).
        ``attention_fp8_products``: over fp8 KV pages, the decode kernel's products on e4m3 operands
        (``ragged_paged_attention(fp8_products=)``).
        ``nested_layers``: the layers traced once, their jaxpr inlined for each layer (below); False: each layer
        traced into the caller's program. ``fp8_fused_norm``: ``Fp8Options.fused_norm``. ``fused_rope_kv``:
        ``AttentionOptions.fused_rope_kv``."""
        fp8 = Fp8Options(kernel_rows=fp8_kernel_rows, fused_quantize=fp8_fused_quantize,
                         fused_min_rows=fp8_fused_min_rows, fused_norm=fp8_fused_norm)
        attention = AttentionOptions(in_place=attention_in_place, programs=attention_programs,
                                     prefill_programs=prefill_programs, skip_idle_prefill=skip_idle_prefill,
                                     fp8_products=attention_fp8_products, fused_rope_kv=fused_rope_kv)
        x = self.embed_tokens(token_ids)
        cos, sin = rope_cos_sin(md.positions, np.asarray(self.inv_freq, np.float32), x.dtype)
        # ``nested_layers``: each layer through one jit made for this call, inlined into the caller's jaxpr. The layers
        # share a graphdef and their inputs' shapes, so the first layer is traced and the others reuse its jaxpr (under
        # ``fused_norm`` the first layer and the second: the others take the second's ``Residual`` input)
        # (tracing the 32 layers was most of a step's serial lowering: ``benchmarks/lowering_time.py``); inlined, the
        # step's jaxpr, and so its compiled program, is the one the layers traced one by one make
        # (``benchmarks/nested_layers_check.py``; a call of one lowered function a layer, not inlined, lowered a
        # little faster but compiled differently on a CPU). Made afresh each call: nothing traced outlives it (a
        # patched kernel, an environment variable read while tracing, are seen by the next call).
        def apply_layer(graphdef, state, kv, x, md, cos, sin):
            return nnx.merge(graphdef, state)(kv, x, md, cos, sin, attention=attention, fp8=fp8)

        if nested_layers:
            apply_layer = jax.jit(apply_layer, static_argnums=0, inline=True)
        new_cache = []
        for layer, kv in zip(self.layers, kv_cache):
            kv, x = apply_layer(*nnx.split(layer), kv, x, md, cos, sin)
            new_cache.append(kv)
        return new_cache, self.norm(x.added() if isinstance(x, Residual) else x)

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """hidden: [N, hidden_size] -> f32[N, vocab_size]. An fp8 lm_head (``quantize_lm_head``): ``fp8_logits``,
        the rows quantized as every w8a8 product's input, one fp8 x fp8 product, scaled in float32."""
        if self.lm_head is None:
            w = self.embed_tokens.embedding[...]
            return jnp.einsum("nd,vd->nv", hidden, w, preferred_element_type=jnp.float32)
        if self.lm_head.weight is not None:
            return fp8_logits(hidden, self.lm_head.weight[...], self.lm_head.scale[...])
        return jnp.einsum("nd,dv->nv", hidden, self.lm_head.kernel[...],
                          preferred_element_type=jnp.float32)
