"""LLM: offline batched generation over the engine core."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import numbers
import signal
import threading
from collections.abc import Sequence

from tqdm.auto import tqdm

from jaxdyn.engine.chat import ChatTemplateError, chat_prompt
from jaxdyn.engine.core import EngineConfig, EngineCore, RequestError
from jaxdyn.engine.request import RequestOutput
from jaxdyn.engine.sampling_params import SamplingParams, generation_config_dir, generation_defaults
from jaxdyn.engine.xla_options import command_buffer_update_mode, gpu_memory_fraction


def build_engine(model, *, tp: int = 1, dtype=None, load_format: str = "auto",
                 config: EngineConfig = EngineConfig(), warmup: bool = True,
                 progress: bool = False, quantization: str | None = None,
                 quantize_lm_head: bool = False) -> EngineCore:
    """An engine for ``model`` (a checkpoint directory, or a preset name with load_format="dummy").
    ``quantization`` ("fp8", "int8"): a Hugging Face checkpoint quantized as it loads; ``quantize_lm_head``: an fp8
    model's lm_head too (``plan_model``)."""
    # jaxdyn reaches into checkpoints/ here only, lazily: loading lives there
    # (it imports jaxdyn), and this keeps `from jaxdyn import LLM` whole.
    from checkpoints.loader import load_weights, plan_model

    command_buffer_update_mode()        # before plan_model starts JAX's backend
    gpu_memory_fraction(config.gpu_memory_utilization)
    plan = plan_model(model, tp=tp, dtype=dtype, load_format=load_format, quantization=quantization,
                      quantize_lm_head=quantize_lm_head)
    # built on the weights' shapes: with warmup, the steps compile while the weights load
    engine = EngineCore(plan.graphdef, plan.abstract, plan.mesh, plan.config, plan.tokenizer, config)
    loaded = engine.load_weights(lambda: load_weights(plan), compile_steps=warmup, progress=progress)
    engine.load_info = {"seconds": loaded.load_seconds, "weight_bytes": loaded.num_bytes,
                        "warmup_seconds": engine.warmup(progress) if warmup else 0.0}
    if summary := engine.runner.compile_summary():
        engine.load_info["compile"] = summary
    costs = engine.runner.step_costs
    if costs:       # measured at warm-up where steps split (accelerators): ms a step by token bucket
        engine.load_info["step_costs_ms"] = {t: round(c * 1e3, 2) for t, c in sorted(costs.items())}
    return engine


def describe_compile(summary: dict) -> str:
    """One line of ``ModelRunner.compile_summary``: warm-up's compilation, wall against summed seconds."""
    kind, t, p, *rest = summary["slowest"]
    slowest = f"{kind} {t} tokens x {p} pages" + "".join(f" {v}" if isinstance(v, str) else f" x {v} slots"
                                                          for v in rest)
    return (f"compiled {summary['parts']} executables on {summary['threads']} threads in {summary['wall_s']:.1f} s: "
            f"XLA {summary['compile_s']:.1f} s summed (the slowest {summary['compile_max_s']:.1f} s, {slowest}), "
            f"lowering {summary['lower_s']:.1f} s; XLA s by token bucket {summary['by_tokens']}")


def build_disagg_engine(model, *, prefill_devices, decode_devices, prefill_tp: int | None = None,
                        decode_tp: int | None = None, dtype=None, load_format: str = "auto",
                        prefill_config: EngineConfig | None = None, config: EngineConfig = EngineConfig(),
                        policy=None, warmup: bool = True, progress: bool = False,
                        quantization: str | None = None, quantize_lm_head: bool = False):
    """A ``DisaggEngine``: the model on a prefill mesh and a decode mesh of disjoint devices.

    ``*_devices``: device indices (into ``jax.devices()``); ``*_tp``: tensor-parallel degree of
    each mesh (default: all its devices). ``prefill_config`` defaults to ``config``."""
    import time

    import jax

    from checkpoints.loader import load_weights, plan_model
    from jaxdyn.disagg.engine import DisaggEngine
    from jaxdyn.disagg.policy import DisaggPolicy
    from jaxdyn.parallel.sharding import make_mesh

    command_buffer_update_mode()        # before jax.devices() starts JAX's backend
    fractions = {c.gpu_memory_utilization for c in (prefill_config or config, config)} - {None}
    if len(fractions) > 1:
        raise ValueError(f"gpu_memory_utilization: the prefill and decode engines share one process's JAX, which "
                         f"takes one share of each GPU's memory; got {sorted(fractions)}")
    gpu_memory_fraction(fractions.pop() if fractions else None)
    devices = jax.devices()
    pick = []
    for role, idx, tp in (("prefill", prefill_devices, prefill_tp), ("decode", decode_devices, decode_tp)):
        idx = list(idx)
        bad = [i for i in idx if not 0 <= i < len(devices)]
        if not idx or bad or len(set(idx)) != len(idx):
            raise ValueError(f"{role} devices {idx}: need distinct indices in [0, {len(devices)})")
        tp = tp or len(idx)
        if tp != len(idx):
            raise ValueError(f"{role}: tensor parallelism {tp} needs {tp} devices, got {len(idx)}")
        pick.append((make_mesh(tp, [devices[i] for i in idx]), tp))
    if set(prefill_devices) & set(decode_devices):
        raise ValueError("prefill and decode devices must be disjoint")
    cores, t0 = [], time.perf_counter()
    total_bytes = 0
    for (mesh, tp), cfg in zip(pick, (prefill_config or config, config)):
        plan = plan_model(model, tp=tp, dtype=dtype, load_format=load_format, mesh=mesh,
                          quantization=quantization, quantize_lm_head=quantize_lm_head)
        core = EngineCore(plan.graphdef, plan.abstract, mesh, plan.config, plan.tokenizer, cfg)
        total_bytes += core.load_weights(lambda: load_weights(plan), compile_steps=warmup,
                                         progress=progress).num_bytes
        cores.append(core)
    engine = DisaggEngine(cores[0], cores[1], policy or DisaggPolicy())
    engine.load_info = {"seconds": time.perf_counter() - t0, "weight_bytes": total_bytes,
                        "warmup_seconds": engine.warmup(progress) if warmup else 0.0}
    by_role = {role: summary for role, core in zip(("prefill", "decode"), cores)
               if (summary := core.runner.compile_summary())}
    if by_role:
        engine.load_info["compile_by_role"] = by_role
    return engine


def _prompt_list(prompts, salts: list | None = None) -> list:
    """``generate``'s prompts as a list of strings and token-id lists: one prompt (a string, token ids, or vLLM's
    ``{"prompt": text}`` / ``{"prompt_token_ids": ids}``, either with a ``cache_salt``) or a list of them; TypeError
    naming what is not one. ``salts``: a list that gets each prompt's cache salt (None without one)."""
    def one(p, where):
        if salts is not None:
            salts.append(p.get("cache_salt") if isinstance(p, dict) else None)
        if isinstance(p, dict):
            if p.get("multi_modal_data"):
                raise TypeError(f"{where}: multi-modal prompts are not supported")
            keys = set(p) - {"multi_modal_data", "mm_processor_kwargs", "cache_salt"}
            if keys == {"prompt"} and isinstance(p["prompt"], str):
                return p["prompt"]
            if keys != {"prompt_token_ids"}:
                raise TypeError(f"{where}: a prompt dict holds 'prompt' (text) or 'prompt_token_ids', got "
                                f"{sorted(p)}")
            p = p["prompt_token_ids"]
            if not isinstance(p, (list, tuple)) and getattr(p, "ndim", None) != 1:
                raise TypeError(f"{where}: prompt_token_ids must be a list of token ids")
        if isinstance(p, str):
            return p
        if hasattr(p, "ndim") and hasattr(p, "tolist") and p.ndim == 1:     # a numpy array of ids
            p = p.tolist()
        if isinstance(p, (list, tuple)) and all(isinstance(t, numbers.Integral) and not isinstance(t, bool)
                                                for t in p):
            return [int(t) for t in p]       # numpy scalars as Python ints (outputs' prompt ids stay JSON-able)
        raise TypeError(f"{where}: expected a string, a list of token ids or a prompt dict, got {type(p).__name__}")

    if isinstance(prompts, (str, dict)) or getattr(prompts, "ndim", None) == 1 or (
            isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], numbers.Integral)
            and not isinstance(prompts[0], bool)):
        return [one(prompts, "prompt")]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts: expected a prompt or a list of prompts, got {type(prompts).__name__}")
    return [one(p, f"prompts[{i}]") for i, p in enumerate(prompts)]


# Prompts a slice of ``LLM.generate``'s queueing (``LLM._queue``): 64 ShareGPT-sized prompts are ~14k tokens (several
# 2,048-token steps' worth), tokenized and queued in ~6 ms on the GPU host, about a small step's device time.
QUEUE_SLICE = 64


class LLM:
    """vLLM's offline entry point: ``LLM(model).generate(prompts, sampling_params)``. ``model``: a Hugging Face or
    converted checkpoint directory, or a preset name with ``load_format="dummy"``; None: the shipped demo model."""

    def __init__(self, model=None, *, engine: EngineCore | None = None, tp: int | None = None, dtype=None,
                 load_format: str = "auto", quantization: str | None = None, quantize_lm_head: bool = False,
                 generation_config: str = "auto", tensor_parallel_size: int | None = None, **engine_kwargs):
        """``tensor_parallel_size`` is vLLM's name for ``tp``; ``dtype="auto"`` (vLLM's default) is the
        checkpoint's dtype, as None."""
        if tp is not None and tensor_parallel_size is not None and tp != tensor_parallel_size:
            raise ValueError(f"tp={tp} and tensor_parallel_size={tensor_parallel_size}: give one")
        tp = tp if tp is not None else (tensor_parallel_size if tensor_parallel_size is not None else 1)
        if dtype == "auto":
            dtype = None
        if engine is None and model is None:
            from checkpoints import DEMO_MODEL
            model = DEMO_MODEL
        if engine is not None and (engine_kwargs or model is not None or quantization or quantize_lm_head):
            given = sorted(engine_kwargs) + [k for k, v in (("model", model), ("quantization", quantization),
                                                            ("quantize_lm_head", quantize_lm_head)) if v]
            raise ValueError(f"engine= is built already: {', '.join(given)} would be ignored")
        # vLLM's generation_config: "auto" reads the model's generation_config.json, "vllm" none, else a folder
        self._defaults = generation_defaults(generation_config_dir(generation_config, model))
        # one caller at a time: an engine's step is not thread-safe (two threads' generate raced on the donated KV
        # buffers, and a caller whose outputs the other collected waited for good)
        self._lock = threading.RLock()
        self.engine = engine or build_engine(model, tp=tp, dtype=dtype, load_format=load_format,
                                             config=EngineConfig(**engine_kwargs), quantization=quantization,
                                             quantize_lm_head=quantize_lm_head)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def reset_prefix_cache(self) -> int:
        """Drop the cached prefixes no request holds; returns the KV pages freed (``EngineCore.reset_prefix_cache``)."""
        if not isinstance(self.engine, EngineCore):
            raise ValueError(f"reset_prefix_cache needs an EngineCore; this LLM runs a {type(self.engine).__name__}")
        with self._lock:
            return self.engine.reset_prefix_cache()

    def get_default_sampling_params(self) -> SamplingParams:
        """What ``generate`` uses without sampling params: SamplingParams' defaults, with those the model's
        generation_config.json sets (temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens), as
        vLLM's."""
        return SamplingParams(**self._defaults)

    def chat(self, messages, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, *, chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: dict | None = None,
             tools: list | None = None) -> list[RequestOutput]:
        """vLLM's ``LLM.chat``: one conversation (a list of OpenAI-style message dicts) or a list of them, each
        rendered with the model's chat template (or ``chat_template``) as the server renders /v1/chat/completions
        (``jaxdyn.engine.chat.chat_prompt``: ``add_generation_prompt``, ``continue_final_message``, ``tools``,
        ``chat_template_kwargs``), then generated as ``generate`` does. Each output's ``prompt`` is its rendered
        text. ChatTemplateError (a ValueError naming the field) where a conversation cannot be rendered."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise TypeError("messages: expected a conversation (a list of message dicts) or a list of them")
        if continue_final_message and add_generation_prompt:      # as transformers' template and the server refuse
            raise ChatTemplateError("continue_final_message: cannot be used with add_generation_prompt; pass "
                                    "add_generation_prompt=False", "continue_final_message")
        convs = [messages] if isinstance(messages[0], dict) else list(messages)
        if chat_template_kwargs and chat_template_kwargs.get("chat_template") is not None:
            # vLLM's LLM.chat renders a template given among the kwargs (its caller's own, trusted)
            chat_template_kwargs = dict(chat_template_kwargs)
            given = chat_template_kwargs.pop("chat_template")
            chat_template = chat_template if chat_template is not None else given
        texts = [chat_prompt(self.tokenizer, list(conv), add_generation_prompt=add_generation_prompt,
                             continue_final_message=continue_final_message,
                             chat_template_kwargs=chat_template_kwargs, tools=tools, chat_template=chat_template)
                 for conv in convs]
        outs = self.generate(self.tokenizer.encode_batch(texts, add_special_tokens=False), sampling_params, use_tqdm)
        for out, text in zip(outs, texts):
            out.prompt = text
        return outs

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, *, params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """prompts: a string, a list of strings, a list of token ids, or a list of token-id lists;
        ``sampling_params`` (vLLM's name; ``params`` too): one for all, or one a prompt. Each output's ``prompt`` is
        its text prompt (None for token ids), and its logprobs carry their tokens' text (``decoded_token``). A
        batch with a prompt the engine refuses raises and leaves nothing queued. Calls from several threads run
        one after another; a Ctrl-C (SIGINT, on the main thread) takes effect between engine steps."""
        with self._lock:
            return self._generate(prompts, sampling_params, use_tqdm, params)

    def _generate(self, prompts, sampling_params, use_tqdm, params) -> list[RequestOutput]:
        if sampling_params is not None and params is not None:
            raise ValueError("give sampling_params or params, not both")
        params = sampling_params if sampling_params is not None else params
        salts: list = []
        prompts = _prompt_list(prompts, salts)
        params = self.get_default_sampling_params() if params is None else params
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} sampling params for {len(prompts)} prompts")
        for p in plist:
            if not isinstance(p, SamplingParams):
                raise TypeError(f"sampling_params: expected SamplingParams (or a list of them), got {type(p).__name__}")
        # a prompt dict's cache_salt (vLLM's place for it) rides with that prompt's params
        plist = [p if salt is None else dataclasses.replace(p, cache_salt=salt) for p, salt in zip(plist, salts)]
        order = []
        texts: dict[str, str | None] = {}
        # Only the finished outputs are kept: an EngineCore then builds one output per request, not per token.
        final = {"final_only": True} if isinstance(self.engine, EngineCore) else {}
        done: dict[str, RequestOutput] = {}
        if any(isinstance(prompt, str) for prompt in prompts) and self.tokenizer is None:
            raise ValueError("text prompts need a tokenizer; this model has none (pass token ids)")
        # token-id prompts checked before anything runs (a bad one late in a batch was refused after the first
        # slices' steps)
        for i, (prompt, p) in enumerate(zip(prompts, plist)):
            if not isinstance(prompt, str):
                try:
                    self.engine.check_request(prompt, p)
                except RequestError as e:
                    raise RequestError(e.param, f"prompts[{i}]: {e}") from None
        bar = tqdm(total=len(prompts), desc="generate", disable=not use_tqdm)

        def collect(outs):
            for out in outs:
                if out.finished and out.request_id in texts:
                    done[out.request_id] = out
                    bar.update(1)
        try:
            self._queue(prompts, plist, final, order, texts, collect)
            while len(done) < len(order):
                collect(self._step())
            self._drain()
        except BaseException:
            for rid in order:
                if rid not in done:
                    self.engine.abort(rid)
            try:
                self._drain()
            except Exception:       # the device's own failure: the error raised below is the one to see
                pass
            raise
        finally:
            bar.close()
        outs = [done[r] for r in order]
        for rid, out in zip(order, outs):
            out.prompt = texts[rid]
            self._name_logprob_tokens(out)
        return outs

    def _queue(self, prompts: list, plist: list, final: dict, order: list, texts: dict, collect) -> None:
        """Queue the prompts in slices of ``QUEUE_SLICE``, each slice's text prompts tokenized at once (in parallel,
        the tokenizers library's threads). Where the engine takes its waiting requests in arrival order (an
        ``EngineCore`` under "fcfs"), it steps between slices whenever the waiting requests hold at least a token
        budget of work (their tokens to compute less the cached prefixes admission would reuse:
        ``Scheduler.waiting_work``): the device starts on the first prompts while the host tokenizes and queues
        the rest (1,000 ShareGPT-sized prompts: ~90 ms of tokenizing and queueing before the first step on the GPU
        host, ~0.2 s on 2 cores), and each such step admits what it would with every request queued first, since
        admission takes the queue's front in order and stops at the budget (or the seats, or the pages) before
        the queue's end. Every request is queued before the first step under "lof" (which orders the whole queue
        by max_tokens) and where a prompt's logprobs are to be scored (the rows a step gives the scoring requests
        depend on the queue)."""
        eng = self.engine
        interleave = (isinstance(eng, EngineCore) and eng.scheduler.config.policy == "fcfs"
                      and not any(p.prompt_logprobs is not None for p in plist))
        budget = eng.scheduler.config.max_num_batched_tokens if interleave else 0
        for lo in range(0, len(prompts), QUEUE_SLICE):
            part = prompts[lo:lo + QUEUE_SLICE]
            text_at = [j for j, prompt in enumerate(part) if isinstance(prompt, str)]
            ids = dict(zip(text_at, self.tokenizer.encode_batch([part[j] for j in text_at]))) if text_at else {}
            for j, (prompt, p) in enumerate(zip(part, plist[lo:lo + QUEUE_SLICE])):
                rid = f"llm-{next(self._ids)}"
                texts[rid] = prompt if isinstance(prompt, str) else None
                eng.add_request(rid, ids.get(j, prompt), p, **final)
                order.append(rid)
            if (interleave and lo + QUEUE_SLICE < len(prompts) and not eng.scheduler.scoring
                    and eng.scheduler.waiting_work(budget) >= budget):
                collect(self._step())

    def _drain(self) -> None:
        """With no request left, the step dispatched ahead while the last ones finished (the engine's overlap) is
        read, so the engine holds nothing in flight: ``has_unfinished()`` is False once ``generate`` returns, as
        vLLM's ``has_unfinished_requests()`` is. Another caller's requests, if any, are left to their caller."""
        eng = self.engine
        if isinstance(eng, EngineCore) and not eng.requests and eng.has_unfinished():
            self._step()

    def _step(self):
        """One engine step with SIGINT held until it returns: a KeyboardInterrupt raised as the compiled step
        returned, before the runner stored the new KV arrays, left it holding the donated (deleted) ones, and every
        later step failed."""
        with _sigint_deferred():
            return self.engine.step()

    def _name_logprob_tokens(self, out: RequestOutput) -> None:
        """Each logprob entry's token text (vLLM's ``Logprob.decoded_token``)."""
        tok = self.tokenizer
        if tok is None:
            return
        names: dict[int, str] = {}
        entries = [e for e in out.prompt_logprobs or () if e is not None]
        for c in out.outputs:
            entries.extend(c.logprobs or ())
        for entry in entries:
            for tid, lp in entry.items():
                if lp.decoded_token is None:
                    if tid not in names:
                        names[tid] = tok.decode([tid], skip_special_tokens=False)
                    lp.decoded_token = names[tid]


@contextlib.contextmanager
def _sigint_deferred():
    """On the main thread, with Python's own SIGINT handler in place: a SIGINT during the block is recorded and
    raised as KeyboardInterrupt once the block has finished (elsewhere: nothing changes)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    got = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if got:
        raise KeyboardInterrupt
