"""The ``jaxdyn`` command line."""

from __future__ import annotations

import argparse
import math
import os
import sys

import checkpoints as _checkpoints_pkg
from serving.tool_parsers import TOOL_CALL_PARSERS


class CLIError(Exception):
    """A problem with the command line or its inputs; printed as one line, exit status 2."""


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise CLIError(f"--prompt-ids: expected comma-separated integers, got {text!r}") from None
    if not ids:
        raise CLIError("--prompt-ids: empty prompt")
    return ids


def _model_or_demo(model: str | None) -> str:
    if model is not None:
        return model
    if not os.path.isdir(DEMO_MODEL):
        raise CLIError(f"no --model given and the demo checkpoint {DEMO_MODEL} is missing")
    return DEMO_MODEL


def cmd_generate(args) -> int:
    from checkpoints.hf import CheckpointError
    from jaxdyn import EngineConfig, LLM, RequestError, SamplingParams
    from jaxdyn.engine.llm import build_engine
    from jaxdyn.engine.sampling_params import SamplingParamsError

    if (args.prompt is None) == (args.prompt_ids is None):
        raise CLIError("give exactly one of --prompt and --prompt-ids")
    prompt = _parse_ids(args.prompt_ids) if args.prompt_ids is not None else args.prompt
    if args.prompt is not None and not args.prompt:
        raise CLIError("--prompt: empty prompt")
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos)
    except SamplingParamsError as e:
        raise CLIError(f"--{e.param.replace('_', '-')}: {str(e).split(': ', 1)[1]}") from None
    args.model = _model_or_demo(args.model)
    _check_model_fits(args.max_model_len, args.model, args.tp)
    try:
        engine = build_engine(args.model, tp=args.tp, dtype=args.dtype, load_format=args.load_format,
                              **_quantization(args),
                              config=EngineConfig(max_num_seqs=1, max_num_batched_tokens=256,
                                                  max_model_len=args.max_model_len),
                              warmup=False)     # one request: compile only the shapes it uses
    except (CheckpointError, ValueError) as e:      # ValueError: the engine's settings against the model or machine
        raise CLIError(str(e)) from None
    llm = LLM(engine=engine)
    if isinstance(prompt, str) and llm.tokenizer is None:
        raise CLIError(f"--prompt: {args.model} has no tokenizer; use --prompt-ids")
    try:
        out = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    except RequestError as e:
        raise CLIError(f"--prompt{'-ids' if args.prompt_ids else ''}: {e}") from None
    if args.prompt_ids is not None:
        print(" ".join(map(str, out.token_ids)))
    else:
        print(out.text)
    return 0


DEMO_MODEL = _checkpoints_pkg.DEMO_MODEL      # the shipped demo model (package data of ``checkpoints``)


def _quantization_arg(p: argparse.ArgumentParser) -> None:
    from jaxdyn.config import QUANTIZATIONS      # no JAX
    p.add_argument("--quantization", choices=QUANTIZATIONS, default=None,
                   help="quantize a Hugging Face checkpoint of float weights as it loads (on the devices, as "
                   "jaxdyn convert --quant would): fp8 = fp8 weights and activations (w8a8), int8 = int8 weights "
                   "only; random weights (--load-format dummy) are made quantized")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="with --quantization fp8 on a Hugging Face checkpoint or random weights: the output "
                   "projection (lm_head) in fp8 too, half its bytes (a checkpoint converted with jaxdyn convert "
                   "--quant fp8 --quantize-lm-head has it already); off by default, as in vLLM and SGLang (the "
                   "logits carry fp8's rounding)")


def _quantization(args) -> dict:
    """The loader's quantization arguments (``plan_model``) from ``_quantization_arg``'s flags."""
    return dict(quantization=args.quantization, quantize_lm_head=args.quantize_lm_head)


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    _quantization_arg(p)
    p.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                   help="dummy: random weights in the model's real shapes")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--num-pages", type=int, default=None, help="KV pages (default: sized from memory)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, metavar="FRACTION",
                   help="the share of each GPU's memory the engine's JAX takes, weights, KV pages and activations "
                        "(default: XLA_CLIENT_MEM_FRACTION if set, else 0.9); the KV pages get "
                        "0.85 of it less the weights unless --num-pages is given")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="do not reuse the KV pages of cached prompt prefixes")
    p.add_argument("--token-buckets", default=None,
                   help="step sizes compiled at warm-up, e.g. 16,64,512 (default: powers of two)")
    p.add_argument("--page-buckets", default=None,
                   help="page-table widths compiled at warm-up (default: powers of two)")
    p.add_argument("--seq-buckets", default=None, metavar="TOKENS:SEQS,...",
                   help="a token bucket also compiled with fewer sequence slots than its own (min(tokens, "
                   "--max-num-seqs)), e.g. 2048:512: a step of that many tokens whose rows fit the fewer slots "
                   "computes logits and samples for those only (one more executable a pair)")
    p.add_argument("--no-split-steps", dest="split_steps", action="store_const", const=False, default=None,
                   help="always run a step as one call of the smallest bucket that holds it (by default, on a GPU "
                   "or TPU, a step that would mostly pad its bucket runs as smaller buckets' steps where their "
                   "costs, measured at warm-up, add up to less)")
    p.add_argument("--first-compiles-alone", dest="first_compiles_alone", action="store_true",
                   help="at warm-up, compile each token bucket's first step alone, one after another, so that "
                   "XLA autotunes its matrix products with the GPU to itself (by default every step compiles "
                   "on the warm-up threads at once: on an H200 that started the 8B shape in 29.7 s instead of "
                   "51.2 s, with the same step costs within 2%%)")
    p.add_argument("--triton-gemm-max-tokens", default="auto", metavar="N|auto|all",
                   help="XLA's Triton matrix products only in steps of at most N tokens, cuBLAS's in larger ones "
                   "(0: never Triton; all: XLA's choice in every step). auto (default): 0 for an fp8 model on a "
                   "GPU (XLA's autotuning of Triton fp8 products made an 8B cold start minutes long, and "
                   "cuBLASLt's are as fast), else all")
    p.add_argument("--fp8-kernel-max-tokens", default="auto", metavar="N|auto",
                   help="an fp8 model's steps of at most N tokens multiply with jaxdyn's Pallas fp8-weight kernel "
                   "(bf16 activations, the weights read once at the copy rate) instead of cuBLASLt's fp8 x fp8 "
                   "product (0: never; the kernel takes steps of up to 128 tokens, larger ones keep cuBLASLt). auto (default): 0 on a GPU (jaxdyn.engine.core.FP8_KERNEL_MAX_TOKENS: measured slower "
                   "than cuBLASLt in a step), else 0")
    p.add_argument("--fp8-fused-quantize", default="auto", choices=("auto", "off", "o_proj", "all"),
                   help="which of an fp8 model's row-parallel inputs one Pallas kernel quantizes per row (o_proj's; "
                   "all: down_proj's too, silu(gate) * up made inside) instead of XLA's reduction and conversion. "
                   "At one device on the model axis only (no effect under --tp). auto (default): "
                   "jaxdyn.engine.core.FP8_FUSED_QUANTIZE on a GPU, else off")
    p.add_argument("--fp8-fused-quantize-min-tokens", default="auto", metavar="N|auto",
                   help="--fp8-fused-quantize in steps of at least N tokens only (smaller ones keep XLA's). auto "
                   "(default): jaxdyn.engine.core.FP8_FUSED_QUANTIZE_MIN_TOKENS on a GPU, else 0")
    p.add_argument("--fp8-fused-norm", default="auto", choices=("auto", "on", "off"),
                   help="an fp8 model's residual adds, RMSNorms and the per-token quantization of their outputs in "
                   "one Pallas kernel each instead of XLA's three (at one device on the model axis; no effect under "
                   "--tp). auto (default): jaxdyn.engine.core.FP8_FUSED_NORM on a GPU, else off")
    p.add_argument("--fused-rope-kv", default="auto", choices=("auto", "on", "off"),
                   help="each layer's rotary embedding of q and k and its K/V write into the pages in one Pallas "
                   "kernel instead of XLA's three (models without q/k norms whose heads per device and half a head "
                   "are powers of two). auto (default): jaxdyn.engine.core.FUSED_ROPE_KV on a GPU, else off")
    p.add_argument("--separate-sampler", nargs="?", const="all", default=None, choices=("all", "except-greedy"),
                   help="compile each token bucket's model once and the sampler apart (two calls a step) instead "
                   "of one executable a bucket and sampler variant, each with the model inside: warm-up compiles "
                   "the model a quarter as often (8B depth on the CPU, with three variants then: 17.1 s instead of "
                   "37.2 s). except-greedy: "
                   "greedy steps keep one executable (one call), the other variants share a forward: the model "
                   "compiled twice a bucket")
    p.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8", "fp8_e4m3"),
                   help="the KV cache's dtype: auto (default: the model's) or fp8 (float8 e4m3, also fp8_e4m3): "
                   "half the bytes a cached token, so twice the tokens fit and decode attention reads half as "
                   "much; values are stored unscaled, saturating at +-448. For GPUs: on the CPU every fp8 write "
                   "converts the whole pool")
    p.add_argument("--attention-programs", type=int, default=0, metavar="N",
                   help="run the GPU attention kernels as N programs that loop over their work items (a bucket's "
                   "empty sequence slots and padding items then cost no program each) instead of a program an item "
                   "(0, the default); on an H200 1.005x offline, within the runs' spread")
    p.add_argument("--prefill-programs", type=int, default=None, metavar="N",
                   help="the GPU prefill attention kernel alone as N programs looping over the step's real prompt "
                   "items (a decode-only step then starts N programs, not one per padding item); default: as "
                   "--attention-programs; 1056 on an H100 1.001x offline, within the runs' spread")
    p.add_argument("--skip-idle-prefill", action="store_true",
                   help="start the GPU prefill attention kernel only in steps with a prompt chunk (a condition "
                   "on the device), not in every step; on an H100 0.945x offline (the conditions cost more than "
                   "the idle launches), off by default")
    p.add_argument("--attention-fp8-products", default="off", choices=("off", "qk", "qk_pv"),
                   help="with --kv-cache-dtype fp8 on a GPU: the decode attention kernel's products on the fp8 "
                   "matrix instructions, the query quantized to e4m3 a head row (qk: the scores; qk_pv: the "
                   "values' product too, the probabilities in e4m3) instead of widening the pages to float16; off "
                   "by default")
    p.add_argument("--sampler-switch", nargs="?", const="all", default=None, choices=("all", "plain-full", "off"),
                   help="all (the bare flag): compile one executable a bucket for every sampler variant (greedy, "
                   "temperature, penalties/filters, logprobs), the variant picked on the device by a switch, instead "
                   "of four: a quarter of the model compilations at warm-up; filters and top logprobs then run "
                   "without a sort. On an H200 (8B fp8, three variants then) a cold start of 34-41 s against 71 s, "
                   "at 0.93x the throughput in the same run. plain-full: the switch over the penalties/filters and "
                   "logprobs variants only, greedy and temperature-only steps keeping their own executables (three "
                   "a bucket; on an H100, 8B fp8, top-p 0.95: 0.994x off's throughput, cold start 0.86x). off: four "
                   "executables a bucket. Default: plain-full on a GPU (off with --separate-sampler), else off")
    p.add_argument("--schedule-policy", default="fcfs", choices=("fcfs", "lof"),
                   help="the order waiting requests are admitted in, after their priority: fcfs (default: arrival) "
                   "or lof (longest output first, by max_tokens, as SGLang's: shortens an offline batch's tail "
                   "when max_tokens are the outputs' lengths; under a steady load it can hold short requests back)")
    p.add_argument("--executable-cache", default=None, metavar="DIR",
                   help="save the compiled steps here and load them at the next start (no tracing or compiling "
                   "of the steps then); default: $JAXDYN_EXECUTABLE_CACHE, else jaxdyn-executables inside JAX's "
                   "compilation cache ($JAX_COMPILATION_CACHE_DIR) when that is set, else "
                   "~/.cache/jaxdyn/executables ($XDG_CACHE_HOME if set)")
    p.add_argument("--no-executable-cache", dest="executable_cache", action="store_const", const="",
                   help="neither load nor save compiled steps")


# --separate-sampler's value (absent, bare, or "except-greedy") as ``EngineConfig.separate_sampler``
SEPARATE_SAMPLER_FLAG = {None: False, "all": True, "except-greedy": "except_greedy"}
# --sampler-switch's value (absent, bare, "plain-full" or "off") as ``EngineConfig.sampler_switch``
SAMPLER_SWITCH_FLAG = {None: None, "all": True, "plain-full": "plain_full", "off": False}
# the EngineConfig value of an auto|on|off flag (--fp8-fused-norm, --fused-rope-kv)
AUTO_ON_OFF = {"auto": "auto", "on": True, "off": False}


def _checked_seq_buckets(pairs, token_buckets, max_num_batched_tokens: int, max_num_seqs: int, flag: str):
    """``pairs`` checked against the token buckets a runner of these settings compiles (``check_seq_buckets``), a
    CLIError naming ``flag`` otherwise."""
    from jaxdyn.engine.buckets import check_seq_buckets, token_buckets_for
    try:
        return check_seq_buckets(pairs, token_buckets_for(token_buckets, max_num_batched_tokens), max_num_seqs)
    except ValueError as e:
        raise CLIError(f"{flag}: {e}") from None


def _engine_config(args):
    from jaxdyn import EngineConfig
    return EngineConfig(**_engine_fields(args))


def _port(low: int):
    """An argparse type: a TCP port number from ``low`` to 65535."""
    def parse(text: str) -> int:
        try:
            port = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
        if not low <= port <= 65535:
            raise argparse.ArgumentTypeError(f"a port is {low}..65535, got {port}")
        return port
    return parse


def _model_name(text: str) -> str:
    """An argparse type: the name requests give as ``model`` (not empty: every request naming one would be a 404)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a non-empty name")
    return text


def _set_xla_options(config) -> None:
    """build_engine's process-wide XLA options (command-buffer mode, memory share), for a command that reads its
    devices before building its engine: before that starts JAX's backend (a share JAX cannot take: CLIError)."""
    from jaxdyn.engine import xla_options
    xla_options.command_buffer_update_mode()
    try:
        xla_options.gpu_memory_fraction(config.gpu_memory_utilization)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _served_names(args, model: str) -> list[str]:
    """The names ``jaxdyn serve`` answers to, the first the one responses carry when a request names none:
    ``--served-model-name``'s, else the checkpoint directory's name and ``--model`` as given (vLLM's default name)
    where one was given."""
    if args.served_model_name:
        return list(dict.fromkeys(args.served_model_name))
    return list(dict.fromkeys([os.path.basename(os.path.normpath(model)), *([args.model] if args.model else [])]))


def _check_port_free(host: str, port: int) -> None:
    """Fail now, before minutes of loading and compiling, if the host cannot be listened on at the port (port 0:
    any free one, the host checked alone)."""
    import socket
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise CLIError(f"--host {host!r}: {e.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as e:
            raise CLIError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror})") from None


def _check_model_fits(max_model_len: int | None, model: str, tp: int = 1) -> None:
    """--max-model-len at least 1 and within the model's positions (a directory's config.json, or a preset's),
    and --tp dividing its attention heads, checked before anything loads: a context the model was not trained
    for, a KV cache sized for a billion tokens, or heads that cannot be split fail here with the flag named."""
    if max_model_len is not None and max_model_len < 1:
        raise CLIError(f"--max-model-len must be at least 1, got {max_model_len}")
    if tp < 1:
        raise CLIError(f"--tp must be at least 1, got {tp}")
    if max_model_len is None and tp == 1:
        return
    from jaxdyn.config import ConfigError, ModelConfig       # no JAX
    from jaxdyn.models.presets import PRESETS, preset_config
    try:
        cfg = ModelConfig.from_pretrained(model) if os.path.isdir(model) else (
            ModelConfig.from_dict(preset_config(model)) if model in PRESETS else None)
    except ConfigError:
        return                      # the load names what is wrong with the config
    if cfg is not None and cfg.num_heads % tp:
        raise CLIError(f"--tp {tp}: the model's {cfg.num_heads} attention heads do not split over {tp} devices")
    if max_model_len is None:
        return
    if cfg is not None and max_model_len > cfg.max_position_embeddings:
        raise CLIError(f"--max-model-len {max_model_len} exceeds the model's max_position_embeddings "
                       f"({cfg.max_position_embeddings})")


def _check_addresses(text: str, flag: str) -> None:
    for addr in text.split(","):
        host, _, port = addr.strip().rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise CLIError(f"{flag}: expected HOST:PORT[,HOST:PORT...], got {addr.strip()!r}")


def _engine_fields(args) -> dict:
    """The EngineConfig fields the flags give, checked (CLIError); imports no JAX."""
    for name in ("max_num_seqs", "max_num_batched_tokens", "page_size", "tp"):
        if getattr(args, name, 1) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be at least 1")
    if hasattr(args, "model"):
        _check_model_fits(args.max_model_len, _model_or_demo(args.model), getattr(args, "tp", 1))
    if args.max_num_seqs > args.max_num_batched_tokens:
        raise CLIError("--max-num-seqs cannot exceed --max-num-batched-tokens")
    if args.num_pages is not None and args.num_pages < 1:
        raise CLIError("--num-pages must be at least 1")
    util = getattr(args, "gpu_memory_utilization", None)
    if util is not None and not 0 < util <= 1:      # NaN too
        raise CLIError(f"--gpu-memory-utilization: expected a fraction in (0, 1], got {util}")
    if getattr(args, "attention_fp8_products", "off") != "off":
        if getattr(args, "kv_cache_dtype", "auto") not in ("fp8", "fp8_e4m3"):
            raise CLIError("--attention-fp8-products needs --kv-cache-dtype fp8 (the products of fp8 pages)")
        if getattr(args, "dtype", None) == "float32":
            raise CLIError("--attention-fp8-products takes a 16-bit model (its query is quantized from bf16): not "
                           "with --dtype float32")
    if getattr(args, "attention_programs", 0) < 0:
        raise CLIError(f"--attention-programs: expected an integer >= 0, got {args.attention_programs}")
    if (getattr(args, "prefill_programs", None) or 0) < 0:
        raise CLIError(f"--prefill-programs: expected an integer >= 0, got {args.prefill_programs}")
    buckets = {}
    for name in ("token_buckets", "page_buckets"):
        text = getattr(args, name, None)
        if text:
            flag = "--" + name.replace("_", "-")
            try:
                vals = tuple(sorted({int(t) for t in text.replace(",", " ").split()}))
            except ValueError:
                raise CLIError(f"{flag}: expected comma-separated integers, got {text!r}") from None
            if not vals or vals[0] < 1:
                raise CLIError(f"{flag}: sizes must be at least 1")
            buckets[name] = vals
    if "token_buckets" in buckets and buckets["token_buckets"][-1] < args.max_num_batched_tokens:
        raise CLIError("--token-buckets: the largest must be at least --max-num-batched-tokens")
    if getattr(args, "seq_buckets", None):
        try:
            pairs = [tuple(int(v) for v in pair.split(":")) for pair in args.seq_buckets.replace(",", " ").split()]
            if not pairs or any(len(p) != 2 for p in pairs):
                raise ValueError
        except ValueError:
            raise CLIError(f"--seq-buckets: expected comma-separated TOKENS:SEQS pairs, got {args.seq_buckets!r}") \
                from None
        buckets["seq_buckets"] = _checked_seq_buckets(pairs, buckets.get("token_buckets"),
                                                      args.max_num_batched_tokens, args.max_num_seqs, "--seq-buckets")
    triton = _token_limit(args, "triton_gemm_max_tokens", {"auto": "auto", "all": None})
    fp8_kernel = _token_limit(args, "fp8_kernel_max_tokens", {"auto": "auto"})
    fused_min = _token_limit(args, "fp8_fused_quantize_min_tokens", {"auto": "auto"})
    switch = SAMPLER_SWITCH_FLAG[getattr(args, "sampler_switch", None)]
    if switch and getattr(args, "separate_sampler", None):
        raise CLIError("--sampler-switch and --separate-sampler are two ways to compile the model once a bucket: "
                       "pick one")
    from jaxdyn.engine.executable_cache import default_directory
    cache = getattr(args, "executable_cache", None)
    cache = default_directory() if cache is None else (cache or None)
    if cache is not None and os.path.exists(cache) and not os.path.isdir(cache):
        raise CLIError(f"--executable-cache {cache}: not a directory")
    return dict(page_size=args.page_size, num_pages=args.num_pages, gpu_memory_utilization=util,
                max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                seed=args.seed, enable_prefix_caching=args.prefix_cache, executable_cache_dir=cache,
                split_steps=args.split_steps, first_compiles_alone=args.first_compiles_alone,
                triton_gemm_max_tokens=triton, fp8_kernel_max_tokens=fp8_kernel,
                fp8_fused_quantize=getattr(args, "fp8_fused_quantize", "auto"),
                fp8_fused_quantize_min_tokens=fused_min,
                fp8_fused_norm=AUTO_ON_OFF[getattr(args, "fp8_fused_norm", "auto")],
                fused_rope_kv=AUTO_ON_OFF[getattr(args, "fused_rope_kv", "auto")],
                separate_sampler=SEPARATE_SAMPLER_FLAG[getattr(args, "separate_sampler", None)],
                kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"),
                schedule_policy=getattr(args, "schedule_policy", "fcfs"),
                attention_programs=getattr(args, "attention_programs", 0),
                prefill_programs=getattr(args, "prefill_programs", None),
                skip_idle_prefill=getattr(args, "skip_idle_prefill", False),
                attention_fp8_products=getattr(args, "attention_fp8_products", "off"),
                sampler_switch=switch,
                **buckets)


def _token_limit(args, name: str, words: dict):
    """A token-count flag's value: an integer >= 0, or one of ``words`` (mapped to its value)."""
    text = getattr(args, name, "auto")
    if text in words:
        return words[text]
    flag = "--" + name.replace("_", "-")
    try:
        value = int(text)
    except ValueError:
        raise CLIError(f"{flag}: expected an integer, {' or '.join(words)}, got {text!r}") from None
    if value < 0:
        raise CLIError(f"{flag} must be at least 0")
    return value


def _device_list(text: str | None, flag: str) -> list[int]:
    if text is None:
        raise CLIError(f"{flag}: required with --disagg (device indices, e.g. 0,1)")
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise CLIError(f"{flag}: expected comma-separated device indices, got {text!r}") from None
    if not ids:
        raise CLIError(f"{flag}: no device index in {text!r}")
    if len(set(ids)) != len(ids) or any(i < 0 for i in ids):
        raise CLIError(f"{flag}: device indices must be distinct and >= 0, got {text!r}")
    return ids


def _flags_given(args, command: list[str], adder) -> list[str]:
    """The flags ``adder`` (a function that adds arguments to a parser) defines that ``args`` (a parse of
    ``command``'s) sets to other than ``command``'s defaults, by their first option string."""
    probe = argparse.ArgumentParser(add_help=False)
    adder(probe)
    defaults = vars(build_parser().parse_args(command))
    given: dict[str, str] = {}
    for a in probe._actions:
        if not a.option_strings or a.dest not in defaults:
            continue
        value = getattr(args, a.dest, defaults[a.dest])
        if value != defaults[a.dest] and (a.dest not in given or getattr(a, "const", None) == value):
            given[a.dest] = a.option_strings[0]     # of a flag pair (--x / --no-x), the one that sets this value
    return list(given.values())


def _disagg_flags(p) -> None:
    """The flags of ``serve --disagg`` beside ``--disagg`` itself (``build_parser``'s group)."""
    p.add_argument("--prefill-devices", default=None, help="device indices, e.g. 0,1")
    p.add_argument("--decode-devices", default=None, help="device indices, e.g. 2,3")
    p.add_argument("--prefill-max-num-batched-tokens", type=int, default=None,
                   help="token budget of a prefill step (default: --max-num-batched-tokens)")
    _policy_args(p)


def _policy_args(p) -> None:
    """The disaggregation policy's flags (serve --disagg, and decode workers)."""
    p.add_argument("--disagg-min-remote-tokens", type=int, default=64,
                   help="shorter prompts (or uncached remainders) are prefilled on the decode side")
    p.add_argument("--disagg-max-prefill-queue", type=int, default=64,
                   help="remote prefills in flight beyond which new prompts are prefilled locally")
    p.add_argument("--disagg-prefill-timeout", type=float, default=120.0,
                   help="seconds after which a remote prefill ends its request with an error")


def _disagg_policy(args):
    from jaxdyn.disagg.policy import MAX_PREFILL_TIMEOUT_S, DisaggPolicy
    try:
        return DisaggPolicy(args.disagg_min_remote_tokens, args.disagg_max_prefill_queue,
                            args.disagg_prefill_timeout)
    except ValueError:
        raise CLIError(f"--disagg-*: thresholds must be >= 0 and the timeout seconds > 0 and at most "
                       f"{MAX_PREFILL_TIMEOUT_S:g}") from None


def _disagg_args(args, config) -> dict:
    """build_disagg_engine's arguments from --disagg and its flags (checked before the port opens)."""
    import dataclasses

    import jax

    pre = _device_list(args.prefill_devices, "--prefill-devices")
    dec = _device_list(args.decode_devices, "--decode-devices")
    if set(pre) & set(dec):
        raise CLIError(f"--prefill-devices and --decode-devices overlap: {sorted(set(pre) & set(dec))}")
    n = len(jax.devices())
    if max(pre + dec) >= n:
        raise CLIError(f"--prefill-devices/--decode-devices: this machine has {n} device(s) (0..{n - 1})")
    if args.tp != 1:
        raise CLIError("--tp does not apply with --disagg: each mesh's TP is its number of devices")
    policy = _disagg_policy(args)
    pcfg = config
    if args.prefill_max_num_batched_tokens is not None:
        if args.prefill_max_num_batched_tokens < config.max_num_seqs:
            raise CLIError("--prefill-max-num-batched-tokens cannot be below --max-num-seqs")
        pcfg = dataclasses.replace(config, max_num_batched_tokens=args.prefill_max_num_batched_tokens)
        if pcfg.token_buckets and max(pcfg.token_buckets) < pcfg.max_num_batched_tokens:
            raise CLIError(f"--token-buckets: the largest ({max(pcfg.token_buckets)}) must be at least "
                           f"--prefill-max-num-batched-tokens ({pcfg.max_num_batched_tokens}): the prefill engine "
                           "takes the same buckets")
        if pcfg.seq_buckets:        # against the prefill engine's token buckets too, before the port opens
            _checked_seq_buckets(pcfg.seq_buckets, pcfg.token_buckets, pcfg.max_num_batched_tokens, pcfg.max_num_seqs,
                                 "--seq-buckets (the prefill engine's, --prefill-max-num-batched-tokens "
                                 f"{pcfg.max_num_batched_tokens})")
    return dict(prefill_devices=pre, decode_devices=dec, prefill_config=pcfg, policy=policy)


def _remote_engine(model: str, args):
    from checkpoints.loader import model_config_and_tokenizer
    from serving.workers.frontend import RemoteEngine

    cfg, tokenizer = model_config_and_tokenizer(model, load_format=args.load_format)
    addresses = [a for a in args.workers.split(",") if a]
    return RemoteEngine(addresses, tokenizer=tokenizer, model_config=cfg, connect_timeout=args.workers_wait)


def cmd_serve(args) -> int:
    import signal
    import threading
    import time

    from jaxdyn.config import ConfigError, ModelConfig, hub_id_hint      # no JAX: see jaxdyn/__init__.py
    from jaxdyn.models.presets import PRESETS

    model = _model_or_demo(args.model)
    # Check what can be checked before the port opens.
    if args.load_format == "dummy" and model in PRESETS:
        pass
    elif not os.path.isdir(model):
        raise CLIError(f"--model {model!r}: no such directory{hub_id_hint(model)}")
    else:
        try:
            ModelConfig.from_pretrained(model)
        except ConfigError as e:
            raise CLIError(str(e)) from None
    fields = _engine_fields(args)
    if args.workers and (args.quantization or args.quantize_lm_head):
        raise CLIError(f"--workers and --{'quantization' if args.quantization else 'quantize-lm-head'}: each worker "
                       f"loads (and quantizes) the model itself")
    if args.workers and args.disagg:
        raise CLIError("--workers and --disagg: the workers decide where prompts are prefilled")
    if args.workers:
        # the front end runs no engine: its flags would be ignored (the front end reads the model's config and
        # tokenizer, so --load-format stays)
        given = [f for f in _flags_given(args, ["serve"], _engine_args) if f != "--load-format"]
        if given:
            raise CLIError(f"--workers and {given[0]}: each worker runs its own engine; give {given[0]} to the "
                           "workers (jaxdyn worker)")
    if not args.disagg:
        given = _flags_given(args, ["serve"], _disagg_flags)
        if given:
            raise CLIError(f"{given[0]} is for --disagg (prefill and decode on separate devices)")
    if args.max_queued_requests is not None and args.max_queued_requests < 0:
        raise CLIError("--max-queued-requests must be >= 0")
    if args.max_request_bytes < 1:
        raise CLIError(f"--max-request-bytes must be at least 1, got {args.max_request_bytes}")
    if not args.shutdown_grace >= 0:        # NaN too (the drain's timer cannot take it)
        raise CLIError(f"--shutdown-grace must be seconds >= 0, got {args.shutdown_grace}")
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise CLIError("--enable-auto-tool-choice needs --tool-call-parser (the served model's tool-call syntax: "
                       f"{', '.join(TOOL_CALL_PARSERS)})")
    if args.workers:
        _check_addresses(args.workers, "--workers")
        if not (math.isfinite(args.workers_wait) and args.workers_wait > 0):
            raise CLIError(f"--workers-wait: expected seconds > 0, got {args.workers_wait:g}")
    from jaxdyn.engine.sampling_params import generation_config_dir, generation_defaults
    gen_source = generation_config_dir(args.generation_config, model)
    try:
        sampling_defaults = generation_defaults(gen_source)
    except ValueError as e:
        raise CLIError(str(e)) from None
    _check_port_free(args.host, args.port)
    if sampling_defaults:
        print(f"jaxdyn: requests' defaults from {os.path.join(gen_source, 'generation_config.json')} (where a "
              f"request leaves them out; --generation-config vllm: none): "
              + ", ".join(f"{k}={v}" for k, v in sampling_defaults.items()), flush=True)
    started = None
    if args.engine_process and not args.workers and not args.disagg:
        # The engine process starts now: its Python, JAX and engine imports run while this process imports
        # its own below (one after the other, they were ~3 s of a start on 2 CPU cores).
        from jaxdyn.engine.boot import start_engine_process
        started = start_engine_process(dict(model=model, tp=args.tp, dtype=args.dtype, load_format=args.load_format,
                                            config=fields, progress=True, **_quantization(args)))

    import uvicorn

    from checkpoints.hf import CheckpointError
    from jaxdyn import AsyncEngine, EngineConfig
    from jaxdyn.engine.llm import build_disagg_engine, build_engine, describe_compile
    from jaxdyn.engine.process import EngineStartError, ProcessEngine, out_of_device_memory
    from serving.app import ServerState, build_app

    config = EngineConfig(**fields)
    if args.disagg:     # both meshes live in this process, and _disagg_args reads its devices
        _set_xla_options(config)
    disagg = _disagg_args(args, config) if args.disagg else None
    name, *aliases = _served_names(args, model)
    state = ServerState(name, aliases=tuple(aliases), model_root=args.model or model,
                        max_queued_requests=args.max_queued_requests,
                        max_request_bytes=args.max_request_bytes, sampling_defaults=sampling_defaults,
                        tool_call_parser=args.tool_call_parser if args.enable_auto_tool_choice else None)
    app = build_app(state)
    server = _DrainingServer(state, uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                                   timeout_graceful_shutdown=args.shutdown_grace))
    failed = []

    def address() -> str:
        """The server's address, with the port it bound (``--port 0``: the one the system gave)."""
        for _ in range(200):
            if server.started or server.should_exit:
                break
            time.sleep(0.05)
        port = args.port
        for srv in getattr(server, "servers", None) or []:
            for sock in getattr(srv, "sockets", None) or []:
                port = sock.getsockname()[1]
        return f"http://{args.host}:{port}/v1"

    def load():
        try:
            if args.workers:
                state.engine = _remote_engine(model, args)
                print(f"jaxdyn: serving {name!r} at {address()} over workers "
                      f"{args.workers}", flush=True)
                return
            if disagg is not None:
                core = build_disagg_engine(model, dtype=args.dtype, load_format=args.load_format,
                                           config=config, progress=True, **_quantization(args),
                                           **disagg)
                state.engine = AsyncEngine(core, max_queued_requests=args.max_queued_requests)
            elif args.engine_process:
                state.engine = ProcessEngine(model, tp=args.tp, dtype=args.dtype, load_format=args.load_format,
                                             config=config, progress=True, **_quantization(args),
                                             max_queued_requests=args.max_queued_requests, started=started)
                core = state.engine.core
            else:
                core = build_engine(model, tp=args.tp, dtype=args.dtype, load_format=args.load_format,
                                    config=config, progress=True, **_quantization(args))
                state.engine = AsyncEngine(core, max_queued_requests=args.max_queued_requests)
            info = core.load_info
            print(f"jaxdyn: loaded {model} ({info['weight_bytes'] / 2**20:.1f} MiB of weights) in "
                  f"{info['seconds']:.1f} s, warm-up (compiling every bucket, begun with the load) "
                  f"{info['warmup_seconds']:.1f} s", flush=True)
            if info.get("compile"):
                print(f"jaxdyn: {describe_compile(info['compile'])}", flush=True)
            for role, summary in info.get("compile_by_role", {}).items():
                print(f"jaxdyn: {role} mesh: {describe_compile(summary)}", flush=True)
            if info.get("step_costs_ms"):
                print(f"jaxdyn: step costs (ms by token bucket, measured at warm-up) {info['step_costs_ms']}",
                      flush=True)
            print(f"jaxdyn: serving {name!r} at {address()} "
                  f"(max_model_len {core.max_model_len}, {core.num_pages} KV pages)", flush=True)
        except (CheckpointError, ValueError, ConnectionError, EngineStartError) as e:
            state.load_error = e
            failed.append(str(e))
            server.should_exit = True
        except BaseException as e:
            state.load_error = e
            why = out_of_device_memory(e)
            failed.append(why or repr(e))
            server.should_exit = True
            if why is None:
                raise

    threading.Thread(target=load, name="jaxdyn-load", daemon=True).start()
    # SIGTERM / SIGINT: uvicorn stops accepting, lets in-flight requests finish within the
    # grace period, then re-raises the signal; this handler makes that re-raise a clean exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    if state.engine is not None:
        state.engine.shutdown()
    if failed:
        raise CLIError(f"loading {model} failed: {failed[0]}")
    return 0


def _DrainingServer(state, config):
    """uvicorn's server, whose shutdown (SIGTERM) ends the requests still unfinished shortly before its grace
    period runs out with an error (an SSE error event and [DONE], or a 503), where uvicorn would cancel them
    mid-response."""
    import asyncio

    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            grace = self.config.timeout_graceful_shutdown
            if grace is not None and state.engine is not None:
                def fail():
                    n = state.engine.fail_unfinished(f"the server is shutting down (its {grace:g} s grace period "
                                                     "ran out)")
                    if n:
                        print(f"jaxdyn: shutting down: {n} unfinished request(s) ended with an error", flush=True)
                asyncio.get_running_loop().call_later(max(grace - min(1.0, grace / 2), 0.0), fail)
            await super().shutdown(sockets)

    return Server(config)


def cmd_worker(args) -> int:
    """A worker process: one role's gRPC service over its engine (serving/workers)."""
    import asyncio

    import jax

    from checkpoints.hf import CheckpointError
    from checkpoints.loader import load_weights, plan_model
    from jaxdyn import AsyncEngine, EngineCore
    from jaxdyn.disagg.engine import DisaggEngine, LocalPrefillRole
    from jaxdyn.engine.process import out_of_device_memory
    from jaxdyn.parallel.sharding import make_mesh
    from serving.workers.common import host_port, kv_layout
    from serving.workers.remote_prefill import RemotePrefillRole
    from serving.workers.worker import WorkerService, serve_worker

    model = _model_or_demo(args.model)
    config = _engine_config(args)
    if args.prefill_workers:
        _check_addresses(args.prefill_workers, "--prefill-workers")
    _check_port_free(args.host, args.port)
    _set_xla_options(config)
    n = len(jax.devices())
    devices = _device_list(args.devices, "--devices") if args.devices is not None else list(range(args.tp))
    if max(devices) >= n:
        raise CLIError(f"--devices: this machine has {n} device(s) (0..{n - 1})")
    if args.devices and args.tp not in (1, len(devices)):
        raise CLIError("--tp: with --devices the TP degree is the number of devices")
    _check_model_fits(args.max_model_len, model, len(devices))
    prefill_workers = [a for a in (args.prefill_workers or "").split(",") if a]
    if prefill_workers and args.role != "decode":
        raise CLIError("--prefill-workers: only a decode worker sends prompts to prefill workers")
    policy = _disagg_policy(args)
    mesh = make_mesh(len(devices), [jax.devices()[i] for i in devices])
    try:
        plan = plan_model(model, dtype=args.dtype, load_format=args.load_format, mesh=mesh, **_quantization(args))
        # as build_engine: built on the weights' shapes, the steps compile while the weights load, and the KV
        # pages are allocated after both (the buffers loading and compiling take for a while gone by then)
        core = EngineCore(plan.graphdef, plan.abstract, mesh, plan.config, plan.tokenizer, config)
        core.load_weights(lambda: load_weights(plan), compile_steps=True)
    except (CheckpointError, ValueError) as e:      # ValueError: the engine's settings against the model or machine
        raise CLIError(str(e)) from None
    except Exception as e:  # noqa: BLE001 -- out of device memory named as a CLI error, anything else raised
        if (why := out_of_device_memory(e)) is None:
            raise
        raise CLIError(why) from None
    name = args.served_model_name or os.path.basename(os.path.normpath(model))
    closers = []      # shut down on leaving: the engine thread, the prefill roles' threads and calls in flight
    if args.role == "prefill":
        role = LocalPrefillRole(core, None)
        closers.append(role.shutdown)
        role.warmup()
        service = WorkerService("prefill", name, prefill=role, transfer_host=args.host)
    else:
        engine = core
        if prefill_workers:
            remote = RemotePrefillRole(prefill_workers, transport=args.kv_transport, device=mesh.devices.flat[0],
                                       transfer_host=args.host, timeout_s=policy.prefill_timeout_s,
                                       expect=kv_layout(core))
            closers.append(remote.shutdown)
            engine = DisaggEngine(remote, core, policy)
        engine.warmup()
        async_engine = AsyncEngine(engine)
        closers.insert(0, async_engine.shutdown)
        service = WorkerService(args.role, name, engine=async_engine, transfer_host=args.host)

    listening = []

    def ready(port):
        print(f"jaxdyn worker: {args.role} worker for {name!r} listening on {host_port(args.host, port)}",
              flush=True)
        listening.append(port)

    try:
        asyncio.run(serve_worker(service, args.host, args.port, ready))
    except KeyboardInterrupt:
        pass
    except OSError as e:
        if listening:
            raise
        raise CLIError(f"--host/--port: {e}") from None     # the port taken since it was checked, or an address
    finally:                                                # gRPC cannot bind
        for close in closers:
            close()
    return 0


def cmd_convert(args) -> int:
    from checkpoints.convert import convert
    from checkpoints.hf import CheckpointError

    try:
        info = convert(args.hf, args.out, dtype=args.dtype, quant=args.quant, quantize_lm_head=args.quantize_lm_head,
                       force=args.force,
                       progress=not args.quiet)
    except CheckpointError as e:
        raise CLIError(str(e)) from None
    print(f"jaxdyn convert: wrote {args.out} ({info['param_bytes'] / 2**20:.1f} MiB of parameters, "
          f"{info['dtype']}{', ' + info['quantization'] if info['quantization'] else ''}) in {info['seconds']:.1f} s")
    return 0


def cmd_bench_kernels(args) -> int:
    from benchmarks import kernels
    kernels.main(args.bench_args, prog="jaxdyn bench kernels")
    return 0


def cmd_bench_serve(args) -> int:
    from serving.bench import BenchError, serve
    try:
        return serve.main(args)
    except BenchError as e:
        raise CLIError(str(e)) from None


def cmd_bench_offline(args) -> int:
    from serving.bench import BenchError, offline
    try:
        offline.run(args, _model_or_demo(args.model), _engine_config(args))
    except BenchError as e:
        raise CLIError(str(e)) from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    from jaxdyn.config import QUANTIZATIONS      # no JAX
    p = argparse.ArgumentParser(prog="jaxdyn", description="JAX/XLA-compiled LLM inference server")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate a continuation offline")
    g.add_argument("--model", default=None, help="(default: the shipped demo model) checkpoint directory, or a preset "
                   "name with --load-format dummy")
    g.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                   help="dummy: random weights in the model's real shapes")
    g.add_argument("--prompt", help="prompt text (needs the checkpoint's tokenizer)")
    g.add_argument("--prompt-ids", help="comma-separated token ids; prints token ids")
    g.add_argument("--max-tokens", type=int, default=16)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--max-model-len", type=int, default=None,
                   help="context length (default: the model's max_position_embeddings, at most 8,192)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    _quantization_arg(g)
    g.set_defaults(func=cmd_generate)

    cv = sub.add_parser("convert", help="Hugging Face safetensors -> jaxdyn Orbax checkpoint")
    cv.add_argument("--hf", required=True, help="Hugging Face checkpoint directory")
    cv.add_argument("--out", required=True, help="output directory (written atomically)")
    cv.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    cv.add_argument("--quant", default=None, choices=QUANTIZATIONS,
                    help="int8: weights only, per output channel; fp8: weights per output channel and each "
                         "product's input per token, fp8 x fp8 products (w8a8)")
    cv.add_argument("--quantize-lm-head", action="store_true",
                    help="with --quant fp8: the output projection (lm_head) in fp8 too (with tied embeddings, an "
                         "fp8 copy of the embedding beside it)")
    cv.add_argument("--force", action="store_true", help="replace an existing output directory")
    cv.add_argument("--quiet", action="store_true", help="no progress bar")
    cv.set_defaults(func=cmd_convert)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    sv.add_argument("--model", default=None, help="checkpoint directory (default: the shipped demo model)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=_port(0), default=8000)
    sv.add_argument("--served-model-name", type=_model_name, nargs="+", default=None, metavar="NAME",
                    help="the names requests give as model (vLLM's: each accepted, the first in responses that "
                         "name none; default: the checkpoint directory's name, and --model as given)")
    sv.add_argument("--generation-config", default="auto", metavar="auto|vllm|DIR",
                    help="where requests' default temperature, top_p, top_k, min_p, repetition_penalty and "
                         "max_tokens cap come from (vLLM's): auto, the model's generation_config.json; vllm, none "
                         "(the OpenAI defaults); or a folder holding a generation_config.json")
    sv.add_argument("--enable-auto-tool-choice", action="store_true",
                    help="chat requests with tools (tool_choice \"auto\") get the model's tool calls read out of its "
                         "reply as OpenAI's tool_calls (vLLM's flag; needs --tool-call-parser)")
    sv.add_argument("--tool-call-parser", default=None, choices=TOOL_CALL_PARSERS,
                    help="the served model's tool-call syntax: hermes (<tool_call>{...}</tool_call>: Hermes, Qwen 2.5 "
                         "and 3), llama3_json (Llama 3.1 / 3.2's JSON calls) or mistral ([TOOL_CALLS]...)")
    sv.add_argument("--max-queued-requests", type=int, default=None,
                    help="requests that may wait beyond --max-num-seqs running ones (503 beyond)")
    sv.add_argument("--max-request-bytes", type=int, default=8 << 20)
    sv.add_argument("--shutdown-grace", type=float, default=30.0,
                    help="seconds in-flight requests get to finish on SIGTERM")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug", "trace"])
    sv.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                    help="run the engine loop in its own process, apart from the HTTP server's Python "
                    "(default; --no-engine-process: on a thread of the server; --disagg always does)")
    _engine_args(sv)
    dg = sv.add_argument_group("disaggregated prefill and decode (one process, two meshes)")
    dg.add_argument("--disagg", action="store_true",
                    help="prefill on --prefill-devices, decode on --decode-devices, KV moved device to device")
    _disagg_flags(dg)
    sv.add_argument("--workers", default=None,
                    help="HOST:PORT,... of decode/both workers (jaxdyn worker): serve the API over them; "
                    "--model then only gives the tokenizer and config")
    sv.add_argument("--workers-wait", type=float, default=900.0, metavar="SECONDS",
                    help="with --workers: how long to wait for a decode or both worker to answer before giving up "
                    "(workers compiling from a cold cache take minutes; /health is 503 meanwhile; default 900)")
    sv.set_defaults(func=cmd_serve)

    wk = sub.add_parser("worker", help="a worker process serving one role over gRPC (serving/workers)")
    wk.add_argument("--role", required=True, choices=["prefill", "decode", "both"])
    wk.add_argument("--model", default=None, help="checkpoint directory (default: the shipped demo model)")
    wk.add_argument("--host", default="127.0.0.1")
    wk.add_argument("--port", type=_port(0), default=50051, help="0: any free port (printed)")
    wk.add_argument("--served-model-name", type=_model_name, default=None)
    wk.add_argument("--devices", default=None, help="device indices of this worker's mesh (default: 0..tp-1)")
    wk.add_argument("--prefill-workers", default=None,
                    help="decode role: HOST:PORT,... of prefill workers (else every prompt is prefilled here)")
    wk.add_argument("--kv-transport", choices=["grpc", "jax"], default="grpc",
                    help="how KV comes from prefill workers: bytes in the gRPC stream, or "
                    "jax.experimental.transfer device to device")
    _policy_args(wk)
    _engine_args(wk)
    wk.set_defaults(func=cmd_worker)

    bn = sub.add_parser("bench", help="benchmarks")
    bsub = bn.add_subparsers(dest="bench_command", required=True)
    bk = bsub.add_parser("kernels", help="Pallas paged-attention kernels vs the reference, JAX's "
                         "bundled op and the HBM / matmul ceilings (python -m benchmarks.kernels)",
                         add_help=False)
    bk.set_defaults(func=cmd_bench_kernels, passes_on=True)   # its arguments are benchmarks.kernels' (--out, ...)
    from serving.bench import offline as bench_offline, serve as bench_serve
    bs = bsub.add_parser("serve", help="load an OpenAI-compatible server over HTTP and report what vLLM's "
                         "bench serve does (TTFT, TPOT, ITL, E2E, throughput, goodput); --compare A.json B.json")
    bench_serve.add_arguments(bs)
    bs.set_defaults(func=cmd_bench_serve)
    bo = bsub.add_parser("offline", help="the engine without HTTP on the bench serve datasets: requests/s, "
                         "input and output tokens/s")
    bo.add_argument("--model", default=None, help="(default: the shipped demo model) checkpoint directory, or a "
                    "preset name with --load-format dummy")
    _engine_args(bo)
    bench_offline.add_arguments(bo)
    bo.set_defaults(func=cmd_bench_offline)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)     # the command line, for the reports to repeat
    if getattr(args, "passes_on", False):
        args.bench_args = rest          # a subcommand whose arguments are another command line's
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args)
    except CLIError as e:
        print(f"jaxdyn {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
