"""Hugging Face safetensors -> jaxdyn Orbax checkpoint, and its restore onto any mesh.

Layout of a converted directory::

    config.json               the HF config (+ "jaxdyn_quantization" when quantized)
    generation_config.json    copied when present
    tokenizer.json, tokenizer_config.json, ...   copied
    jaxdyn_checkpoint.json    format marker: version, dtype, quantization, groups, bytes
    params/<group>/           one Orbax (StandardCheckpointer) tree per group:
                              embed_tokens, layers.0 ... layers.N-1, norm, lm_head

Conversion streams: a group (one decoder layer at most) is read from the
memory-mapped safetensors, converted and written before the next is read, so
host memory holds one layer, never the model. Arrays are stored in the
mesh-independent shapes of tensor parallelism 1; restore reads each group
straight into the target sharding of any mesh (Orbax reads only each device's
shard) and replicates kv heads on the device when TP exceeds them.

The output is written to a temporary directory beside the target and renamed
at the end: an interrupted conversion leaves nothing that looks loadable.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from checkpoints.hf import (CheckpointError, LoadedModel, _hf_shapes, _IGNORED_SUFFIXES, _merged_qkv, _path_keys,
                            hf_names, qkv_sizes, untie_a_distinct_head)
from checkpoints.safetensors_io import CheckpointFiles, SafetensorsError
from jaxdyn.config import QUANTIZATIONS, ConfigError, ModelConfig, hub_id_hint
from jaxdyn.engine.tokenizer import Tokenizer, TokenizerError
from jaxdyn.models.llama import is_quantized, split_qkv
from jaxdyn.models.registry import build_abstract_model
from jaxdyn.parallel.sharding import make_mesh, model_parallel_size, param_shardings

MARKER = "jaxdyn_checkpoint.json"
FORMAT_VERSION = 2      # 2: q, k and v stored as one qkv_proj (1: separate; convert again)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt")
# fp8 weights are stored [out, in] (``llama.Linear``); fp8 checkpoints converted before said nothing of it and
# hold [in, out] kernels
FP8_WEIGHTS = "[out, in]"


def is_converted(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def restore_error(e: BaseException, limit: int = 600) -> str:
    """What an Orbax / TensorStore restore error says, without the TensorStore specs it appends (``[tensorstore_spec
    ...]`` or ``See full TensorStore details: ...``, a kilobyte each) and the chain of drivers opened on the way,
    followed by the reason Orbax wrapped (its cause: a read that failed, data corrupted), at most ``limit``
    characters."""
    def clean(x: BaseException) -> str:
        text = str(x).split(" [tensorstore_spec")[0].split(" See full TensorStore details")[0]
        return re.sub(r'(Error opening "\w+" driver: )+', "", text).strip()
    text = clean(e)
    cause = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    if cause is not None and clean(cause) and clean(cause) not in text:
        text = f"{text.rstrip('.')}: {clean(cause)}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


LEFTOVERS_FOR_S = 60.0        # after a restore, a failed one's leftovers are dropped this long
_failed_restore_at = [float("-inf")]


def _orbax_leftover(u) -> bool:
    """An unraisable exception a failed Orbax restore leaves behind: the other reads' coroutines, whose errors
    nobody awaited, and -- within ``LEFTOVERS_FOR_S`` of the failure -- TensorStore's callbacks posting to the
    restore's event loop after it closed (``call_soon_threadsafe``)."""
    if getattr(getattr(u, "object", None), "__qualname__", "") == "_read_array_index_and_device_put":
        return True
    if time.monotonic() - _failed_restore_at[0] > LEFTOVERS_FOR_S:
        return False
    tb, last = u.exc_traceback, None
    while tb is not None:
        last, tb = tb.tb_frame.f_code.co_name, tb.tb_next
    return (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"
            and last == "_check_closed")


class _OrbaxWriteErrors(logging.Filter):
    """Drops what Orbax's background save threads log (with a traceback each, several threads) when a write fails:
    ``convert`` raises that failure as one CheckpointError naming the output and the group."""

    MARKS = ("_SignalingThread.run() raised an exception", "in background save thread")

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and any(m in str(record.msg) for m in self.MARKS))


def _quiet_orbax_write_errors() -> None:
    absl_log = logging.getLogger("absl")
    if not any(isinstance(f, _OrbaxWriteErrors) for f in absl_log.filters):
        absl_log.addFilter(_OrbaxWriteErrors())


def _quiet_orbax_leftovers(collect: bool = True) -> None:
    """Around a restore (set before it: a callback can fire between the restore's failure and its handler) and
    after a failed one: drop what ``_orbax_leftover`` matches from ``sys.unraisablehook`` (the same error,
    printed again with kilobytes of TensorStore specs, and tracebacks after the CLI's one-line message), and
    ``collect`` the coroutines now; every other unraisable exception still goes to the hook there was."""
    _failed_restore_at[0] = time.monotonic()
    if not getattr(sys.unraisablehook, "_jaxdyn_orbax_filter", False):
        previous = sys.unraisablehook

        def hook(u):
            if not _orbax_leftover(u):
                previous(u)
        hook._jaxdyn_orbax_filter = True
        sys.unraisablehook = hook
    if collect:
        gc.collect()


def read_marker(path: str) -> dict:
    """The format marker of a converted checkpoint, checked (CheckpointError: unreadable, or a format or
    version this code does not read)."""
    try:
        with open(os.path.join(path, MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{os.path.join(path, MARKER)}: unreadable format marker: {e}") from None
    if not isinstance(marker, dict):
        raise CheckpointError(f"{os.path.join(path, MARKER)}: not a JSON object")
    if marker.get("format") == "jaxdyn" and marker.get("version") == 1:
        raise CheckpointError(f"{path}: a jaxdyn checkpoint of format version 1 (separate q/k/v projections); "
                              f"convert it again from its Hugging Face checkpoint with `jaxdyn convert`")
    if marker.get("format") != "jaxdyn" or marker.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unknown checkpoint format {marker.get('format')!r} "
                              f"version {marker.get('version')!r}")
    if marker.get("dtype") not in ("bfloat16", "float32"):
        raise CheckpointError(f"{os.path.join(path, MARKER)}: dtype {marker.get('dtype')!r} is not bfloat16 or "
                              f"float32")
    if marker.get("quantization") not in (None, *QUANTIZATIONS):
        raise CheckpointError(f"{os.path.join(path, MARKER)}: quantization {marker.get('quantization')!r} is not "
                              f"{' or '.join(QUANTIZATIONS)}")
    if marker.get("quantization") == "fp8" and marker.get("fp8_weights") != FP8_WEIGHTS:
        raise CheckpointError(f"{path}: an fp8 checkpoint of an older layout ([in, out] weights, dequantized "
                              f"inside the product); convert it again with `jaxdyn convert --quant fp8`")
    return marker


def quantize(w, kind: str, axis: int = 0, xp=np):
    """w f32[in, out] (``axis`` 0; ``axis`` 1: [out, in]) -> (q int8 | float8_e4m3fn in w's layout, scale f32[out])
    with w ~= q * scale, one scale per output channel (the maximum over ``axis``, the input features).
    ``xp``: numpy (the converter, on the host) or ``jax.numpy`` (``hf.load_hf_checkpoint``, on the devices)."""
    w = xp.asarray(w, xp.float32)
    amax = xp.abs(w).max(axis=axis)
    if kind == "int8":
        scale = xp.where(amax > 0, amax / 127.0, 1.0).astype(xp.float32)
        q = xp.clip(xp.rint(w / xp.expand_dims(scale, axis)), -127, 127).astype(np.int8)
    elif kind == "fp8":
        scale = xp.where(amax > 0, amax / 448.0, 1.0).astype(xp.float32)
        q = xp.clip(w / xp.expand_dims(scale, axis), -448.0, 448.0).astype(ml_dtypes.float8_e4m3fn)
    else:
        raise ValueError(f"unknown quantization {kind!r}")
    return q, scale


def _group_of(keys: tuple) -> str:
    return f"layers.{keys[1]}" if keys[0] == "layers" else str(keys[0])


def _nest(flat: dict[tuple, object]) -> dict:
    out: dict = {}
    for keys, v in flat.items():
        d = out
        for k in keys[:-1]:
            d = d.setdefault(str(k), {})
        d[str(keys[-1])] = v
    return out


def _check_out_dir(hf_dir: str, out_dir: str, force: bool) -> None:
    """Refuse an output that would lose data: ``force`` replaces only a jaxdyn checkpoint or an empty
    directory, never the input, a directory holding it, or anything else."""
    if out_dir == hf_dir or hf_dir.startswith(out_dir.rstrip(os.sep) + os.sep):
        raise CheckpointError(f"--out {out_dir}: is the input checkpoint or a directory holding it")
    if not os.path.lexists(out_dir):
        return
    parent = os.path.dirname(out_dir) or "."
    if os.path.isdir(out_dir) and not os.path.islink(out_dir) and (
            os.path.ismount(out_dir) or os.stat(out_dir).st_dev != os.stat(parent).st_dev):
        # the checkpoint is written beside --out and renamed into place: a mount point cannot be replaced (that
        # failed with "Device or resource busy" once the whole model was written)
        raise CheckpointError(f"--out {out_dir}: a mount point (the checkpoint is written beside it and renamed into "
                              f"place); give a directory inside it, e.g. {os.path.join(out_dir, 'model')}")
    if not force:
        raise CheckpointError(f"{out_dir}: already exists (pass --force to replace it)")
    if os.path.islink(out_dir) or not os.path.isdir(out_dir):
        raise CheckpointError(f"--out {out_dir}: exists and is not a directory; --force replaces only a "
                              f"jaxdyn checkpoint or an empty directory")
    if os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, MARKER)):
        raise CheckpointError(f"--out {out_dir}: exists and is not a jaxdyn checkpoint (no {MARKER}); --force "
                              f"replaces only a jaxdyn checkpoint or an empty directory")


def _remove_abandoned_partials(parent: str, base: str) -> None:
    """Remove the hidden ``.{base}.partial-{pid}`` directories of conversions killed before they could clean up
    (SIGKILL, the OOM killer): no process of that pid is alive. They were left for good, up to a model's size."""
    for name in os.listdir(parent):
        m = re.fullmatch(re.escape(f".{base}.partial-") + r"(\d+)", name)
        if m is None or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue                      # alive: another conversion of the same output is running
        except (ProcessLookupError, OverflowError):
            pass                          # gone (or no pid at all)
        except PermissionError:
            continue                      # alive, another user's
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def convert(hf_dir: str, out_dir: str, *, dtype: str = "bfloat16", quant: str | None = None,
            quantize_lm_head: bool = False, force: bool = False, progress: bool = True) -> dict:
    """Convert; returns the marker dict (bytes written, seconds). ``quantize_lm_head`` (``quant`` "fp8"): the
    output projection in fp8 too (with tied embeddings, an fp8 copy of the embedding beside the float table).
    Every failure is a ``CheckpointError`` naming the file or the option, and leaves ``out_dir`` as it was."""
    if not hf_dir or not out_dir:
        raise CheckpointError(f"--{'hf' if not hf_dir else 'out'}: an empty path")
    try:
        return _convert(hf_dir, out_dir, dtype=dtype, quant=quant, quantize_lm_head=quantize_lm_head,
                        force=force, progress=progress)
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from None
    except OSError as e:
        where = e.filename or out_dir
        raise CheckpointError(f"{where}: {e.strerror or e} (converting {hf_dir} to {out_dir})") from None


def _convert(hf_dir: str, out_dir: str, *, dtype: str, quant: str | None, quantize_lm_head: bool, force: bool,
             progress: bool) -> dict:
    import orbax.checkpoint as ocp
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    hint = hub_id_hint(hf_dir)
    hf_dir, out_dir = os.path.abspath(hf_dir), os.path.abspath(out_dir)
    if dtype not in ("bfloat16", "float32"):
        raise CheckpointError(f"--dtype {dtype!r}: expected bfloat16 or float32")
    if quant not in (None, *QUANTIZATIONS):
        raise CheckpointError(f"--quant {quant!r}: expected {' or '.join(QUANTIZATIONS)}")
    if quantize_lm_head and quant != "fp8":
        raise CheckpointError(f"--quantize-lm-head needs --quant fp8 (not {quant or 'none'})")
    if not os.path.isdir(hf_dir):
        raise CheckpointError(f"{hf_dir}: not a directory{hint}")
    if is_converted(hf_dir):
        raise CheckpointError(f"--hf {hf_dir}: already a converted jaxdyn checkpoint (serve it as it is)")
    _check_out_dir(hf_dir, out_dir, force)
    try:
        cfg = ModelConfig.from_pretrained(hf_dir)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    if cfg.quantization:
        raise CheckpointError(f"{hf_dir}: already a quantized jaxdyn checkpoint")
    if not os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        raise CheckpointError(f"{hf_dir}: missing tokenizer (no tokenizer.json); a served model needs one")
    try:        # the tokenizer's side files are copied as they are: one the server cannot read fails here, not there
        Tokenizer.from_pretrained(hf_dir)
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None
    files = CheckpointFiles(hf_dir)
    tied = cfg.tie_word_embeddings
    cfg = untie_a_distinct_head(cfg, files, hf_dir)

    qcfg = cfg if quant is None else _replace(cfg, quantization=quant, quantize_lm_head=quantize_lm_head)
    mesh1 = make_mesh(1, jax.devices()[:1])
    _, abstract = build_abstract_model(qcfg, mesh1, jnp.dtype(dtype))
    leaves = [(_path_keys(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]]
    groups: dict[str, list] = {}
    for keys, leaf in leaves:
        groups.setdefault(_group_of(keys), []).append((keys, leaf))

    # Check names and shapes of every tensor before writing anything.
    expected = set()
    for keys, leaf in leaves:
        if keys[-1] == "scale":
            continue
        for name, want in zip(hf_names(keys, cfg), _hf_shapes(keys, leaf.shape, cfg)):
            expected.add(name)
            if name not in files:
                raise CheckpointError(f"{hf_dir}: missing tensor {name!r}")
            got = tuple(files.shape(name))
            if got != want:
                raise CheckpointError(f"{files.file_of(name)}: tensor {name!r} has shape {got}, expected {want}")
            files.check_float(name)       # (a SafetensorsError: convert() makes it a CheckpointError)
    extra = [n for n in files.where if n not in expected and not n.endswith(_IGNORED_SUFFIXES)
             and not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    if extra:
        raise CheckpointError(f"{hf_dir}: tensors the {cfg.architecture} config does not use: "
                              + ", ".join(f"{n!r} in {files.where[n]}" for n in sorted(extra)[:5]))

    parent = os.path.dirname(out_dir) or "."
    os.makedirs(parent, exist_ok=True)
    _remove_abandoned_partials(parent, os.path.basename(out_dir))
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "params"))
    ckptr = ocp.StandardCheckpointer()
    _quiet_orbax_write_errors()         # (its threads log a failed write before the save raises it here)
    np_dtype = np.dtype(jnp.dtype(dtype))
    num_bytes = 0
    try:
        bar = tqdm(total=len(leaves), desc="convert", unit="tensor", disable=not progress)
        for group, items in groups.items():
            flat = {}
            for keys, leaf in items:
                if keys[-1] == "scale":
                    continue
                raws = [np.asarray(files.get(n)) for n in hf_names(keys, cfg)]
                # qkv: one shard's q, k, v; an fp8 weight is [out, in] as Hugging Face's, the rest [in, out]
                arr = np.concatenate([r.T if keys[-1] == "kernel" else r for r in raws],
                                     axis=0 if keys[-1] == "weight" else -1)
                if is_quantized(leaf.dtype, quant):
                    q, scale = quantize(arr.astype(np.float32), quant, axis=1 if keys[-1] == "weight" else 0)
                    flat[keys] = q
                    flat[keys[:-1] + ("scale",)] = scale
                    bar.update(2)
                else:
                    flat[keys] = np.ascontiguousarray(arr).astype(np_dtype)
                    bar.update(1)
            num_bytes += sum(a.nbytes for a in flat.values())
            try:
                _quiet_orbax_leftovers(collect=False)
                ckptr.save(os.path.join(tmp, "params", group), _nest(
                    {(k[2:] if group.startswith("layers.") else k[1:]): v for k, v in flat.items()}))
                ckptr.wait_until_finished()
            except Exception as e:      # TensorStore's write errors (a full disk, a file size limit) are ValueErrors
                _quiet_orbax_leftovers()
                raise CheckpointError(f"{out_dir}: writing {group!r} failed: {restore_error(e)}") from None
            del flat
        bar.close()
        with open(os.path.join(hf_dir, "config.json")) as f:
            hf_cfg = json.load(f)
        hf_cfg["torch_dtype"] = dtype
        if tied and not cfg.tie_word_embeddings:
            hf_cfg["tie_word_embeddings"] = False       # the checkpoint's own lm_head is converted
        hf_cfg.pop("dtype", None)
        if quant:
            hf_cfg["jaxdyn_quantization"] = quant
        if quantize_lm_head:
            hf_cfg["jaxdyn_quantize_lm_head"] = True
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_cfg, f, indent=2)
        for name in ("generation_config.json", *TOKENIZER_FILES):
            src = os.path.join(hf_dir, name)
            if os.path.isfile(src):
                shutil.copy2(src, os.path.join(tmp, name))
        marker = {"format": "jaxdyn", "version": FORMAT_VERSION, "dtype": dtype, "quantization": quant,
                  "groups": list(groups), "param_bytes": int(num_bytes), "source": hf_dir,
                  "seconds": round(time.perf_counter() - t0, 3)}
        if quant == "fp8":
            marker["fp8_weights"] = FP8_WEIGHTS
        with open(os.path.join(tmp, MARKER), "w") as f:       # written last: marks the directory complete
            json.dump(marker, f, indent=2)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        ckptr.close()                              # its background threads, however the conversion ends
    return marker


def _replace(cfg: ModelConfig, **kw) -> ModelConfig:
    import dataclasses
    return dataclasses.replace(cfg, **kw)


def load_converted(path: str, mesh, *, dtype=None, config: ModelConfig | None = None, abstract=None) -> LoadedModel:
    """Restore a converted checkpoint into the sharding of ``mesh`` (any TP degree).
    ``abstract``: ``build_abstract_model(cfg, mesh, dtype)`` when the caller has built it already."""
    import orbax.checkpoint as ocp

    t0 = time.perf_counter()
    path = os.path.abspath(path)
    marker = read_marker(path)
    try:
        cfg = config or ModelConfig.from_pretrained(path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    dtype = jnp.dtype(dtype or marker["dtype"])
    graphdef, abstract = abstract or build_abstract_model(cfg, mesh, dtype)
    _, canonical = build_abstract_model(cfg, make_mesh(1, jax.devices()[:1]), jnp.dtype(marker["dtype"]))
    shardings = param_shardings(abstract, mesh)
    tp = model_parallel_size(mesh)
    canon = {_path_keys(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(canonical)[0]}
    targets = {}
    for (p, leaf), sh in zip(jax.tree_util.tree_flatten_with_path(abstract)[0], jax.tree.leaves(shardings)):
        targets[_path_keys(p)] = (leaf, sh)
    groups: dict[str, dict] = {}
    for keys, (leaf, sh) in targets.items():
        c = canon[keys]
        same = c.shape == leaf.shape and not (keys[-2] == "qkv_proj" and tp > 1)
        stored_dtype = c.dtype
        read_as = sh if same else NamedSharding(mesh, jax.sharding.PartitionSpec())
        local = keys[2:] if keys[0] == "layers" else keys[1:]
        groups.setdefault(_group_of(keys), {})[local] = jax.ShapeDtypeStruct(c.shape, stored_dtype, sharding=read_as)
    restored = {}
    with ocp.StandardCheckpointer() as ckptr:      # closed however the restore ends (its background threads)
        for group, flat in groups.items():
            gdir = os.path.join(path, "params", group)
            if not os.path.isdir(gdir):
                raise CheckpointError(f"{gdir}: missing parameter group {group!r}")
            try:
                _quiet_orbax_leftovers(collect=False)
                tree = ckptr.restore(gdir, _nest(flat))
            except Exception as e:  # orbax/tensorstore raise many kinds
                _quiet_orbax_leftovers()
                raise CheckpointError(f"{gdir}: cannot restore group {group!r}: {restore_error(e)} (a damaged or "
                                      f"incomplete checkpoint: convert it again)") from None
            for local in flat:
                v = tree
                for k in local:
                    v = v[str(k)]
                full = (("layers", int(group.split(".")[1])) if group.startswith("layers.") else (group,)) + local
                restored[full] = v
    out = []
    for keys, (leaf, sh) in targets.items():
        v = restored[keys]
        if keys[-2] == "qkv_proj" and tp > 1:     # stored for one shard: each shard's heads in turn, kv replicated
            if keys[-1] == "weight":               # an fp8 weight [out, in]: the heads along axis 0
                v = _merged_qkv(split_qkv(np.asarray(v).T, *qkv_sizes(cfg), 1), cfg, leaf.shape[::-1], tp).T
            else:
                v = _merged_qkv(split_qkv(np.asarray(v), *qkv_sizes(cfg), 1), cfg, leaf.shape, tp)
            v = jax.device_put(np.ascontiguousarray(v), sh)
        if v.dtype != leaf.dtype:
            v = jax.jit(lambda x, d=leaf.dtype: x.astype(d), out_shardings=sh)(v)
        out.append(v)
    treedef = jax.tree_util.tree_structure(abstract)
    state = jax.tree_util.tree_unflatten(treedef, out)
    jax.block_until_ready(out)
    num_bytes = sum(x.size * x.dtype.itemsize for x in out)
    return LoadedModel(cfg, graphdef, state, time.perf_counter() - t0, num_bytes)
